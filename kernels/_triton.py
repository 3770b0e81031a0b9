"""The one place that imports Triton.

Every kernel file does ``from kernels._triton import HAVE_TRITON, triton, tl`` and decorates its kernels with
``@triton.jit``. Without Triton installed, ``triton.jit`` becomes a no-op and ``tl.constexpr`` a plain marker,
so the kernel files still import and the dispatchers fall back to the torch references.

Triton decides *when a kernel is defined* whether it runs on the interpreter (``TRITON_INTERPRET=1``, numpy on
the CPU) or compiles for a GPU. So ``TRITON_INTERPRET=1`` must be in the environment before ``kernels`` is first
imported; ``INTERPRET`` freezes the value seen then, and the dispatchers read that frozen value, never the live
environment, so they always agree with how the kernels were built.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    INTERPRET = bool(triton.knobs.runtime.interpret)
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=object)
    HAVE_TRITON = False
    INTERPRET = False

__all__ = ["HAVE_TRITON", "INTERPRET", "next_pow2", "tl", "triton", "use_triton"]


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the ``<op>`` dispatchers should run the Triton kernel rather than the torch reference.

    That is: Triton is importable and either the kernels were defined under the interpreter, or every tensor
    is on a CUDA device (compiled kernels).
    """
    if not HAVE_TRITON:
        return False
    return INTERPRET or all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (``tl.arange`` extents must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()
