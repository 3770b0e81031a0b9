"""Cost-tracing backend: the secure backend's op set on shape-only tensors, charging analytic costs to a ledger.

Running the real model code (:class:`mpcache.model.transformer.Transformer`, any cache policy) on this backend
predicts, without weights, data or communication, the bytes and rounds every party would see in a private run —
per scope, with the same scope names as the real ledger (``prefill``, ``token/t``, ``L3``, ``softmax`` ...), in
the format of :meth:`mpcache.mpc.ledger.CostLedger.to_dict` (so :func:`mpcache.generation.per_token_costs` reads
it like a measured run). Each secure op is one method here that charges one function of
:mod:`mpcache.mpc.costs`; elementwise products written inline in the model (``silu(g) * u``, norm weights,
RoPE's public ``cos``/``sin``) are charged by :class:`CostTensor`'s operators with CrypTen's rules (a product of
two fixed-point shares is truncated; a product with a scale-1 bit/one-hot or a python ``int`` is not; a public
float product truncates).

Adding a secure op = one cost function in ``costs.py`` + one method here (mirroring ``SecureBackend``'s scope).
"""
from __future__ import annotations

import contextlib
import itertools

import torch

from ..mpc import costs as C
from ..mpc.ledger import CostLedger
from .secure import SecureBackend


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())

SCALE = C.SCALE
_SHAPE_METHODS = ("reshape", "view", "transpose", "permute", "t", "unsqueeze", "squeeze", "sum", "cumsum",
                  "repeat", "expand", "flatten", "contiguous", "clone", "index_select", "narrow", "roll",
                  "repeat_interleave", "flip")


class Tracer:
    """One :class:`CostLedger` per party, scoped together; ``charge`` records a :class:`costs.Cost`."""

    def __init__(self, setting: C.Setting):
        self.s = setting
        self.ledgers = [CostLedger(r, setting.n) for r in range(setting.n)]
        self.keys = itertools.count()            # mirrors fixed_operand._KEYS (TTP mask names)

    @contextlib.contextmanager
    def scope(self, name: str):
        with contextlib.ExitStack() as st:
            for L in self.ledgers:
                st.enter_context(L.scope(name))
            yield self

    def charge(self, cost: C.Cost) -> None:
        for r, L in enumerate(self.ledgers):
            for kind in C.KINDS:
                d = cost.c[kind]
                if d["bytes_sent"][r] or d["bytes_recv"][r] or d["rounds"][r]:
                    L.record(d["bytes_sent"][r], d["bytes_recv"][r], d["rounds"][r], kind=kind)

    def to_dicts(self) -> list[dict]:
        return [L.to_dict() for L in self.ledgers]


def _meta(shape) -> torch.Tensor:
    return torch.empty(tuple(int(s) for s in shape), device="meta")


