"""Each CrypTen compatibility patch, tested on its own (in a subprocess: CrypTen keeps process-global state).
The replicated-contiguity patch is exercised end to end by the 3-party generation test (transposed K shares)."""

import subprocess
import sys

SNIPPET = r"""
import sys, torch
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
f = sys.argv[1]                 # a file under the test's tmp_path
crypten.save(x, f)
y = crypten.load(f)             # torch.load(weights_only=True) would refuse this pickle
assert torch.allclose(y.get_plain_text(), torch.tensor([1.5, -2.0]))
print("OK", applied)
"""


def test_patches_apply_and_work(tmp_path):
    p = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", SNIPPET, str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout
    for name in (
        "onnx_registration",
        "torch_load_weights_only",
        "replicated_contiguous",
        "torch_function_classmethod",
        "fast_config",
        "fast_rng",
        "fixed_point_decode",
        "empty_shells",
        "no_validation_wrapper",
    ):
        assert name in p.stdout


def test_crypten_does_not_import_without_the_shim():
    """Guards against a silent upgrade that would make the shim unnecessary (then delete it)."""
    p = subprocess.run(
        [sys.executable, "-c", "import crypten"], capture_output=True, text=True, timeout=120, check=False
    )
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
    p = subprocess.run([sys.executable, "-c", FAST_CONFIG], capture_output=True, text=True, timeout=120, check=False)
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
# two generators seeded alike (two parties sharing a seed) give identical streams, draw after draw, of any size,
# and the generators stay in lockstep (their own draws between ours agree too)
g1, g2 = torch.Generator(), torch.Generator()
g1.manual_seed(1234); g2.manual_seed(1234)
first = None
for size in [(3,), (4096,), (70, 100), (5, 7)]:
    a, b = f(size, generator=g1), f(size, generator=g2)
    assert a.shape == torch.Size(size) and a.dtype == torch.long and torch.equal(a, b), size
    first = a if first is None else first
    assert torch.equal(torch.randint(0, 9, (5,), generator=g1), torch.randint(0, 9, (5,), generator=g2))
