"""Each CrypTen compatibility patch, tested on its own (in a subprocess: CrypTen keeps process-global state).
The replicated-contiguity patch is exercised end to end by the 3-party generation test (transposed K shares)."""
import subprocess
import sys

SNIPPET = r"""
import sys, tempfile, torch
from mpcache.mpc import compat
applied = compat.apply()
import crypten
from crypten.cryptensor import CrypTensor
assert "torch.onnx._internal.registration" in sys.modules
assert isinstance(CrypTensor.__dict__["__torch_function__"], classmethod)
from crypten.mpc.primitives import replicated
assert replicated.replicate_shares._mpcache_patched
crypten.init()
x = crypten.cryptensor(torch.tensor([1.5, -2.0]))
f = tempfile.mktemp()
crypten.save(x, f)
y = crypten.load(f)             # torch.load(weights_only=True) would refuse this pickle
assert torch.allclose(y.get_plain_text(), torch.tensor([1.5, -2.0]))
print("OK", applied)
"""


def test_patches_apply_and_work():
    p = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", SNIPPET], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout
    for name in ("onnx_registration", "torch_load_weights_only", "replicated_contiguous", "torch_function_classmethod"):
        assert name in p.stdout


def test_crypten_does_not_import_without_the_shim():
    """Guards against a silent upgrade that would make the shim unnecessary (then delete it)."""
    p = subprocess.run([sys.executable, "-c", "import crypten"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and ("registration" in p.stderr or "onnx" in p.stderr)