class CostTensor:
    """A secret-shared tensor of a given shape and fixed-point scale (2^16, or 1 for bits/one-hots): no data."""

    is_cost_tensor = True

    def __init__(self, shape, tracer: Tracer, scale: int = SCALE):
        self.shape = torch.Size([int(s) for s in shape])
        self.tracer, self.scale = tracer, scale

    # ---- shape -----------------------------------------------------------------------------------------------
    def size(self, *dim):
        return self.shape if not dim else self.shape[dim[0]]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return int(self.shape.numel())

    nelement = numel

    def __len__(self) -> int:
        return int(self.shape[0])

    def _like(self, shape, scale=None) -> CostTensor:
        return CostTensor(shape, self.tracer, self.scale if scale is None else scale)

    def _shape_op(self, name, *args, **kwargs) -> CostTensor:
        return self._like(getattr(_meta(self.shape), name)(*args, **kwargs).shape)

    def __getattr__(self, name):
        if name in _SHAPE_METHODS:
            return lambda *a, **k: self._shape_op(name, *a, **k)
        raise AttributeError(name)

    def __getitem__(self, idx) -> CostTensor:
        return self._like(_meta(self.shape)[idx].shape)

    # ---- arithmetic (CrypTen's rules, see ArithmeticSharedTensor._arithmetic_function) -----------------------
    def _other_shape(self, o):
        if isinstance(o, (CostTensor, torch.Tensor)):
            return o.shape
        return ()

    def _add(self, o) -> CostTensor:
        o = unfix(o)
        shape = torch.broadcast_shapes(self.shape, self._other_shape(o))
        scale = max(self.scale, o.scale) if isinstance(o, CostTensor) else self.scale
        return self._like(shape, scale)

    __add__ = __radd__ = __sub__ = __rsub__ = _add

    def __neg__(self) -> CostTensor:
        return self._like(self.shape)

    def __mul__(self, o) -> CostTensor:
        o = unfix(o)
        s = self.tracer.s
        if isinstance(o, CostTensor):
            trunc = self.scale > 1 and o.scale > 1
            self.tracer.charge(C.mul(s, self.shape, o.shape, trunc=trunc))
            return self._like(torch.broadcast_shapes(self.shape, o.shape), self.scale if self.scale > 1 else o.scale)
        shape = torch.broadcast_shapes(self.shape, self._other_shape(o))
        if isinstance(o, int) and not isinstance(o, bool):
            return self._like(shape)                                   # integer product: exact, local
        self.tracer.charge(C.public_mul(s, shape, self.scale))
        return self._like(shape)

    __rmul__ = __mul__

    def __truediv__(self, o) -> CostTensor:
        return self * (1.0 / o)

    def __repr__(self):
        return f"CostTensor({tuple(self.shape)}, scale={self.scale})"


class CostFixed:
    """Mirror of :class:`mpcache.mpc.fixed_operand.FixedOperand`: a fixed operand's share plus the mask recipe
    (``spec``, TTP only) with the same view/cat structure, so TTP dealer requests pickle to the same size."""

    is_fixed_operand = True

    def __init__(self, w: CostTensor, spec=None):
        self.w, self.spec = w, spec

    @property
    def shape(self):
        return self.w.shape

    def size(self, *dim):
        return self.w.size(*dim)

    def dim(self) -> int:
        return self.w.dim()

    def __len__(self) -> int:
        return len(self.w)

    def _view(self, name, *args) -> CostFixed:
        spec = None if self.spec is None else ("view", self.spec, name, args)
        return CostFixed(getattr(self.w, name)(*args), spec)

    def __getitem__(self, idx) -> CostFixed:
        return self._view("__getitem__", idx)

    def reshape(self, *shape) -> CostFixed:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return self._view("reshape", shape)

    view = reshape

    def transpose(self, dim0: int, dim1: int) -> CostFixed:
        return self._view("transpose", dim0, dim1)

    def t(self) -> CostFixed:
        return self.transpose(0, 1)

    def index_select(self, dim: int, index) -> CostFixed:
        return self._view("index_select", dim, index)

    def unsqueeze(self, dim: int) -> CostFixed:
        return self._view("unsqueeze", dim)

    @staticmethod
    def cat(parts: list, dim: int = 0) -> CostFixed:
        dim = dim % parts[0].dim()
        w = parts[0].w._like(torch.cat([_meta(p.shape) for p in parts], dim=dim).shape)
        spec = None
        if parts[0].spec is not None:
            kids = []
            for p in parts:
                kids.extend(p.spec[1] if p.spec[0] == "cat" and p.spec[2] == dim else (p.spec,))
            spec = ("cat", tuple(kids), dim)
        return CostFixed(w, spec)

    def __getattr__(self, name):
        if name.startswith("__") or "w" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["w"], name)

    def __neg__(self):
        return -self.w

    def __add__(self, o):
        return self.w + unfix(o)

    __radd__ = __sub__ = __rsub__ = __add__

    def __mul__(self, o):
        return self.w * unfix(o)

    __rmul__ = __mul__


