"""Analytic costs of every secure protocol we use, derived from CrypTen 0.4.1's code (not fitted).

Each function returns a :class:`Cost`: per party ``r``, the bytes it sends and receives and the rounds it spends
(as :mod:`mpcache.mpc.ledger` counts them: one round per blocking receive / collective a party receives in; a
run of posted ``irecv`` is one round), split into ``online`` traffic and ``dealer`` traffic (the TTP's requests,
party 0 only). Costs depend only on public shapes and the :class:`Setting`; the test
``tests/test_costs.py`` checks prediction == ledger measurement, exactly, per party.

Where the constants come from (64-bit ring, 8 bytes per element, n compute parties):

* **opening** ``reveal``/``reveal_batch`` = ``all_reduce``: (n-1)·8·N sent and received, 1 round per party.
* **Beaver product** (``protocol=arithmetic``; mul, matmul): open ``x - a`` and ``y - b`` in one batched
  ``all_reduce``: (n-1)·8·(|x| + |y|), 1 round. Each operand travels with *its own* shape (no broadcast). The
  triple is free with TFP (party 0 makes it, others' shares are pseudo-random zero sharings); with TTP party 0
  asks the dealer (``send_obj`` of the request, ``recv_obj`` of the result size, a ``broadcast`` of party 0's share
  of ``c``: 2 dealer rounds, 8·|c| bytes plus the pickles).
* **replicated product** (``protocol=replicated``, 3 parties): ``replicate_shares([x, y])``: each party sends its
  shares of x and y to the next party and receives the previous party's: 8·(|x| + |y|) each way, 1 round.
* **truncation** after a product of two fixed-point values (both scales > 1) or by a public float: local with
  2 parties; replicated 3PC: party 2 sends its share (8·|z|) to party 1, which spends 1 round receiving it.
  Products with a scale-1 operand (bits, one-hots) or a python ``int`` are not truncated.
* **comparison** ``_ltz`` of N elements: A2B — every party's arithmetic share becomes a binary sharing (free:
  PRZS), summed by a log-depth tree of ``ceil(log2 n)`` binary adders (n=2: 1 adder; n=3: 2 adders, the odd one
  carried); each adder = 1 AND of (N, N) (opens 2N) + the Kogge–Stone SPK tree: 6 = log2(64) levels, each one AND
  whose operands are broadcast to (2, N) (opens 4N) — 7 rounds, 26·N elements opened; then B2A of the sign bit:
  1 opening of N. Total per element: (n-1)·8·(26·adders + 1) bytes, 7·adders + 1 rounds: **216 B and 8 rounds in
  2PC**, 848 B and 15 rounds with 3 parties (binary ANDs always use Beaver triples from the provider, also under
  ``replicated``).
* **fixed-operand matmul** (see :mod:`mpcache.mpc.fixed_operand`): only ``x - a`` is opened (or, replicated, only
  x's share is replicated), then the usual truncation.

Composite ops (``tree_max``, ``exp_limit``, ``reciprocal_nr``, ``norm_scale``, ``softmax``, ``silu``, ``gelu``,
``argmax_onehot``, ``topk_onehot``, ``keep_onehot``, ``strata_top1_onehot``) are written as the same
sequence of primitives as their implementation in :mod:`mpcache.mpc.ops`, with exact shapes (the TTP requests
pickle them). Rounds add up: every call waits for its messages (nothing is overlapped).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch

ELT = 8                       # bytes per ring element (int64)
SCALE = 2 ** 16               # CrypTen's default fixed-point scale
SPK_LEVELS = 6                # log2(64): levels of the carry tree of one binary adder


@dataclass(frozen=True)
class Setting:
    """n compute parties, ``protocol`` arithmetic (Beaver) | replicated (3PC), ``provider`` tfp | ttp."""

    n: int = 2
    protocol: str = "arithmetic"
    provider: str = "tfp"

    def __post_init__(self):
        if self.protocol not in ("arithmetic", "replicated"):
            raise ValueError(f"protocol must be arithmetic or replicated, got {self.protocol!r}")
        if self.provider not in ("tfp", "ttp"):
            raise ValueError(f"provider must be tfp or ttp, got {self.provider!r}")
        if self.protocol == "replicated" and self.n != 3:
            raise ValueError("the replicated protocol needs exactly 3 parties")
        if self.protocol == "arithmetic" and self.n != 2:
            # n > 2 additive parties truncate with CrypTen's wraps protocol; not modelled (nor used by the project)
            raise NotImplementedError("arithmetic sharing is modelled for 2 parties; use replicated for 3")

    @property
    def label(self) -> str:
        return f"{self.n}PC {self.protocol} {self.provider.upper()}"


KINDS = ("online", "dealer")
FIELDS = ("bytes_sent", "bytes_recv", "rounds")


@dataclass
class Cost:
    """Per-party counts: ``c[kind][field][rank]``."""

    n: int
    c: dict = field(default=None)

    def __post_init__(self):
        if self.c is None:
            self.c = {k: {f: [0] * self.n for f in FIELDS} for k in KINDS}

    def add(self, rank: int, sent: int = 0, recv: int = 0, rounds: int = 0, kind: str = "online") -> Cost:
        d = self.c[kind]
        d["bytes_sent"][rank] += int(sent)
        d["bytes_recv"][rank] += int(recv)
        d["rounds"][rank] += int(rounds)
        return self

    def __iadd__(self, other: Cost) -> Cost:  # noqa: PYI034
        for k in KINDS:
            for f in FIELDS:
                for r in range(self.n):
                    self.c[k][f][r] += other.c[k][f][r]
        return self

    def __add__(self, other: Cost) -> Cost:
        out = Cost(self.n)
        out += self
        out += other
        return out

    def get(self, fld: str, kind: str | None = None) -> list[int]:
        """Per-party list of ``fld``; ``kind`` None = online + dealer (as the ledger's totals)."""
        kinds = KINDS if kind is None else (kind,)
        return [sum(self.c[k][fld][r] for k in kinds) for r in range(self.n)]

    def summary(self) -> dict:
        """bytes_sent/bytes_recv per party (online), rounds = max over parties (all kinds, as the reports),
        dealer bytes received per party."""
        return {"bytes_sent": self.get("bytes_sent", "online"), "bytes_recv": self.get("bytes_recv", "online"),
                "rounds": max(self.get("rounds")), "online_rounds": max(self.get("rounds", "online")),
                "dealer_bytes": self.get("bytes_recv", "dealer"), "dealer_sent": self.get("bytes_sent", "dealer")}

    def __repr__(self):
        return f"Cost({self.summary()})"


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def _size(shape) -> torch.Size:
    return torch.Size([int(s) for s in shape])


def _bshape(*shapes) -> torch.Size:
    return torch.broadcast_shapes(*[_size(s) for s in shapes])


def _mm_shape(a, b) -> torch.Size:
    return torch.matmul(torch.empty(_size(a), device="meta"), torch.empty(_size(b), device="meta")).shape


# ---- primitives ------------------------------------------------------------------------------------------------
def open_(s: Setting, numel: int, dst: int | None = None) -> Cost:
    """Opening N elements to everyone (all_reduce) or to ``dst`` only (reduce)."""
    c = Cost(s.n)
    b = ELT * numel
    for r in range(s.n):
        if dst is None:
            c.add(r, (s.n - 1) * b, (s.n - 1) * b, 1)
        elif r == dst:
            c.add(r, 0, (s.n - 1) * b, 1)
        else:
            c.add(r, b, 0, 0)
    return c


def _pickled(obj) -> int:
    return len(pickle.dumps(obj)) + 4          # the ledger's count for send_obj/recv_obj


def ttp_request(s: Setting, func: str, out_shape, *args) -> Cost:
    """One request of party 0 to CrypTen's dealer (TTP only; free with TFP): the pickled message, the pickled size
    of the answer, and party 0's share of the answer (a broadcast from the dealer). 2 dealer rounds."""
    c = Cost(s.n)
    if s.provider != "ttp":
        return c
    msg = {"function": func, "device": "cpu", "args": args, "kwargs": {}}
    out = _size(out_shape)
    return c.add(0, _pickled(msg), _pickled(out) + ELT * out.numel(), 2, kind="dealer")


def truncation(s: Setting, shape) -> Cost:
    """Division by the fixed-point scale: local in 2PC; replicated 3PC: party 2 -> party 1 (ABY3 truncation)."""
    c = Cost(s.n)
    if s.protocol == "replicated":
        b = ELT * _numel(shape)
        c.add(2, sent=b)
        c.add(1, recv=b, rounds=1)
    return c


def public_mul(s: Setting, shape, scale: int = SCALE) -> Cost:
    """x * (public float or float tensor): local, then a truncation if x is fixed-point (scale > 1)."""
    return truncation(s, shape) if scale > 1 else Cost(s.n)


def _bilinear(s: Setting, op: str, xshape, yshape, out_shape, trunc: bool) -> Cost:
    xshape, yshape = _size(xshape), _size(yshape)
    nb = _numel(xshape) + _numel(yshape)
    c = Cost(s.n)
    if s.protocol == "replicated":
        for r in range(s.n):
            c.add(r, ELT * nb, ELT * nb, 1)
    else:
        c += ttp_request(s, "additive", out_shape, xshape, yshape, op)
        c += open_(s, nb)
    if trunc:
        c += truncation(s, out_shape)
    return c


def mul(s: Setting, xshape, yshape, trunc: bool = True) -> Cost:
    """Elementwise product of two shares (broadcasting); ``trunc`` when both are fixed-point (scale > 1)."""
    return _bilinear(s, "mul", xshape, yshape, _bshape(xshape, yshape), trunc)


def square(s: Setting, shape) -> Cost:
    """``x.square()``: a square pair (r, r^2) opens only x - r (arithmetic; TTP request "square") or replicates
    x's share alone (replicated); then the truncation."""
    shape = _size(shape)
    c = Cost(s.n)
    if s.protocol == "replicated":
        for r in range(s.n):
            c.add(r, ELT * shape.numel(), ELT * shape.numel(), 1)
    else:
        c += ttp_request(s, "square", shape, shape) + open_(s, shape.numel())
    return c + truncation(s, shape)


def matmul(s: Setting, xshape, yshape, trunc: bool = True) -> Cost:
    """Stock CrypTen matmul of two shares (Beaver, or replicated): both operands travel."""
    return _bilinear(s, "matmul", xshape, yshape, _mm_shape(xshape, yshape), trunc)


def fixed_matmul(s: Setting, xshape, wshape, trunc: bool = True, spec=None) -> Cost:
    """``x @ W`` with W a FixedOperand: only x's mask opening (or x's replication) travels. ``spec`` (TTP only):
    the operand's mask recipe (``FixedOperand.spec``), pickled into the dealer request."""
    out = _mm_shape(xshape, wshape)
    c = Cost(s.n)
    nx = _numel(xshape)
    if s.protocol == "replicated":
        for r in range(s.n):
            c.add(r, ELT * nx, ELT * nx, 1)
    else:
        if s.provider == "ttp":
            msg = {"function": "fixed_triple", "device": "cpu", "args": (spec, tuple(_size(xshape))), "kwargs": {}}
            c.add(0, _pickled(msg), _pickled(out) + ELT * out.numel(), 2, kind="dealer")
        c += open_(s, nx)
    if trunc:
        c += truncation(s, out)
    return c


def fixed_operand_fix(s: Setting, wshapes: list, keys: list[int] | None = None) -> Cost:
    """``FixedOperand.fix_many``: one opening of every D = W_i - B_i (additive; one flat all_reduce) or one
    replication of the flattened shares (replicated); TTP: one registration request with the keys and sizes."""
    c = Cost(s.n)
    nw = sum(_numel(w) for w in wshapes)
    if not wshapes:
        return c
    if s.protocol == "replicated":
        for r in range(s.n):
            c.add(r, ELT * nw, ELT * nw, 1)
        return c
    if s.provider == "ttp":
        keys = keys if keys is not None else list(range(len(wshapes)))
        entries = [(k, tuple(_size(w))) for k, w in zip(keys, wshapes)]
        msg = {"function": "fixed_register", "device": "cpu", "args": (entries,), "kwargs": {}}
        c.add(0, _pickled(msg), _pickled(torch.Size([1])) + ELT, 2, kind="dealer")
    return c + open_(s, nw)


def _and(s: Setting, xshape, yshape) -> Cost:
    """Binary Beaver AND (always from the provider's triples, whatever the protocol)."""
    out = _bshape(xshape, yshape)
    return ttp_request(s, "binary", out, _size(xshape), _size(yshape)) + open_(s, _numel(xshape) + _numel(yshape))


def _adder(s: Setting, shape) -> Cost:
    """circuit.add of two binary sharings of ``shape``: S = x & y, then the SPK tree (operands broadcast to 2x)."""
    shape = _size(shape)
    c = _and(s, shape, shape)
    sp = _size((2, *shape))
    for _ in range(SPK_LEVELS):
        c += _and(s, sp, sp)
    return c


def ltz(s: Setting, shape) -> Cost:
    """``MPCTensor._ltz`` (the comparison [x < 0]) of a share of ``shape``: A2B (binary tree of adders over the n
    parties' shares) and B2A of the sign bit."""
    shape = _size(shape)
    c = Cost(s.n)
    k = s.n
    one = _size((1, *shape))
    while k > 1:                      # BinarySharedTensor.sum's log-reduction over the n stacked sharings
        c += _adder(s, one)
        k = k // 2 + k % 2
    c += ttp_request(s, "B2A", shape, shape)
    c += open_(s, shape.numel())
    return c


def ltz_lean(s: Setting, shape) -> Cost:
    """ops._ltz_lean: two 32-bit lanes per word (h = ceil(N/2) words); n > 2: one carry-save AND layer per
    3 -> 2 reduction; then 1 AND + 5 prefix levels (operands broadcast to (2, h)) and B2A of the (2, h) sign bits."""
    N = _numel(shape)
    h = (N + 1) // 2
    w, w2 = _size((h,)), _size((2, h))
    c = Cost(s.n)
    k = s.n
    while k > 2:
        c += _and(s, w2, w2)
        k -= 1
    c += _and(s, w, w)
    for _ in range(5):
        c += _and(s, w2, w2)
    return c + ttp_request(s, "B2A", w2, w2) + open_(s, 2 * h)


def _cmp(s: Setting, shape, lean: bool) -> Cost:
    return ltz_lean(s, shape) if lean else ltz(s, shape)


# ---- composite ops (mirrors of mpcache.mpc.ops) -------------------------------------------------------------
def _radix_schedule(m: int, radix) -> list[int]:
    from .ops import _radix_schedule as schedule  # the layer radices are the protocol's own, not a copy

    return schedule(m, radix)


def max_layer(s: Setting, lead, m: int, r: int, lean: bool) -> Cost:
    """One layer of ops.tree_max over m entries with radix r (r <= m) for the leading shape ``lead``.
    Radix 2: 1 comparison of the h pairs and 1 mux product (bit x value, no truncation). Radix r
    (ops._radix_layer): one comparison layer over the r(r-1)/2 pairs of each of the G groups, then a product tree
    over the r bits/entries of each group (ring integers, no truncation)."""
    lead = tuple(_size(lead))
    if r == 2:
        hs = (*lead, m // 2)
        return _cmp(s, hs, lean) + mul(s, hs, hs, trunc=False)
    G = -(-m // r)                       # ops._onehot_radix_levels: flat comparisons and flat products
    c = _cmp(s, (_numel((*lead, G, r * (r - 1) // 2)),), lean)
    k = r
    while k > 1:
        n = _numel((*lead, G, r, k // 2))
        c += mul(s, (n,), (n,), trunc=False)
        k = k // 2 + k % 2
    return c


def tree_max(s: Setting, shape, dim: int = -1, radix=2, lean: bool = False) -> Cost:
    """ops.tree_max: its layers (``max_layer``) along the protocol's own radix schedule (``radix="auto"``:
    ops.max_schedule for this setting)."""
    from . import ops

    shape = list(_size(shape))
    dim = dim % len(shape)
    shape[dim], shape[-1] = shape[-1], shape[dim]
    lead, m = shape[:-1], shape[-1]
    if radix == "auto":
        radix = ops.max_schedule(_numel(lead), m, lean, s)
    c = Cost(s.n)
    for r in _radix_schedule(m, radix):
        c += max_layer(s, lead, m, r, lean)
        m = -(-m // r)
    return c


def _exp_squares() -> bool:
    """Whether ops.exp_limit squares with ``square()`` (a square pair, half a product's bytes) or ``y * y``."""
    import inspect

    from . import ops

    return ".square()" in inspect.getsource(ops.exp_limit)


def exp_limit(s: Setting, shape, iters: int = 8) -> Cost:
    """ops.exp_limit: 1 public product (x / 2^iters) and ``iters`` squarings."""
    c = public_mul(s, shape)
    sq = _exp_squares()
    for _ in range(iters):
        c += square(s, shape) if sq else mul(s, shape, shape)
    return c


def _pow2_guess(s: Setting, shape, lo: int, hi: int) -> Cost:
    return ltz(s, (hi - lo + 1, *_size(shape)))


def reciprocal_nr(s: Setting, shape, iters: int = 4, lo: int = -8, hi: int = 8) -> Cost:
    """ops.reciprocal_nr: one batched comparison layer (hi-lo+1 thresholds), then 2 products per Newton step."""
    c = _pow2_guess(s, shape, lo, hi)
    for _ in range(2 * iters):
        c += mul(s, shape, shape)
    return c


def reciprocal_gs(s: Setting, shape, iters: int | None = None, lo: int | None = None, hi: int | None = None,
                  q: int | None = None, lean: bool = False) -> Cost:
    """ops.reciprocal_gs: one comparison layer against the step guess's thresholds, d0 = x y0, then per
    Goldschmidt step one product of the stacked (y, d) with f (the last step: y f only)."""
    from . import ops

    iters = ops.RECIP_GS_ITERS if iters is None else iters
    lo = ops.RECIP_RANGE[0] if lo is None else lo
    hi = ops.RECIP_RANGE[1] if hi is None else hi
    q = ops.RECIP_GS_STEPS if q is None else q
    shape = _size(shape)
    n_t = len(ops._step_guess_coeffs(lo, hi, q)[0])
    c = _cmp(s, (n_t, *shape), lean) + mul(s, shape, shape)
    for k in range(iters):
        c += mul(s, shape, shape) if k == iters - 1 else mul(s, (2, *shape), shape)
    return c


def softmax(s: Setting, shape, masked: bool = False, radix=None, lean: bool | None = None,
            recip: str | None = None, anchor=None, offset: bool = False) -> Cost:
    """ops.softmax along the last dim (its defaults SOFTMAX_RADIX / SOFTMAX_LEAN / SOFTMAX_RECIP when None):
    tree max, exp, (mask product), row sum / sqrt(m) (public product), reciprocal, e * r, * 1/sqrt(m)."""
    from . import ops

    radix = ops.SOFTMAX_RADIX if radix is None else radix
    lean = getattr(ops, "SOFTMAX_LEAN", False) if lean is None else lean
    recip = getattr(ops, "SOFTMAX_RECIP", "newton") if recip is None else recip
    shape = _size(shape)
    row = _size((*shape[:-1], 1))
    if anchor is not None and not masked and sum(anchor) < shape[-1]:      # ops.softmax's anchored branch
        lo, hi, q = ops.ANCHOR_RECIP
        c = Cost(s.n) if offset else tree_max(s, (*shape[:-1], sum(anchor)), radix="auto", lean=lean)
        c += exp_limit(s, shape, iters=ops.ANCHOR_EXP_ITERS) + public_mul(s, row)
        c += reciprocal_gs(s, row, lo=lo, hi=hi, q=q, lean=False)
        return c + mul(s, shape, row) + public_mul(s, shape)
    c = tree_max(s, shape, radix=radix, lean=lean) + exp_limit(s, shape)
    if masked:
        c += public_mul(s, shape)
    c += public_mul(s, row)
    c += reciprocal_gs(s, row, lean=lean) if recip == "goldschmidt" else reciprocal_nr(s, row)
    return c + mul(s, shape, row) + public_mul(s, shape)


def _even_poly(s: Setting, shape, n_coeffs: int) -> Cost:
    c = public_mul(s, shape) + public_mul(s, shape)          # t = x^2 / 16; y = t * c_last
    for _ in range(n_coeffs - 2):
        c += mul(s, shape, shape)                             # (y + c) * t
    return c


def _act_cmp(s: Setting, shape, lean: bool | None) -> Cost:
    from . import ops

    return _cmp(s, shape, ops.ACT_LEAN if lean is None else lean)


def silu(s: Setting, shape, lean: bool | None = None) -> Cost:
    """ops.silu: 4 breakpoints in one comparison layer, a square, one stacked Horner chain of the 3 polynomials
    (3 public products for the variables and the top coefficients, then deg - 1 products), one stacked mux."""
    from . import ops

    shape = _size(shape)
    three, four = _size((3, *shape)), _size((4, *shape))
    n = max(len(ops.SILU_LOW), len(ops.SILU_MID), len(ops.SILU_HIGH))
    c = _act_cmp(s, four, lean) + square(s, shape)
    c += public_mul(s, shape) + public_mul(s, shape) + public_mul(s, shape) + public_mul(s, three)
    for _ in range(n - 2):
        c += mul(s, three, three)
    return c + public_mul(s, shape) + mul(s, four, four, trunc=False)


def gelu(s: Setting, shape, lean: bool | None = None) -> Cost:
    """ops.gelu: x/2 + even polynomial of a square, 2 breakpoints in one comparison layer, one stacked mux."""
    from . import ops

    shape = _size(shape)
    two = _size((2, *shape))
    c = public_mul(s, shape) + square(s, shape) + _even_poly(s, shape, len(ops.GELU_MID))
    return c + _act_cmp(s, two, lean) + mul(s, two, two, trunc=False)


def norm_scale(s: Setting, vshape, lean: bool | None = None) -> Cost:
    """ops.norm_scale: v / 2^8 (public product), the stacked square, one comparison layer (every threshold of the
    guess), one ring product of the OR/mux, (s Y, v Y) in one product, z = (s Y) Y, Goldschmidt, the output."""
    from . import ops

    lean = ops.NORM_LEAN if lean is None else lean
    vshape = _size(vshape)
    row = _size((*vshape[:-1], 1))
    ts, _ = ops._norm_table(*ops.NORM_RANGE, ops.NORM_STEPS)
    n_t, n_small = len(ts), sum(t < 2.0 ** ops.SUMSQ_SPLIT_LOG2 for t in ts)
    c = public_mul(s, vshape) + square(s, _size((2, *vshape)))
    c += _cmp(s, (n_t, *row), lean) + mul(s, row, (n_small + 1, *row), trunc=False)
    c += mul(s, (*vshape[:-1], vshape[-1] + 1), row) + mul(s, row, row)
    c += public_mul(s, row) + mul(s, row, row) + public_mul(s, row)          # Goldschmidt step 1 (h public)
    for k in range(1, ops.NORM_ITERS):
        c += mul(s, row, row)                                                  # g h
        c += mul(s, row, row) if k == ops.NORM_ITERS - 1 else mul(s, (2, *row), row)
    return c + mul(s, vshape, row)


def argmax_onehot(s: Setting, shape, lean: bool | None = None) -> Cost:
    """ops.argmax_onehot: tree max, [x >= max], tie-break comparison, 1 bit product (lean: ops.ARGMAX_LEAN)."""
    from . import ops

    lean = ops.ARGMAX_LEAN if lean is None else lean
    shape = _size(shape)
    return (tree_max(s, shape, radix=ops.ARGMAX_RADIX, lean=lean) + _cmp(s, shape, lean) + _cmp(s, shape, lean)
            + mul(s, shape, shape, trunc=False))


def _pairwise_rank(s: Setting, shape) -> Cost:
    shape = _size(shape)
    return ltz(s, (*shape, shape[-1]))


def _onehot_of_small_int(s: Setting, shape, k: int) -> Cost:
    return ltz(s, (k + 1, *_size(shape)))


def topk_onehot(s: Setting, shape, k: int) -> Cost:
    """ops.topk_onehot: m^2 pairwise comparisons (one layer), then (k+1) m comparisons (one layer)."""
    return _pairwise_rank(s, shape) + _onehot_of_small_int(s, shape, k)


def keep_onehot(s: Setting, shape, k: int) -> Cost:
    """ops.keep_onehot: pairwise rank, [rank < k], then the slot one-hot layer."""
    return _pairwise_rank(s, shape) + ltz(s, shape) + _onehot_of_small_int(s, shape, k)


def strata_level(s: Setting, lead, n: int, w: int, r: int, lean: bool) -> Cost:
    """One level of ops.strata_select: n survivors per stratum carrying one-hots of width w, radix r <= n
    (ops._onehot_radix_level, r = 2 included): the r(r-1)/2 pairs of each of the G groups in one comparison
    layer, then the product tree's rounds (ops._product_rounds), ring integers."""
    return _lockstep(s, [(_numel(lead), n, w, r)], lean)


def _lockstep(s: Setting, tasks, lean: bool) -> Cost:
    """ops._onehot_radix_levels over ``[(rows, n, w, r)]``: one comparison layer for all the tasks' pairs, then
    one product per round of the deepest product tree over every task's pairs of that round."""
    from . import ops

    n_cmp, trees = 0, []
    for rows, n, w, r in tasks:
        G = -(-n // r)
        n_cmp += rows * G * r * (r - 1) // 2
        trees.append([rows * G * r * sum(widths) for widths in ops._product_rounds(r, w)])
    c = _cmp(s, (n_cmp,), lean)
    for k in range(max(len(t) for t in trees)):
        n = sum(t[k] for t in trees if k < len(t))
        c += mul(s, (n,), (n,), trunc=False)
    return c


def strata_top1_onehot(s: Setting, shape, k: int, lean: bool | None = None, radix=None, heads: bool = False,
                       also=()) -> Cost:
    """ops.strata_select over the g slots (x G heads with ``heads``: ``shape`` (..., G, m)) of each stratum: its
    levels along the protocol's own schedule (ops.strata_schedule: ``radix`` an int, a sequence, or "auto"), in
    lockstep with the max tournaments (ops.lockstep_schedule) of the ``also`` shapes."""
    from . import ops

    lean = ops.SELECT_LEAN if lean is None else lean
    radix = ops.STRATA_RADIX if radix is None else radix
    shape = _size(shape)
    m = shape[-1]
    g = max((r + 1) * m // k - r * m // k for r in range(k))
    rows = _numel((*shape[:-2 if heads else -1], k))
    G = shape[-2] if heads else 1
    caps = ((G,) if G > 1 else ()) + tuple(ops.strata_schedule(rows, g, lean, radix, s))
    extra = [[_numel(_size(a)[:-1]), _size(a)[-1], ops.lockstep_schedule(_size(a)[-1], _numel(_size(a)[:-1]), caps,
                                                                           lean, s)] for a in also]
    c = Cost(s.n)
    n, w = g, 1
    for step in range(max([len(caps)] + [len(e[2]) for e in extra])):
        tasks = []
        if step < len(caps):
            if G > 1 and step == 0:
                tasks.append((_numel((*shape[:-2], m)), G, 0, G))
            else:
                r = caps[step]
                tasks.append((rows, n, w, r))
                n, w = -(-n // r), r * w
        for e in extra:
            if step < len(e[2]) and e[2][step] > 1:
                tasks.append((e[0], e[1], 0, e[2][step]))
                e[1] = -(-e[1] // e[2][step])
        c += _lockstep(s, tasks, lean)
    return c


def embedding(s: Setting, tokens_shape, table_shape, fixed: bool = True, spec=None) -> Cost:
    """One-hot rows (scale 1) @ table: no truncation."""
    if fixed:
        return fixed_matmul(s, tokens_shape, table_shape, trunc=False, spec=spec)
    return matmul(s, tokens_shape, table_shape, trunc=False)


def reveal(s: Setting, shape, dst: int | None = None) -> Cost:
    return open_(s, _numel(shape), dst)


# which ops the cost test covers, with the shapes it uses (documentation; the test lists them explicitly)
OPS = ("ltz", "mul", "public_mul", "matmul", "fixed_matmul", "tree_max", "argmax_onehot", "topk_onehot",
       "keep_onehot", "strata_top1_onehot", "exp_limit", "reciprocal_nr", "norm_scale", "softmax", "silu",
       "gelu", "embedding", "reveal")
