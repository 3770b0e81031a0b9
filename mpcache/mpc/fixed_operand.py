"""Fixed-operand Beaver triples: open ``W - B`` once, then every product ``x @ W`` opens only ``x - a``.

Why one file (~600 lines): the operand type, its three providers' tuples (TFP, TTP dealer, replicated), the
dealer's requests and the exact ring product they all use are one protocol; split, each part would import the rest.

Stock CrypTen multiplies two shared matrices with a fresh triple ``(a, B, c = a @ B)`` and opens both ``x - a``
and ``W - B``, so each decode token re-sends every weight matrix (~1.4 GB per party per token for SmolLM2-135M).
When ``W`` is reused (weights; later cached K/V rows), its mask ``B`` can be drawn once and ``D = W - B`` opened
once and kept by every party (offline, counted under the caller's ledger scope, e.g. ``offline/weights``). Each
later product draws only a fresh mask ``a`` for the moving operand and ``c = a @ B`` from the dealer:

    x @ W = (x - a) @ D + (x - a) @ [B] + [a] @ D + [c]            (the public-public term added by party 0)
          = eps @ [W] + [a] @ D + [c]         with eps = x - a     (since D + [B] = [W], D added by party 0)

We use the second line (identical value, one local matmul fewer, and no share of ``B`` needs to be kept), then the
usual truncation by the fixed-point scale. Cost per use (2PC, 64-bit ring, ``|x|`` = elements of ``x``):

* **rounds**: 1 (the opening of ``eps``); truncation is local in 2PC (a wraps protocol with > 2 parties).
* **bytes/party**: ``|x| * 8`` sent and received — vs ``(|x| + |W|) * 8`` for the stock Beaver matmul.
* **offline, once per W**: 1 round and ``|W| * 8`` bytes/party (opening ``D``); the dealer keeps ``B``.
  ``n`` parties: multiply the bytes by ``n - 1`` (each party sends its share to every other).

Security (semi-honest, same trust model as the stock provider). ``D = W - B`` is uniform over Z_2^64 and
independent of ``W`` because ``B`` is uniform and masks ``W`` only: **never use one ``B`` with another operand**
(two openings ``W - B``, ``W' - B`` would reveal ``W - W'``). The transposed view (tied LM head, ``x @ W.T``) reuses
the same ``B`` and ``D`` transposed: it masks the *same* values, so nothing new is opened. Each ``a`` is fresh and
uniform, so ``x - a`` is uniform and independent of ``x``; ``c`` is a fresh sharing. Hence the view of a party is
simulatable exactly as in the stock protocol, which opens the same ``x - a`` and a (fresh) ``W - B`` per use.
**Leakage: shapes only.** Providers: ``TFP`` — party 0 draws ``B`` (it knows ``B``: with TFP, party 0 is trusted
for triples, as in stock CrypTen; here party 0 is also the model owner), shares it by pseudo-random zero sharing
(no traffic: the other parties' shares come from shared seeds, party 0's share is the difference), and per use
draws ``a`` and computes ``c = a @ B`` locally. ``TTP`` — every party draws its share of ``B`` (and of each ``a``,
``c``) from the seed it shares with the dealer; the dealer (:mod:`mpcache.mpc.dealer`) sums the shares of ``B``
once (a ``fixed_register`` request, no answer), keeps ``B`` per fixed operand, and per use sends party 0 its share
of ``c = a @ B`` (a ``fixed_triple`` request; dealer traffic: ``|x @ W|`` elements to party 0, as for a stock
triple, off the critical path: party 0 posts the request when it draws ``a`` and takes the answer after the
opening of ``x - a``, which ``c`` is used after). ``replicated`` (3PC): products need no triples, but CrypTen keeps
shares additive at rest and its replicated matmul first sends each party's share of *both* operands to the next
party — the same share of ``W`` at every use. Here :meth:`FixedOperand.fix` replicates ``W``'s share once
(offline: ``|W|`` elements to the next party, 1 round) and each use replicates only ``x`` (``|x|`` elements), then
the stock local product ``x1 W1 + x1 W2 + x2 W1`` and the stock replicated truncation (party 2 sends ``|x @ W|``
elements to party 1). Nothing new is sent: stock re-sent an identical tensor. ``path == "fixed-replicated"``.

**The K/V cache as fixed operands** (``SecureBackend.fixed_kv``; :meth:`mpcache.model.transformer.Transformer`).
A cached row is fixed once, when written: every layer's K and V at the end of the prefill (after the static
compaction; one :meth:`FixedOperand.fix_many`, 1 round, ``2 * layers * Hkv * n * hd`` elements), then each decode
step's new K and V rows (1 round per layer, ``2 * Hkv * hd`` elements). The cache grows by :meth:`FixedOperand.cat`
(no traffic) and is read through views (slices, the block reshape of a one-hot gather, ``index_select`` of public
indices, the transposed ``K^T``, the ``[K | V]`` split): the same op applied to the share, to ``D``, to party 0's
``B`` (TFP), to the replica (replicated) and, under TTP, to the dealer's ``B`` through a small recipe (``spec``,
:func:`eval_spec`) sent with each triple request (a few hundred bytes, dealer traffic). Per decode step and layer
(2PC bytes/party, 8 per element): ``q @ K^T`` opens ``|q|`` (stock: ``|q| + |K|``), ``p @ V`` opens ``|p|`` (stock:
``|p| + |V|``), a one-hot gather over the fixed ``[K | V]`` opens ``|onehot|`` once (stock: the one-hot and the
block region, for K and for V); the rows it picks are a fresh secret combination, so they are fixed once
(``|picked|`` elements, 1 round) before ``q @ K^T`` / ``p @ V`` use them. Rounds: +1 per layer and step (the new
rows' fixing); the gather's 2 rounds (product, fixing) replace the stock path's 2 (K's product, V's product).
By default a decode step does not move K or V at all (``mpcache.model.attention.attend_selected``): ``q @ K^T`` over every
fixed row (fused with the selection's ``q @ rep``, opening only q), the selected scores gathered and the
probabilities scattered back by the one-hot, then ``p @ V`` over every fixed row.

Why this leaks nothing more. Each fixed piece (a prefix, a row, a picked set) gets its **own** fresh uniform
``B``, used to mask that piece only, so its opened ``D = W - B`` is uniform and independent of ``W`` and of every
other opening (the pieces' masks are independent). Concatenating pieces concatenates their ``D`` and ``B``: still
a one-time pad of the concatenated values. A view re-arranges (or repeats, for ``index_select``) entries of the
same ``B`` and ``D``: it masks the *same* values with the *same* pads, so nothing new is opened; a product with a
view is the product with ``W`` itself under a public linear map. Re-fixing a value with a fresh ``B'`` (the picked
rows are copies of cached rows) opens ``W - B'``, independent of ``W - B`` because ``B'`` is independent of ``B``.
What must never happen, and does not: one ``B`` masking two different values (a ``B`` is drawn in
:meth:`FixedOperand.fix_many` and only ever reaches views of its own ``W``). Under TFP party 0 knows every ``B``
(hence the cache); that is the TFP convention (stock TFP triples give party 0 every ``x - a``'s ``x`` too). Under
TTP the dealer knows ``B`` but never sees any ``D``. **Leakage: shapes only** (all public: lengths, budgets).
"""

from __future__ import annotations

import itertools
import os
import time

import torch

PATH_TFP = "fixed-tfp"
PATH_TTP = "fixed-ttp"
PATH_REPLICATED = "fixed-replicated"
NOTES = {
    PATH_TFP: "fixed-operand triples (TFP): W - B opened once, x - a per use",
    PATH_TTP: "fixed-operand triples (TTP dealer keeps B): W - B opened once, x - a per use",
    PATH_REPLICATED: "replicated 3PC, no triples: W's share replicated once, only x's share per use",
}
_KEYS = itertools.count()  # names each fixed mask for the TTP dealer (same order, same names on every party)


def _comm():
    import crypten.communicator as comm

    return comm.get()


def _path() -> str:
    """Which realisation the current CrypTen setup gets (read once, when an operand is fixed)."""
    import crypten

    if crypten.cfg.mpc.protocol == "replicated":
        return PATH_REPLICATED
    name = crypten.mpc.get_default_provider().NAME
    if name == "TFP":
        return PATH_TFP
    if name == "TTP":
        return PATH_TTP
    raise NotImplementedError(f"fixed-operand triples support the TFP and TTP providers, not {name!r}")


def _rand(size, device, generator=None):
    from crypten.common.rng import generate_random_ring_element

    return generate_random_ring_element(size, generator=generator, device=device)


def _ttp():
    """This party's pipelined dealer client (:mod:`mpcache.mpc.dealer`): generator shared with the dealer, and
    party 0's non-blocking requests."""
    from .dealer import client

    return client()


# ---- the int64 ring product on CPU -------------------------------------------------------------------------------
#: Which route ``ring_matmul`` takes on CPU: "auto" (per shape, :func:`ring_matmul_route`), "int64" (torch's int64
#: kernels only: the route before issue 18) or "limbs" (float64 BLAS on split limbs wherever it applies). Read once
#: from ``MPCACHE_RING_MATMUL`` (each party is its own process); tests and benchmarks may set it directly.
RING_MATMUL = os.environ.get("MPCACHE_RING_MATMUL", "auto")
#: Limb widths, low to high (signed, balanced: see :func:`_limbs`). 22 + 21 + 21 = 64, and only the 6 limb pairs
#: whose shift 0/22/43/44 is below 64 are multiplied (the (1,2)/(2,1)/(2,2) pairs land at 65+ and vanish mod 2^64).
#: A pair's product is at most 2^21 * 2^21 = 2^42 in magnitude, so a float64 sum of up to 2^53 / 2^42 = 2048 of
#: them is exact (every partial sum an integer of magnitude <= 2^53, whatever order or FMA the BLAS uses); a longer
#: contraction is cut into chunks of 2048 whose int64 results are added (wrapping).
LIMB_BITS = (22, 21, 21)
LIMB_MAX_K = 2048
_LIMB_SHIFTS = (0, 22, 43)
#: Which route is faster depends on the CPU: torch's int64 kernels have no BLAS but are vectorised; with AVX-512 (this
#: project's 2-core machine, torch 2.13) they run ~4-8 G multiply-adds/s on one thread, faster than the 6 float64
#: products of the limb route (experiments/ring_matmul_bench.py: int64 wins every SmolLM2 shape there, 1.5x-30x); on
#: a CPU without 64-bit vector multiplies the limbs win large products. So "auto" measures: products too small to
#: repay splitting (fewer than LIMB_MIN_ROWS rows per batch -- a decode step's one row -- or fewer than
#: LIMB_MIN_MACS multiply-adds) always take int64; the first product of each shape class (log2 buckets of batch,
#: rows, K, N) in a process runs both routes, keeps the faster for the class, and returns the int64 result (the two
#: are bit-identical). One extra product per class, about a dozen classes in a prefill.
LIMB_MIN_ROWS = 8
LIMB_MIN_MACS = 1 << 20
_LIMB_CHUNK_BYTES = 256 << 20  # bound on one call's float64 limb buffers (cut along N above it)
_ROUTES: dict[tuple, str] = {}  # "auto": the measured route per shape class, this process
ROUTE_LOG: list[tuple] = []  # (class, int64 s, limbs s) of each measurement (reports, tests)


def _route_class(a_shape, b_shape) -> tuple:
    nb = _batch(b_shape)
    rows = max(1, _prod(a_shape[:-1]) // max(nb, 1))
    return (nb.bit_length(), rows.bit_length(), int(a_shape[-1]).bit_length(), int(b_shape[-1]).bit_length())


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def ring_matmul_route(a_shape, b_shape) -> str:
    """The route ``ring_matmul`` takes for int64 CPU operands of these shapes under ``RING_MATMUL``: "int64",
    "limbs", or (``auto``, a large product whose shape class has not been measured yet in this process)
    "measure"."""
    if RING_MATMUL == "int64" or len(a_shape) < 2 or len(b_shape) < 2:
        return "int64"
    if RING_MATMUL == "limbs":
        return "limbs"
    rows = _prod(a_shape[:-1]) // max(_batch(b_shape), 1)
    if rows < LIMB_MIN_ROWS or _prod(a_shape[:-1]) * int(a_shape[-1]) * int(b_shape[-1]) < LIMB_MIN_MACS:
        return "int64"
    return _ROUTES.get(_route_class(a_shape, b_shape), "measure")


def _batch(shape) -> int:
    return _prod(shape[:-2])


def _limbs(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` (int64) as float64 limbs l0, l1, l2 with x = l0 + l1 2^22 + l2 2^43 (mod 2^64), l0 in [-2^21, 2^21),
    l1 in [-2^20, 2^20), |l2| <= 2^20: balanced digits by rounding shifts, q1 = (x + 2^21) >> 22 (|q1| <= 2^41)
    and q2 = (q1 + 2^20) >> 21; the first addition may wrap, which changes q1 by a multiple of 2^42 only: nothing
    mod 2^64 once shifted back by 22."""
    w0, w1 = LIMB_BITS[0], LIMB_BITS[1]
    q1 = torch.add(x, 1 << (w0 - 1)).bitwise_right_shift_(w0)
    q2 = torch.add(q1, 1 << (w1 - 1)).bitwise_right_shift_(w1)  # from q1: one wrap, consistent digits
    l0 = torch.sub(x, torch.bitwise_left_shift(q1, w0))
    l1 = q1.sub_(torch.bitwise_left_shift(q2, w1))
    return [l0.to(torch.float64), l1.to(torch.float64), q2.to(torch.float64)]


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64)  # the float64 sums are exact integers of magnitude <= 2^53


def limb_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` on int64 ring tensors (``a`` (..., M, K), ``b`` (..., K, N), torch.matmul's broadcasting) through
    float64 BLAS on three split limbs per operand: bit-identical to the wrapping int64 product (see LIMB_BITS)."""
    k, n = a.shape[-1], b.shape[-1]
    if k > LIMB_MAX_K:  # exactness: at most LIMB_MAX_K terms per float64 sum
        out = None
        for s in range(0, k, LIMB_MAX_K):
            part = limb_matmul(a[..., s : s + LIMB_MAX_K], b[..., s : s + LIMB_MAX_K, :])
            out = part if out is None else out.add_(part)
        return out
    per_col = 8 * 3 * (k * _batch(b.shape) + a.numel() // max(k, 1) * 2)  # B's limbs + the products, per column
    step = max(1, min(n, _LIMB_CHUNK_BYTES // max(per_col, 1)))
    if step < n:  # bounded memory (e.g. a vocabulary-wide head over many rows)
        return torch.cat([limb_matmul(a, b[..., s : s + step]) for s in range(0, n, step)], dim=-1)
    a0, a1, a2 = _limbs(a)
    bl = _limbs(b)
    bcat = torch.cat(bl, dim=-1)  # (..., K, 3N): b0 | b1 | b2
    p0 = torch.matmul(a0, bcat)  # a0 b0, a0 b1, a0 b2
    p1 = torch.matmul(a1, bcat[..., : 2 * n])  # a1 b0, a1 b1
    p2 = torch.matmul(a2, bl[0])  # a2 b0
    s1, s2, s3 = _LIMB_SHIFTS[1], _LIMB_SHIFTS[2], 2 * _LIMB_SHIFTS[1]
    out = _i64(p0[..., :n])
    out += (_i64(p0[..., n : 2 * n]) + _i64(p1[..., :n])) << s1
    out += (_i64(p0[..., 2 * n :]) + _i64(p2)) << s2
    out += _i64(p1[..., n:]) << s3
    return out


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` on int64 ring tensors (wrapping mod 2^64, bit-identical to ``torch.matmul``), by the fastest CPU
    route for the shapes and ``b``'s layout: float64 BLAS on split limbs (:func:`limb_matmul`) where
    :func:`ring_matmul_route` measured them faster for the shape class (large products only), else torch's int64
    kernels, which have no BLAS: their matmul against a *transposed* matrix (the tied LM head, ``x @ E^T`` with the
    (vocab, hidden) embedding table contiguous) takes a strided path ~13x slower than against a contiguous one
    (SmolLM2's head: 450 ms vs 34 ms per product, three products per decode token on party 0). When ``b`` is the
    transpose of a contiguous matrix, multiply that matrix instead: ``torch.mv`` for one row (16 ms),
    ``(b^T @ a^T)^T`` for several."""
    if a.device.type == "cpu" and a.dtype == torch.int64 and b.dtype == torch.int64:
        route = ring_matmul_route(a.shape, b.shape)
        if route == "limbs":
            return limb_matmul(a, b)
        if route == "measure":  # first of its shape class: time both, keep the faster
            t0 = time.perf_counter()
            out = _int64_matmul(a, b)
            t1 = time.perf_counter()
            limb_matmul(a, b)
            t2 = time.perf_counter()
            key = _route_class(a.shape, b.shape)
            _ROUTES[key] = "limbs" if t2 - t1 < t1 - t0 else "int64"
            ROUTE_LOG.append((key, t1 - t0, t2 - t1))
            return out
    return _int64_matmul(a, b)


def _int64_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch's int64 product, with the transposed-``b`` routes of :func:`ring_matmul`'s docstring."""
    if a.device.type == "cpu" and b.dim() == 2 and a.dim() >= 1 and not b.is_contiguous() and b.t().is_contiguous():
        bt, lead = b.t(), a.shape[:-1]
        a2 = a.reshape(-1, a.shape[-1])
        out = torch.mv(bt, a2[0]).unsqueeze(0) if a2.shape[0] == 1 else torch.matmul(bt, a2.t()).t().contiguous()
        return out.reshape(*lead, bt.shape[0])  # contiguous, like torch.matmul's (gloo sends need it)
    return torch.matmul(a, b)


def _matmul_size(size0, size1) -> torch.Size:
    return torch.matmul(torch.empty(size0, device="meta"), torch.empty(size1, device="meta")).shape


def _flat_open(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Open several ring tensors in one exchange (one all-reduce of their flattened concatenation)."""
    flat = _comm().all_reduce(torch.cat([p.reshape(-1) for p in parts]))
    return _split(flat, [p.size() for p in parts])


def _split(flat: torch.Tensor, sizes) -> list[torch.Tensor]:
    """``flat`` cut into consecutive pieces of the given sizes (views)."""
    out, at = [], 0
    for s in sizes:
        n = int(torch.Size(s).numel())
        out.append(flat[at : at + n].reshape(s))
        at += n
    return out


# ---- the dealer's recipe of a view's mask ------------------------------------------------------------------------
# A FixedOperand's ``spec`` says how its B is built from the masks the dealer keeps: ("key", k) is the B registered
# under k; ("cat", (spec, ...), dim) concatenates; ("view", spec, name, args) applies the torch method ``name``
# (a public view: __getitem__ with public indices, reshape, transpose, index_select, unsqueeze). Views and
# concatenations never draw or open anything; they re-arrange the same B. Sent with each TTP triple request: a
# few hundred bytes (pickled), counted as dealer traffic.
VIEW_OPS = ("__getitem__", "reshape", "transpose", "index_select", "unsqueeze")


def _enc(a):
    """View arguments as plain tuples/ints (CrypTen's restricted unpickler refuses slices and Ellipsis)."""
    if isinstance(a, slice):
        return ("@slice", _enc(a.start), _enc(a.stop), _enc(a.step))
    if a is Ellipsis:
        return ("@ellipsis",)
    if torch.is_tensor(a):
        return ("@tensor", a.tolist())
    if isinstance(a, (tuple, list)):
        return tuple(_enc(x) for x in a)
    return int(a) if isinstance(a, int) else a


def _dec(a):
    if isinstance(a, tuple):
        if a and a[0] == "@slice":
            return slice(_dec(a[1]), _dec(a[2]), _dec(a[3]))
        if a and a[0] == "@ellipsis":
            return Ellipsis
        if a and a[0] == "@tensor":
            return torch.tensor(a[1], dtype=torch.long)
        return tuple(_dec(x) for x in a)
    return a


def eval_spec(spec, masks: dict) -> torch.Tensor:
    """The mask B described by ``spec`` from the registered masks (dealer side; tests use it to check views)."""
    kind = spec[0]
    if kind == "key":
        return masks[spec[1]]
    if kind == "cat":
        return torch.cat([eval_spec(s, masks) for s in spec[1]], dim=spec[2])
    assert kind == "view" and spec[2] in VIEW_OPS, spec
    return getattr(eval_spec(spec[1], masks), spec[2])(*_dec(spec[3]))


class FixedOperand:
    """A shared operand ``W`` with its mask opened once: ``D = W - B``.

    Holds ``w`` (this party's ``MPCTensor`` share of ``W``), ``d`` (the public ring tensor ``D``, the same on every
    party), ``b_plain`` (``B`` itself, TFP party 0 only), ``spec`` (how the TTP dealer rebuilds ``B``, see
    :func:`eval_spec`) and ``path`` / ``note`` (which realisation runs, for reports); on the replicated path ``d``
    is instead the previous party's share of ``W`` (its replica). Create it with :meth:`fix` / :meth:`fix_many`.

    Views — ``x[idx]`` (public indices), :meth:`reshape`, :meth:`transpose` / :meth:`t`, :meth:`index_select`,
    :meth:`unsqueeze` — and :meth:`cat` (along any dim) are FixedOperands again: the same op is applied to the
    share, to ``D``, to ``B`` (party 0 under TFP; the dealer, from ``spec``, under TTP) and to the replica. No
    traffic, nothing drawn, nothing opened.

    Anywhere else it stands for its share: any other attribute (``.device``, ``.encoder``, ``.sum`` ...) and
    arithmetic (``-x``, ``x * 2`` ...) act on ``w`` and give plain ``MPCTensor`` results, so code written for
    ``MPCTensor`` (the cache policies) runs unchanged; the secure backend unwraps it for reductions.
    """

    is_fixed_operand = True

    def __init__(self, w, d, b_plain, path: str, spec=None):
        self.w, self.d, self.b_plain = w, d, b_plain
        self.path, self.spec = path, spec

    @property
    def note(self) -> str:
        return NOTES[self.path]

    @property
    def share(self):
        return self.w.share

    # ---- fixing ------------------------------------------------------------------------------------------------
    @classmethod
    def fix(cls, w) -> FixedOperand:
        """Fix the shared ``w`` (an ``MPCTensor``): draw ``B``, open ``D = W - B`` (1 round, ``|W|`` elements per
        party; call inside an offline ledger scope). Every compute party must call it, in the same order."""
        return cls.fix_many([w])[0]

    @classmethod
    def fix_many(cls, ws: list) -> list[FixedOperand]:
        """Fix several shares at once: a fresh, independent ``B`` for each, all ``D`` opened in **one** round.

        Rounds: 1. Bytes/party: ``sum |W_i| * 8`` sent and received (2PC; ``n - 1`` times that with n additive
        parties; replicated 3PC: the shares to the next party). Dealer (TTP): one request of a few bytes per call
        (the keys and sizes), nothing else. Leaks: shapes only (``D_i`` is uniform, see the module docstring)."""
        if not ws:
            return []
        path = _path()
        if path == PATH_REPLICATED:
            from crypten.mpc.primitives import replicated

            flat = torch.cat([w.share.reshape(-1) for w in ws])
            ((_, prev),) = replicated.replicate_shares([flat])  # looked up now: the compat shim applies
            out, at = [], 0
            for w in ws:
                n = w.share.numel()
                out.append(cls(w, prev[at : at + n].reshape(w.share.size()), None, path))
                at += n
            return out
        rank, b_plains, b_shares, specs = _comm().get_rank(), [], [], []
        if path == PATH_TFP:
            from crypten.mpc.primitives import ArithmeticSharedTensor

            for w in ws:
                size, dev = w.size(), w.device
                b = _rand(size, dev) if rank == 0 else None
                b_plains.append(b)
                b_shares.append(ArithmeticSharedTensor(b, size=size, precision=0, src=0, device=dev).share)  # local
                specs.append(None)
        else:
            dev = ws[0].device
            gen = _ttp().generator(dev)
            for w in ws:
                b_shares.append(_rand(w.size(), dev, gen))  # the dealer sums these shares into B
                b_plains.append(None)
                specs.append(("key", next(_KEYS)))  # the same counter on every party
            if rank == 0:  # a request without answer (non-blocking)
                _ttp().request("fixed_register", dev, ([(s[1], tuple(w.size())) for s, w in zip(specs, ws)],))
        ds = _flat_open([w.share - b for w, b in zip(ws, b_shares)])
        return [cls(w, d, b, path, s) for w, d, b, s in zip(ws, ds, b_plains, specs)]

    def vector_layout(self) -> FixedOperand:
        """The same operand with a 2-D ``W``'s share, ``D`` and ``B`` stored transposed (column-major ``(K, N)``
        views of contiguous ``(N, K)`` tensors): a one-row product ``x @ W`` (every decode-step linear layer) then
        runs as ``torch.mv`` over contiguous rows, ~1.7x faster than the int64 row-by-matrix product. Same values,
        same shape, same spec (the dealer's ``B`` is unchanged); no traffic. Multi-row products (the prefill) pay
        ~1.7x instead. Anything but a 2-D operand is returned unchanged."""
        if self.dim() != 2 or self.w.share.device.type != "cpu":
            return self  # (ring_matmul's fast routes are for CPU int64 tensors)

        def col_major(t):
            return None if t is None else t.t().contiguous().t()

        self.w.share = col_major(self.w.share)
        self.d, self.b_plain = col_major(self.d), col_major(self.b_plain)
        return self

    # ---- shape, views, concatenation ---------------------------------------------------------------------------
    def size(self, *dim):
        return self.w.size(*dim)

    @property
    def shape(self) -> torch.Size:
        return self.w.size()

    def dim(self) -> int:
        return self.w.dim()

    def __len__(self) -> int:
        return int(self.shape[0])

    def _view(self, name: str, *args) -> FixedOperand:
        def ap(v):
            return None if v is None else getattr(v, name)(*args)

        spec = None if self.spec is None else ("view", self.spec, name, _enc(args))
        return FixedOperand(ap(self.w), ap(self.d), ap(self.b_plain), self.path, spec)

    def __getitem__(self, idx) -> FixedOperand:
        """Public indexing (slices, ints, public index tensors): a view."""
        return self._view("__getitem__", idx)

    def reshape(self, *shape) -> FixedOperand:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        return self._view("reshape", shape)

    view = reshape

    def transpose(self, dim0: int, dim1: int) -> FixedOperand:
        return self._view("transpose", dim0, dim1)

    def t(self) -> FixedOperand:
        assert self.dim() == 2, "t() is for 2-D operands; use transpose(-2, -1)"
        return self.transpose(0, 1)

    def index_select(self, dim: int, index: torch.Tensor) -> FixedOperand:
        """Rows at public indices (a view: a repeated row repeats the same masked value, nothing new opens)."""
        return self._view("index_select", dim, index)

    def unsqueeze(self, dim: int) -> FixedOperand:
        return self._view("unsqueeze", dim)

    @staticmethod
    def cat(parts: list[FixedOperand], dim: int = 0) -> FixedOperand:
        """Concatenate fixed operands (e.g. the cache and a new row): no traffic. The pieces' masks are independent
        and uniform, so the concatenated ``D`` is uniform too; ``B`` concatenates the same way (party 0 / dealer)."""
        import crypten

        paths = {p.path for p in parts}
        assert len(paths) == 1, f"cannot concatenate fixed operands of different paths {paths}"
        dim = dim % parts[0].dim()
        w = crypten.cat([p.w for p in parts], dim=dim)
        d = torch.cat([p.d for p in parts], dim=dim)
        b = None if parts[0].b_plain is None else torch.cat([p.b_plain for p in parts], dim=dim)
        spec = None
        if parts[0].spec is not None:
            kids = []
            for p in parts:  # flatten nested concatenations along the same dim
                kids.extend(p.spec[1] if p.spec[0] == "cat" and p.spec[2] == dim else (p.spec,))
            spec = ("cat", tuple(kids), dim)
        return FixedOperand(w, d, b, paths.pop(), spec)

    # ---- standing in for the share (non-matmul uses) -----------------------------------------------------------
    def __getattr__(self, name):
        if name.startswith("__") or "w" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["w"], name)

    def __neg__(self):
        return -self.w

    def __add__(self, other):
        return self.w + _unfix(other)

    def __radd__(self, other):
        return _unfix(other) + self.w

    def __sub__(self, other):
        return self.w - _unfix(other)

    def __rsub__(self, other):
        return _unfix(other) - self.w

    def __mul__(self, other):
        return self.w * _unfix(other)

    def __rmul__(self, other):
        return _unfix(other) * self.w

    def __repr__(self):
        return f"FixedOperand(shape={tuple(self.shape)}, path={self.path!r})"


def _unfix(x):
    """The share behind a FixedOperand (anything else unchanged)."""
    return x.w if isinstance(x, FixedOperand) else x


unfix = _unfix


def _triple(x, fixed: FixedOperand, out_size):
    """This party's shares of a fresh ``a`` (like ``x``) and of ``c = a @ B`` (like the product)."""
    rank, dev, size = _comm().get_rank(), x.device, x.size()
    if fixed.path == PATH_TFP:
        from crypten.mpc.primitives import ArithmeticSharedTensor

        a = _rand(size, dev) if rank == 0 else None
        c = ring_matmul(a, fixed.b_plain) if rank == 0 else None
        a = ArithmeticSharedTensor(a, size=size, precision=0, src=0, device=dev).share  # no traffic
        c = ArithmeticSharedTensor(c, size=out_size, precision=0, src=0, device=dev).share
        return a, c
    from .dealer import pooled_device

    if pooled_device(dev):  # party 0's c from its pool of dealer answers (mpcache/mpc/dealer.py: pooled tuples)
        a, c = _ttp().pooled("fixed_triple", dev, (fixed.spec, tuple(size)), (size,), out_size)
        return a, c
    gen = _ttp().generator(dev)
    a = _rand(size, dev, gen)
    if rank == 0:  # pending until the opening of x - a (the dealer's answer arrives meanwhile)
        c = _ttp().request("fixed_triple", dev, (fixed.spec, tuple(size)), out_size)
    else:
        c = _rand(out_size, dev, gen)
    return a, c


def fixed_matmul(x, fixed: FixedOperand):
    """``x @ W`` for a shared ``x`` (MPCTensor, (..., M, K)) and a fixed ``W`` (..., K, N): opens only ``x - a``.

    Rounds: 1 (+ the truncation's, local in 2PC).  Bytes/party: ``|x| * 8`` (stock: ``(|x| + |W|) * 8``); with
    n > 2 additive parties ``(n-1)`` times that; replicated 3PC: ``|x| * 8`` to the next party (stock ``|x| + |W|``)
    plus the stock truncation.
    Fixed-point: exact in the ring before truncation; the local 2PC truncation adds at most 2 ulps (2 * 2^-16)
    per output, as in the stock matmul. Same encoder rules as CrypTen's matmul (a scale-1 ``x``, e.g. a one-hot,
    needs no truncation). Leaks: shapes only (see the module docstring for the argument).
    """
    from crypten.mpc.primitives import ArithmeticSharedTensor

    x = _unfix(x)  # a fixed left operand moves like any share
    if not hasattr(x, "share"):
        raise TypeError(f"fixed_matmul needs a secret-shared x (MPCTensor), got {type(x).__name__}")
    if fixed.path == PATH_REPLICATED:
        from crypten.mpc.primitives import replicated

        ((x1, x2),) = replicated.replicate_shares([x.share])  # only x's share travels
        w1, w2 = fixed.w.share, fixed.d
        z = ring_matmul(x1, w1) + ring_matmul(x1, w2) + ring_matmul(x2, w1)
        from .dealer_free import rerandomize

        z = rerandomize(z)  # a PRZS, as ABY3: unmasked, party 2's z reaches party 1 (truncation) and leaks x, W
    else:
        a, c = _triple(x, fixed, _matmul_size(x.size(), fixed.shape))
        eps = _comm().all_reduce(x.share - a)  # the only opening: x - a, uniform
        z = c + ring_matmul(eps, fixed.w.share) + ring_matmul(a, fixed.d)
    out = ArithmeticSharedTensor.from_shares(z)
    sx, sw = x.encoder.scale, fixed.w.encoder.scale
    out.encoder = x.encoder if sx > 1 or sw == 1 else fixed.w.encoder
    if sx > 1 and sw > 1:
        out = out.div_(sx)  # truncation, as in CrypTen's matmul
    res = x.shallow_copy()
    res._tensor = out
    return res


def fixed_matmul_reference(x: torch.Tensor, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The float model: the masks cancel exactly in the ring, so the result is the plain product (float64)."""
    w = w.double()
    return x.double() @ (w.transpose(-2, -1) if transpose else w)