def unfix(x):
    return x.w if isinstance(x, CostFixed) else x


class CostBackend:
    """The op set of :class:`mpcache.backends.secure.SecureBackend` (same scopes), charging analytic costs."""

    secure = True

    def __init__(self, tracer: Tracer, fixed_weights: bool = True, fixed_kv: bool | None = None):
        self.tracer, self.s = tracer, tracer.s
        self.fixed_weights = fixed_weights
        self.fixed_kv = fixed_weights if fixed_kv is None else fixed_kv
        self.matmul_paths: dict[str, int] = {}
        self.reveals: list = []

    def _scope(self, name):
        return self.tracer.scope(name)

    def _charge(self, cost: C.Cost) -> None:
        self.tracer.charge(cost)

    # ---- data movement -------------------------------------------------------------------------------------
    def share(self, x, src: int, shape=None, precision: int | None = None) -> CostTensor:
        """Sharing is free (pseudo-random zero sharing; the owner adds its value)."""
        shape = x.shape if x is not None else shape
        return CostTensor(shape, self.tracer, 1 if precision == 0 else SCALE)

    def fix_many(self, ws: list) -> list[CostFixed]:
        ws = [unfix(w) for w in ws]
        keys = [next(self.tracer.keys) for _ in ws] if self.s.provider == "ttp" and \
            self.s.protocol != "replicated" else None
        self._charge(C.fixed_operand_fix(self.s, [w.shape for w in ws], keys))
        return [CostFixed(w, None if keys is None else ("key", k)) for w, k in zip(ws, keys or [None] * len(ws))]

    def fix(self, w) -> CostFixed:
        return self.fix_many([w])[0]

    def cat(self, xs: list, dim: int = 0):
        if not any(isinstance(x, CostFixed) for x in xs):
            return xs[0]._like(torch.cat([_meta(x.shape) for x in xs], dim=dim).shape) if len(xs) > 1 else xs[0]
        if not self.fixed_kv:
            return self.cat([unfix(x) for x in xs], dim=dim)
        loose = [i for i, x in enumerate(xs) if not isinstance(x, CostFixed)]
        xs = list(xs)
        for i, f in zip(loose, self.fix_rows([xs[i] for i in loose])):
            xs[i] = f
        return CostFixed.cat(xs, dim=dim)

    def stack(self, xs: list, dim: int = 0):
        xs = [unfix(x) for x in xs]
        return xs[0]._like(torch.stack([_meta(x.shape) for x in xs], dim=dim).shape)

    def fix_rows(self, xs: list) -> list:
        if not self.fixed_kv or not xs:
            return list(xs)
        with self._scope("fix"):
            return self.fix_many(list(xs))

    def embedding(self, table, onehot):
        return self._matmul(onehot, table)

    def matmul(self, a, b):
        with self._scope("matmul"):
            return self._matmul(a, b)

    def _matmul(self, a, b):
        a = unfix(a)
        out = torch.matmul(_meta(a.shape), _meta(b.shape)).shape
        if isinstance(b, CostFixed):
            sx, sw = a.scale, b.w.scale
            self.matmul_paths["fixed"] = self.matmul_paths.get("fixed", 0) + 1
            self._charge(C.fixed_matmul(self.s, a.shape, b.shape, trunc=sx > 1 and sw > 1, spec=b.spec))
            return a._like(out, sx if sx > 1 or sw == 1 else sw)
        self.matmul_paths["stock"] = self.matmul_paths.get("stock", 0) + 1
        self._charge(C.matmul(self.s, a.shape, b.shape, trunc=a.scale > 1 and b.scale > 1))
        return a._like(out, a.scale if a.scale > 1 else b.scale)

    # ---- reductions ----------------------------------------------------------------------------------------
    def max(self, x, dim: int = -1, keepdim: bool = False):
        x = unfix(x)
        with self._scope("max"):
            self._charge(C.tree_max(self.s, x.shape, dim, radix=SecureBackend.policy_radix(int(x.shape[dim])),
                                    lean=SecureBackend.POLICY_LEAN))
            return x._like(_meta(x.shape).amax(dim=dim, keepdim=keepdim).shape)

    min = max

    def neg(self, x):
        return unfix(x)

    def max_min(self, a, b, dim: int = -1):
        a = unfix(a)
        dim = dim % len(a.shape)
        with self._scope("max"):
            self._charge(C.tree_max(self.s, (2, *a.shape), dim + 1, radix=SecureBackend.policy_radix(int(a.shape[dim])),
                                    lean=SecureBackend.POLICY_LEAN))
        out = a._like(_meta(a.shape).amax(dim=dim).shape)
        return out, a._like(out.shape)

    def less_than(self, x, t):
        """SecureBackend.less_than: one lean comparison per element (the bit rescaled locally)."""
        x = unfix(x)
        with self._scope("cmp"):
            self._charge(C._cmp(self.s, x.shape, SecureBackend.POLICY_LEAN))
        return x._like(x.shape, SCALE)

    # ---- nonlinearities ------------------------------------------------------------------------------------
    def softmax(self, x, dim: int = -1, mask: torch.Tensor | None = None, anchor=None, offset=None):
        self._charge(C.softmax(self.s, x.shape, masked=mask is not None, anchor=anchor, offset=offset is not None))
        return x._like(x.shape, SCALE)

    def norm_scale(self, v, add: float = 0.0):
        with self._scope("rsqrt"):
            self._charge(C.norm_scale(self.s, v.shape))
            return v._like(v.shape, SCALE)

    def silu(self, x):
        with self._scope("silu"):
            self._charge(C.silu(self.s, x.shape))
            return x._like(x.shape)

    def gelu(self, x):
        with self._scope("gelu"):
            self._charge(C.gelu(self.s, x.shape))
            return x._like(x.shape)

    # ---- selection -----------------------------------------------------------------------------------------
    def argmax_onehot(self, x, dim: int = -1):
        self._charge(C.argmax_onehot(self.s, x.shape))
        return x._like(x.shape, 1)

    def topk_onehot(self, scores, k: int):
        with self._scope("topk"):
            self._charge(C.topk_onehot(self.s, scores.shape, k))
            return scores._like((*scores.shape[:-1], k, scores.shape[-1]), 1)

    def keep_onehot(self, scores, k: int):
        with self._scope("topk"):
            self._charge(C.keep_onehot(self.s, scores.shape, k))
            return scores._like((*scores.shape[:-1], k, scores.shape[-1]), 1)

    def strata_top1_onehot(self, scores, k: int):
        """Compact one-hot (..., k, g), ring 0/1 at scale 1 (ops.strata_select)."""
        return self.strata_select(scores, k)[0]

    def strata_select(self, scores, k: int, heads: bool = False, also=()):
        scores, also = unfix(scores), [unfix(t) for t in also]
        with self._scope("topk"):
            self._charge(C.strata_top1_onehot(self.s, scores.shape, k, heads=heads, also=[t.shape for t in also]))
            m = int(scores.shape[-1])
            g = max((r + 1) * m // k - r * m // k for r in range(k))
            lead = scores.shape[:-2] if heads else scores.shape[:-1]
            return scores._like((*lead, k, g), 1), [t._like(_meta(t.shape).amax(dim=-1).shape) for t in also]

    def gathered_ok(self, g, k, v) -> bool:
        """SecureBackend.gathered_ok for a CPU session (the tracer has no device; CUDA keeps the two-operand route)."""
        return bool(SecureBackend.GATHER_TRIPLES and g is not None and g.onehot is not None and g.strata
                    and isinstance(k, CostFixed) and isinstance(v, CostFixed) and self.s.n == 2
                    and self.s.protocol == "arithmetic" and self.s.provider == "tfp")

    def gather_scores(self, q, g, k):
        q = unfix(q)
        with self._scope("matmul"):
            self._charge(C.open_(self.s, _numel(g.onehot.shape) + _numel(q.shape)))
        return q._like((int(q.shape[0]), int(q.shape[1]), g.n_blocks_selected * g.block)), None

    def gather_values(self, p_sel, opened, g, v, p_rest=None, ranges=()):
        p_sel = unfix(p_sel)
        n = _numel(p_sel.shape) + (_numel(unfix(p_rest).shape) if ranges else 0)
        with self._scope("matmul"):
            self._charge(C.open_(self.s, n))
        return p_sel._like((int(p_sel.shape[0]), int(p_sel.shape[1]), int(v.shape[-1])))

    def reveal(self, x, dst: int | None = None, label: str = "value"):
        self.reveals.append((label, dst, tuple(x.shape)))
        with self._scope("reveal"):
            self._charge(C.reveal(self.s, x.shape, dst))
        return torch.zeros(x.shape)

    def reveal_token(self, onehot, dst: int) -> int:
        V = onehot.shape[-1]
        idx = (onehot * torch.arange(V, dtype=torch.float32)).sum(-1)
        self.reveal(idx, dst=dst, label="token")
        return 0


def predict_generation(cfg, policy=None, setting: C.Setting | None = None, n_prompt: int = 16, n_new: int = 2,
                       fixed_weights: bool | None = None, fixed_kv: bool | None = None,
                       keep_logits: bool = False, fold_norms: bool | None = None) -> tuple[list[dict], CostBackend]:
    """The ledgers (one dict per compute party, as ``CostLedger.to_dict()``) that a private greedy generation
    (:func:`mpcache.generation.private_generate`) of ``n_new`` tokens after an ``n_prompt``-token prompt would
    record, predicted from shapes alone. Mirrors private_generate step by step: weights shared and fixed in the
    same order (offline/weights), the prompt shared as scale-1 one-hot rows (offline/prompt), then ``generate``
    with the token revealed to the client. ``keep_logits``: also the test-only opening of every step's logits."""
    from ..generation import FIXED_WEIGHT_NAMES, FIXED_WEIGHTS_DEFAULT, FOLD_NORMS_DEFAULT
    from ..model.transformer import Transformer, generate
    from ..model.weights import expected_shapes, folded_norm_names
    from ..mpc.session import CLIENT

    try:
        from ..generation import FIXED_KV_DEFAULT
    except ImportError:                                   # older tree: no fixed K/V rows
        FIXED_KV_DEFAULT = False
    s = setting or C.Setting()
    tr = Tracer(s)
    fw = FIXED_WEIGHTS_DEFAULT if fixed_weights is None else fixed_weights
    B = CostBackend(tr, fixed_weights=fw, fixed_kv=FIXED_KV_DEFAULT if fixed_kv is None else fixed_kv)
    with tr.scope("offline"), tr.scope("weights"):
        gone = folded_norm_names(cfg) if (FOLD_NORMS_DEFAULT if fold_norms is None else fold_norms) else set()
        w = {name: B.share(None, 0, shape) for name, shape in expected_shapes(cfg).items() if name not in gone}
        if fw:
            w = {name: B.fix(t) if name.rsplit(".", 1)[-1] in FIXED_WEIGHT_NAMES else t for name, t in w.items()}
    with tr.scope("offline"), tr.scope("prompt"):
        x = B.share(None, CLIENT, (n_prompt, cfg.vocab_size), precision=0)
    model = Transformer(cfg, w, B, policy, scope=tr.scope)
    keep = (lambda lg: B.reveal(lg, dst=None, label="logits (test only)")) if keep_logits else None
    generate(model, x, n_new, reveal=lambda oh: B.reveal_token(oh, dst=CLIENT), keep_logits=keep)
    return tr.to_dicts(), B


__all__ = ["CostBackend", "CostFixed", "CostTensor", "Tracer", "predict_generation"]
