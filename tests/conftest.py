import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit kernel is defined: CPU interpreter

import torch

torch.set_num_threads(1)
