"""A minimal, explicit compatibility layer for CrypTen 0.4.1 (Dec 2022) on torch 2.13.

Never a vendored copy: each patch is a small, named function applied once by :func:`apply` (called by the
session before ``import crypten``), and each has a test in ``tests/test_compat.py``. What each fixes:

1. ``onnx_registration``: ``crypten.nn.onnx_converter`` imports ``torch.onnx._internal.registration`` at module
   load; torch >= 2.9 moved it to ``torch.onnx._internal.torchscript_exporter.registration``. We alias the old
   module name. (CrypTen also imports ``onnx`` there, only for ``crypten.nn.from_pytorch``, which we never use:
   if ``onnx`` is not installed we register an empty placeholder module so that the import succeeds; calling
   ``from_pytorch`` would then fail loudly.)
2. ``torch_load_weights_only``: torch >= 2.6 defaults ``torch.load(weights_only=True)``, which refuses to
   unpickle CrypTen objects in ``crypten.load`` / ``load_from_party`` and the provider's tuple cache. We pass
   ``weights_only=False`` at exactly those call sites (not globally).
3. ``replicated_contiguous``: the replicated (3-party) protocol receives into ``torch.zeros_like(share)``, which
   keeps a non-contiguous share's strides (e.g. a transposed K), and its truncation sends/receives ``x.share`` as
   it is; gloo refuses non-contiguous buffers. We make the shares contiguous before replication and truncation.
4. ``torch_function_classmethod``: CrypTensor defines ``__torch_function__`` as a plain method; new torch warns
   (and errors under -W error). We rebind it as a classmethod with the same body.
5. ``fast_config`` (speed only, same values): every attribute access on a CrypTensor reads
   ``cfg.debug.validation_mode``, and every op reads ``cfg.encoder``/``cfg.mpc``/... values, each through
   OmegaConf's resolver (~15 us a lookup): a profile of the 2PC demo spent ~18% of each party's CPU in it (1.3M
   lookups for 3 tokens). ``cfg`` keeps its OmegaConf config (``load_config``, ``temp_override`` and writes
   work as before) and gains a mirror of plain Python attributes, rebuilt whenever ``cfg.config`` is replaced;
   writes through a node (``cfg.mpc.provider = ...``) go to the OmegaConf node first and then to the mirror.
6. ``fast_rng`` (speed only): ``crypten.common.rng.generate_random_ring_element`` draws every mask, triple and
   zero-sharing with ``torch.randint`` over the int64 range (~170 M elements/s here, ~5 us a call); party 0 of a
   2PC TFP run draws ~1.7 G of them for the demo's prefill and 3 tokens (10 s of its 65 s), and a decode token
   makes ~15,000 small draws on the dealer (2PC + dealer). For CPU tensors we expand each torch generator with
   one NumPy PCG64DXSM stream (~500 M elements/s, ~1.5 us a call), seeded with 256 bits taken from the SAME
   torch generator at its first draw (so parties that share a generator draw identical streams, and the
   generator advances deterministically), made anew when the generator is re-seeded with a new seed (CrypTen's
   setup draws fresh ones); exactly uniform over Z_2^64 (``torch.randint`` misses 2^63 - 1). CUDA tensors keep
   CrypTen's call. Neither generator is a cryptographic PRG (CrypTen's is torch's Mersenne Twister); a deployment
   would expand the seed with AES-CTR instead, at the same place.
7. ``fixed_point_decode``: ``FixedPointEncoder.decode`` floors a negative encoding by ``scale - 1`` instead of
   ``scale``, so a value just above a negative integer, in (-n, -n + n/65535] at 16 bits, decodes exactly 1.0 too
   low (-9.99998 -> -10.99998; ~1.7e-4 of uniform values in (-20, 0); still in CrypTen's latest source): the rare
   "logit ~1.0 off plaintext" of the generation tests and the ~1 logit error of every bench cell. We divide
   exactly: ``(tensor.double() / scale).float()`` (the scale is a power of two, so the quotient is exact for
   ``|tensor| < 2**53``, i.e. ``|x| < 2**37`` at 16 bits, and the float32 result is the correctly rounded one;
   beyond, at most one float32 ulp off), on the tensor's own device, as float32 as before. Integer encoders
   (scale 1, precision 0) keep CrypTen's code.
8. ``own_ignored_encodings``: the Beaver protocol's ``IgnoreEncodings`` sets ``encoder._scale = 1`` on its
   operands' encoder OBJECTS for the opening, and CrypTen's ``clone`` shares the encoder object among every tensor
   derived from a share. Sequentially harmless (restored before anything else runs); but a lockstep branch
   (:mod:`mpcache.mpc.lockstep`) parks inside that block while another branch computes on a tensor sharing the
   encoder, which then sees scale 1 (its products lose their truncation). We give each operand its own scale-1
   encoder for the block instead and put the original objects back (in reverse order: an operand may be listed
   twice, as in ``x * x``). Same values in sequential use.
9. ``empty_shells`` (speed only, same values): ``MPCTensor.clone``/``shallow_copy``/``from_shares`` start from
   ``MPCTensor([])``, meant as an empty shell (``if tensor is []`` -- never true in Python), so each builds an
   ``ArithmeticSharedTensor`` of zero elements with a pseudo-random zero sharing (two generator calls) and throws it
   away: ~6,400 per 2PC demo decode token, ~0.4 s of party 0's ~5 s. An empty list now makes the empty shell
   directly. The zero sharings of no element drew nothing, so every generator stays where it was.
10. ``no_validation_wrapper`` (speed only): ``CrypTensor.__getattribute__`` is wrapped by
   ``crypten.debug.register_validation``, which reads ``cfg.debug.validation_mode`` on each of the ~100,000
   attribute reads of a decode token; we never run CrypTen's validation mode, so the wrapper is replaced by the
   function it wraps (turning ``validation_mode`` on after this patch has no effect).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import sys
import types

_APPLIED: list[str] = []


def _onnx_registration() -> None:
    try:
        importlib.import_module("torch.onnx._internal.registration")
    except ImportError:
        new = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
        sys.modules["torch.onnx._internal.registration"] = new
    try:
        importlib.import_module("onnx")
    except ImportError:
        placeholder = types.ModuleType("onnx")
        # a spec, so importlib.util.find_spec("onnx") (torch._dynamo's trace rules, imported by meta-device ops of
        # dry runs) sees a module instead of raising "onnx.__spec__ is None"
        placeholder.__spec__ = importlib.machinery.ModuleSpec("onnx", None)
        placeholder.__doc__ = "placeholder registered by mpcache.mpc.compat: onnx is not installed"
        placeholder.numpy_helper = types.ModuleType("onnx.numpy_helper")  # imported by name, never used
        sys.modules["onnx"] = placeholder
        sys.modules["onnx.numpy_helper"] = placeholder.numpy_helper


def _torch_load_weights_only() -> None:
    import crypten
    import torch
    from crypten.mpc.provider import provider as provider_mod

    def load_unsafe(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)

    # crypten.load / load_from_party take the loader as a default argument bound at definition time.
    for fn in (crypten.load, crypten.load_from_party):
        defaults = list(fn.__defaults__ or ())
        fn.__defaults__ = tuple(load_unsafe if d is torch.load else d for d in defaults)
    # the provider module calls torch.load through its module global `torch`: give it a namespace whose `load`
    # passes weights_only=False and that forwards everything else to torch.
    shim = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    shim.load = load_unsafe
    provider_mod.torch = shim


def _replicated_contiguous() -> None:
    from crypten.mpc.primitives import replicated

    original = replicated.replicate_shares
    if getattr(original, "_mpcache_patched", False):
        return

    @functools.wraps(original)
    def replicate_shares(share_list):
        return original([s.contiguous() for s in share_list])

    replicate_shares._mpcache_patched = True
    replicated.replicate_shares = replicate_shares

    original_truncate = replicated.truncate

    @functools.wraps(original_truncate)
    def truncate(x, y):
        x.share = x.share.contiguous()
        return original_truncate(x, y)

    replicated.truncate = truncate


def _torch_function_classmethod() -> None:
    from crypten.cryptensor import CrypTensor

    fn = CrypTensor.__dict__.get("__torch_function__")
    if isinstance(fn, classmethod) or fn is None:
        return
    CrypTensor.__torch_function__ = classmethod(fn)


def _fast_config() -> None:
    from crypten.config import cfg
    from crypten.config.config import CrypTenConfig
    from omegaconf import DictConfig

    if getattr(CrypTenConfig, "_mpcache_fast", False):
        return

    def mirror(value):
        return _FastNode(value) if isinstance(value, DictConfig) else value

    class _FastNode:
        """Plain-attribute mirror of one DictConfig node (reads are native attribute reads)."""

        def __init__(self, node):
            object.__setattr__(self, "_node", node)
            for key in node:
                object.__setattr__(self, key, mirror(node[key]))

        def __setattr__(self, key, value):
            setattr(self._node, key, value)  # OmegaConf's validation and semantics first
            object.__setattr__(self, key, mirror(self._node[key]))

    recent: dict[int, tuple] = {}  # id(config) -> (config, mirror): temp_override restores

    def build(config):
        hit = recent.get(id(config))
        if hit is not None and hit[0] is config:
            return hit[1]
        fast = _FastNode(config)
        if len(recent) >= 8:
            recent.pop(next(iter(recent)))
        recent[id(config)] = (config, fast)
        return fast

    original_setattr = CrypTenConfig.__setattr__

    def __setattr__(self, name, value):
        original_setattr(self, name, value)
        if name == "config":
            object.__setattr__(self, "_fast", build(value))

    def __getattribute__(self, name):
        values = object.__getattribute__(self, "_fast").__dict__
        if name in values:
            return values[name]
        try:
            return object.__getattribute__(self, name)
        except AttributeError:
            node = object.__getattribute__(self, "_fast")
            for key in name.split("."):
                node = getattr(node, key)
            return node

    object.__setattr__(cfg, "_fast", build(cfg.config))
    CrypTenConfig.__setattr__ = __setattr__
    CrypTenConfig.__getattribute__ = __getattribute__
    CrypTenConfig._mpcache_fast = True


def seed_words(generator) -> list[int]:
    """256 bits drawn from a torch generator, as four unsigned 64-bit words (a NumPy SeedSequence's entropy)."""
    import torch

    seed = torch.randint(-(2**63), 2**63 - 1, (4,), generator=generator, dtype=torch.long)
    return [int(v) & 0xFFFFFFFFFFFFFFFF for v in seed.tolist()]


def _stream(generator, np):
    """The NumPy PCG64DXSM stream that expands ``generator`` (one per torch generator and seed): made at its first
    draw from a 256-bit seed taken from ``generator`` itself (so two parties sharing a generator make the same
    stream), remade when the generator is re-seeded with another seed (a new ``initial_seed``)."""
    hit = _STREAMS.get(id(generator))
    if hit is None or hit[0] is not generator or hit[1] != generator.initial_seed():
        words = seed_words(generator)
        hit = _STREAMS[id(generator)] = (
            generator,
            generator.initial_seed(),
            np.random.PCG64DXSM(np.random.SeedSequence(words)),
        )
    return hit[2]


_STREAMS: dict = {}  # id(torch generator) -> (the generator, its initial seed, its NumPy stream)


def _fast_rng() -> None:
    import crypten
    import numpy as np
    import torch
    from crypten.common import rng
    from crypten.mpc.primitives import arithmetic
    from crypten.mpc.provider import tfp_provider, ttp_provider

    original = rng.generate_random_ring_element
    if getattr(original, "_mpcache_patched", False):
        return

    @functools.wraps(original)
    def generate_random_ring_element(size, ring_size=(2**64), generator=None, **kwargs):
        shape = torch.Size([size] if isinstance(size, int) else size)
        device = kwargs.get("device")
        on_cpu = device is None or torch.device(device).type == "cpu"
        if ring_size != 2**64 or not on_cpu or set(kwargs) - {"device"}:
            return original(size, ring_size=ring_size, generator=generator, **kwargs)
        if generator is None:
            generator = crypten.generators["local"][torch.device("cpu")]
        bits = _stream(generator, np).random_raw(shape.numel())
        return torch.from_numpy(bits.view(np.int64)).reshape(shape)

    generate_random_ring_element._mpcache_patched = True
    for mod in (rng, arithmetic, tfp_provider, ttp_provider):  # modules that imported the function by name
        mod.generate_random_ring_element = generate_random_ring_element


def _fixed_point_decode() -> None:
    from crypten.common.tensor_types import is_int_tensor
    from crypten.encoder import FixedPointEncoder

    original = FixedPointEncoder.decode
    if getattr(original, "_mpcache_patched", False):
        return

    @functools.wraps(original)
    def decode(self, tensor):
        if tensor is None or self._scale <= 1:
            return original(self, tensor)  # integer encoders: CrypTen's nearest-integer division
        assert is_int_tensor(tensor), "input must be a LongTensor"
        return (tensor.double() / self._scale).float().data

    decode._mpcache_patched = True
    FixedPointEncoder.decode = decode


def _own_ignored_encodings() -> None:
    from crypten.encoder import FixedPointEncoder
    from crypten.mpc.primitives.beaver import IgnoreEncodings

    if getattr(IgnoreEncodings, "_mpcache_patched", False):
        return

    def __enter__(self):
        self._saved = [t.encoder for t in self.list_of_tensors]
        for t in self.list_of_tensors:
            t.encoder = FixedPointEncoder(precision_bits=0)  # scale 1, this tensor's own

    def __exit__(self, exc_type, exc_value, exc_traceback):
        for t, enc in zip(reversed(self.list_of_tensors), reversed(self._saved)):
            t.encoder = enc

    IgnoreEncodings.__enter__, IgnoreEncodings.__exit__ = __enter__, __exit__
    IgnoreEncodings._mpcache_patched = True


def _empty_shells() -> None:
    from crypten.cryptensor import CrypTensor
    from crypten.mpc import mpc
    from crypten.mpc.ptype import ptype as Ptype

    original = mpc.MPCTensor.__init__
    if getattr(original, "_mpcache_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, tensor, ptype=Ptype.arithmetic, device=None, *args, **kwargs):
        if isinstance(tensor, list) and not tensor:  # an empty shell, filled by the caller
            CrypTensor.__init__(self, requires_grad=kwargs.pop("requires_grad", False))
            import torch

            self._tensor = torch.tensor([], device=device)
            self.ptype = ptype
            return
        original(self, tensor, ptype, device, *args, **kwargs)

    __init__._mpcache_patched = True
    mpc.MPCTensor.__init__ = __init__


def _no_validation_wrapper() -> None:
    from crypten.cryptensor import CrypTensor

    get = CrypTensor.__dict__["__getattribute__"]
    if getattr(get, "__wrapped__", None) is not None and get.__name__ == "__getattribute__":
        CrypTensor.__getattribute__ = get.__wrapped__


PATCHES = {
    "onnx_registration": _onnx_registration,
    "torch_load_weights_only": _torch_load_weights_only,
    "replicated_contiguous": _replicated_contiguous,
    "torch_function_classmethod": _torch_function_classmethod,
    "fast_config": _fast_config,
    "fast_rng": _fast_rng,
    "fixed_point_decode": _fixed_point_decode,
    "own_ignored_encodings": _own_ignored_encodings,
    "empty_shells": _empty_shells,
    "no_validation_wrapper": _no_validation_wrapper,
}


def apply() -> list[str]:
    """Apply every patch once (idempotent). Returns the names applied so far."""
    if not _APPLIED:
        _onnx_registration()  # must run before `import crypten`
        _APPLIED.append("onnx_registration")
        import crypten  # noqa: F401

        for name in (
            "torch_load_weights_only",
            "replicated_contiguous",
            "torch_function_classmethod",
            "fast_config",
            "fast_rng",
            "fixed_point_decode",
            "own_ignored_encodings",
            "empty_shells",
            "no_validation_wrapper",
        ):
            PATCHES[name]()
            _APPLIED.append(name)
    return list(_APPLIED)


def crypten():
    """Import CrypTen with the patches applied."""
    apply()
    import crypten as _crypten

    return _crypten