# re-seeding generators (a new session's seeds) makes their streams anew: alike seeds, alike draws again
g1.manual_seed(77); g2.manual_seed(77)
a, b = f((3,), generator=g1), f((3,), generator=g2)
assert torch.equal(a, b) and not torch.equal(a, first)
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
    p = subprocess.run([sys.executable, "-c", FAST_RNG], capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout


DECODE = r"""
import sys
from fractions import Fraction
import numpy as np
import torch
from mpcache.mpc import compat
if sys.argv[1] == "stock":
    compat.PATCHES["fixed_point_decode"] = lambda: None      # CrypTen's own decode, every other patch applied
compat.apply()
import crypten
from crypten.encoder import FixedPointEncoder
from crypten.mpc import MPCTensor

enc = FixedPointEncoder()
S = enc.scale
assert S == 2 ** 16


def nearest_f32(t, scale):
    # the float32 values nearest the exact rational t / scale (both, on a tie)
    q = Fraction(t, scale)
    c = np.float32(float(q))
    cands = [c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf))]
    dist = [abs(Fraction(float(v)) - q) for v in cands]
    return {float(v) for v, d in zip(cands, dist) if d == min(dist)}


def check(ring, e=enc):
    t = torch.tensor(ring, dtype=torch.long)
    d = e.decode(t)
    assert d.dtype == torch.float32 and d.shape == t.shape, (d.dtype, d.shape)
    for r, v in zip(ring, d.tolist()):
        assert v in nearest_f32(r, e.scale), f"decode({r}) = {v!r}, exact {float(Fraction(r, e.scale))!r}"


# just above a negative integer: CrypTen's stock decode returns these exactly 1.0 too low
boundary = [round(-9.99998 * S)]
for n in (1, 2, 3, 7, 10, 19, 20, 100, 1000, 2 ** 20, 2 ** 23):
    boundary += [-n * S + 1, -n * S + n, -n * S + n + 1, -n * S, -n * S - 1]
check(boundary)
# positives, zero, and large magnitudes (|x| near 2^40, i.e. ring elements near 2^56, and the ring's ends)
check([0, 1, -1, S - 1, S, S + 1, 10 * S - 1, 10 * S + 1, 2 ** 23 * S + 1])
big = [2 ** 56, 2 ** 56 + 1, 2 ** 56 - 1, 2 ** 40 * S + S // 2, 2 ** 53 - 1, 2 ** 53 + 1, 3 * 2 ** 54 + 12345,
       2 ** 63 - 1]
check(big + [-v for v in big] + [-(2 ** 63)])
# the same values as a tensor's shares, revealed by CrypTen (world size 1): get_plain_text goes through decode
crypten.init()
x = MPCTensor.from_shares(torch.tensor([round(-9.99998 * S), -3 * S + 1, 5 * S + 7]))
assert x.get_plain_text().tolist() == [-655359 / S, (-3 * S + 1) / S, (5 * S + 7) / S], x.get_plain_text()
# uniform values in (-20, 0): every one equals the exact quotient (float64 division by 2^16 is exact here)
g = torch.Generator().manual_seed(0)
t = torch.randint(-20 * S + 1, 0, (1 << 20,), generator=g)
want = torch.from_numpy((t.numpy().astype(np.float64) / S).astype(np.float32))
got = enc.decode(t)
bad = got != want
assert not bad.any(), f"{int(bad.sum())} of {t.numel()} wrong, by {set((got - want)[bad].tolist())}"
# other precisions; precision 0 (the integer encoder) keeps CrypTen's exact integers
e20 = FixedPointEncoder(precision_bits=20)
check([-5 * 2 ** 20 + 1, -5 * 2 ** 20 + 5, 7 * 2 ** 20 + 1], e20)
e0 = FixedPointEncoder(precision_bits=0)
i = torch.tensor([-(2 ** 62), -7, -1, 0, 1, 7, 2 ** 62])
assert e0.decode(i).dtype == torch.long and torch.equal(e0.decode(i), i)
assert enc.decode(None) is None
if torch.cuda.is_available():
    c = torch.tensor(boundary, device="cuda")
    assert enc.decode(c).device == c.device
    assert torch.equal(enc.decode(c).cpu(), enc.decode(c.cpu()))
print("OK")
"""


def test_fixed_point_decode_is_exact():
    """Patch 7: ring elements decode to the nearest float32 of their exact quotient, just above negative integers
    (where CrypTen's decode is 1.0 too low), at zero, for positives, near 2^40 and across (-20, 0)."""
    p = subprocess.run(
        [sys.executable, "-c", DECODE, "patched"], capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout


def test_fixed_point_decode_checks_fail_on_stock_crypten():
    """The same checks against CrypTen's own decode fail at the first boundary value (-9.99998 decodes as
    -10.99998): guards against a CrypTen that fixed it (then delete the patch)."""
    p = subprocess.run(
        [sys.executable, "-c", DECODE, "stock"], capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode != 0 and "OK" not in p.stdout
    assert "decode(-655359) = -10.99998" in p.stderr, p.stderr[-3000:]


ENCODINGS = r"""
import sys
from mpcache.mpc import compat
if sys.argv[1] == "patched":
    compat.apply()
else:
    compat._onnx_registration()
import torch
from crypten.encoder import FixedPointEncoder
from crypten.mpc.primitives.beaver import IgnoreEncodings


class T:  # stands for an ArithmeticSharedTensor: only .encoder is touched
    def __init__(self, enc):
        self.encoder = enc


shared = FixedPointEncoder(precision_bits=16)
x, sibling = T(shared), T(shared)  # CrypTen's clone shares the encoder object
with IgnoreEncodings([x, x]):  # an operand listed twice, as in x * x
    assert x.encoder.scale == 1
    assert sibling.encoder.scale == 65536, "a tensor sharing the encoder saw scale 1"
assert x.encoder is shared and shared.scale == 65536
print("OK")
"""


def test_ignored_encodings_are_the_operands_own():
    """Patch 8: inside the Beaver protocol's IgnoreEncodings block the operands see scale 1, a tensor that shares
    their encoder object does not (what a lockstep branch computing meanwhile needs), and the original objects
    come back, also for an operand listed twice; stock CrypTen mutates the shared object (the check fails)."""
    for mode, ok in (("patched", True), ("stock", False)):
        p = subprocess.run(
            [sys.executable, "-c", ENCODINGS, mode], capture_output=True, text=True, timeout=120, check=False
        )
        assert (p.returncode == 0 and "OK" in p.stdout) == ok, (mode, p.stderr[-2000:])
        if not ok:
            assert "a tensor sharing the encoder saw scale 1" in p.stderr


SHELLS = r"""
import sys
from mpcache.mpc import compat
if sys.argv[1] == "patched":
    compat.apply()
else:
    compat._onnx_registration()
import torch
import crypten
from crypten.cryptensor import CrypTensor
from crypten.mpc import MPCTensor
from crypten.mpc.primitives import arithmetic

crypten.init()
calls = []
przs = arithmetic.ArithmeticSharedTensor.PRZS
arithmetic.ArithmeticSharedTensor.PRZS = staticmethod(lambda *a, **k: calls.append(1) or przs(*a, **k))
x = crypten.cryptensor(torch.tensor([1.5, -2.0]))
n0 = len(calls)
y, z = x.shallow_copy(), x.clone()
w = MPCTensor.from_shares(x.share)
assert torch.allclose(y.get_plain_text(), torch.tensor([1.5, -2.0])) and torch.allclose(z.get_plain_text(), y.get_plain_text())
assert w.share.equal(x.share) and z.ptype == x.ptype
assert len(calls) == n0, f"{len(calls) - n0} zero sharings for empty shells"
assert getattr(CrypTensor.__dict__["__getattribute__"], "__wrapped__", None) is None, "validation wrapper still on"
print("OK")
"""


def test_empty_shells_draw_nothing_and_attributes_are_unwrapped():
    """Patches 9 and 10: clone, shallow_copy and from_shares make no zero sharing for their empty shell, with the same
    values; CrypTensor's attribute reads go straight to CrypTen's function. Stock CrypTen fails the check."""
    for mode, ok in (("patched", True), ("stock", False)):
        p = subprocess.run(
            [sys.executable, "-c", SHELLS, mode], capture_output=True, text=True, timeout=120, check=False
        )
        assert (p.returncode == 0 and "OK" in p.stdout) == ok, (mode, p.stderr[-2000:])
        if not ok:
            assert "zero sharings for empty shells" in p.stderr, p.stderr[-2000:]
