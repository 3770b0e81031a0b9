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
    for name in ("onnx_registration", "torch_load_weights_only", "replicated_contiguous", "torch_function_classmethod",
                 "fast_config", "fast_rng"):
        assert name in p.stdout


def test_crypten_does_not_import_without_the_shim():
    """Guards against a silent upgrade that would make the shim unnecessary (then delete it)."""
    p = subprocess.run([sys.executable, "-c", "import crypten"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and ("registration" in p.stderr or "onnx" in p.stderr)


FAST_CONFIG = r"""
from mpcache.mpc import compat
compat.apply()
import crypten
from crypten.config import cfg
from omegaconf import OmegaConf

def walk(node, prefix=""):
    for k in node.keys():
        v = node[k]
        if OmegaConf.is_dict(v):
            yield from walk(v, prefix + k + ".")
        else:
            yield prefix + k, v

# every value read through the mirror equals OmegaConf's, by dotted name and by nested attribute
for name, value in walk(cfg.config):
    assert cfg[name] == value, name
    node = cfg
    for key in name.split("."):
        node = getattr(node, key)
    assert node == value, name
assert cfg.debug.validation_mode is False
# temp_override: inside, the new value; after, the old one
old = cfg.functions.exp_iterations
with cfg.temp_override({"functions.exp_iterations": old + 3}):
    assert cfg.functions.exp_iterations == old + 3 and cfg["functions.exp_iterations"] == old + 3
assert cfg.functions.exp_iterations == old
# a write through a node reaches OmegaConf (and survives a later temp_override of another key)
cfg.mpc.provider = "TTP"
assert cfg.mpc.provider == "TTP" and cfg.config.mpc.provider == "TTP"
with cfg.temp_override({"functions.exp_iterations": 1}):
    assert cfg.mpc.provider == "TTP"
assert cfg.mpc.provider == "TTP"
# a top-level write merges as before
cfg.encoder.precision_bits = 20
assert cfg.encoder.precision_bits == 20 and cfg.config.encoder.precision_bits == 20
try:
    cfg.mpc.no_such_key
except AttributeError:
    pass
else:
    raise AssertionError("missing key must raise AttributeError")
print("OK")
"""


def test_fast_config_mirror_equals_omegaconf():
    p = subprocess.run([sys.executable, "-c", FAST_CONFIG], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout


FAST_RNG = r"""
import torch
from mpcache.mpc import compat
compat.apply()
import crypten
from crypten.common import rng
from crypten.mpc.primitives import arithmetic
from crypten.mpc.provider import tfp_provider, ttp_provider
f = rng.generate_random_ring_element
assert f._mpcache_patched
for mod in (arithmetic, tfp_provider, ttp_provider):
    assert mod.generate_random_ring_element is f, mod
# two generators seeded alike (two parties sharing a seed) give identical streams, draw after draw, above and
# below the NumPy threshold, and the generators stay in lockstep
g1, g2 = torch.Generator(), torch.Generator()
g1.manual_seed(1234); g2.manual_seed(1234)
for size in [(3,), (compat.FAST_RNG_MIN,), (70, 100), (5, 7)]:
    a, b = f(size, generator=g1), f(size, generator=g2)
    assert a.shape == torch.Size(size) and a.dtype == torch.long and torch.equal(a, b), size
# a different seed gives a different stream; values span the whole ring, every bit ~ fair
g3 = torch.Generator(); g3.manual_seed(99)
x = f((1 << 16,), generator=g3)
assert not torch.equal(x, f((1 << 16,), generator=g1))
assert x.min() < -(2 ** 62) and x.max() > 2 ** 62
bits = torch.stack([(x >> k) & 1 for k in range(64)]).double().mean(1)
assert ((bits - 0.5).abs() < 0.02).all(), bits
print("OK")
"""


def test_fast_rng_streams_are_shared_and_uniform():
    p = subprocess.run([sys.executable, "-c", FAST_RNG], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout
