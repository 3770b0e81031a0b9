"""Radix schedules of the comparison tournaments, chosen by modelled latency, and the layer cost model they use.

A tournament (the max of a softmax row, the vocabulary argmax, the stratified top-k of a cache policy) reduces m
entries in layers; a layer of radix r compares all r(r-1)/2 pairs of each group of r in one comparison layer and
multiplies out the winner in ceil(log2 r) product rounds. Few wide layers cost few rounds and many bytes, many
narrow ones the reverse; :func:`max_schedule`, :func:`strata_schedule` and :func:`lockstep_schedule` pick the
radices that minimise ``rounds x RTT + max-party bytes / bandwidth`` on a network profile (mpcache/latency.py),
by dynamic programming over the entries left. Every schedule is a public function of public sizes and the
protocol :class:`Setting`, so every party (and a dry run) derives the same one.

Why an analytic layer model here, when every reported cost comes from running the protocols themselves
(:mod:`mpcache.mpc.dryrun`): a search prices hundreds of candidate layers (616 for a 49,152-entry argmax) at
~microseconds each; a dry run of one layer takes ~10 ms. The model covers only the primitives a layer is made of
(openings, Beaver products, binary ANDs of the comparison circuits), and
``tests/test_costs.py::test_layer_model_equals_dry_runs`` checks it against dry runs of the layer protocol
itself (``ops._onehot_radix_levels``) at sampled shapes in every setting, so a protocol change that moves a
layer's cost fails there, naming this file.

Cost conventions (64-bit ring, 8 bytes per element, n compute parties), as :mod:`mpcache.mpc.ledger` counts:
an opening of N elements is (n-1)·8·N bytes each way and 1 round; a Beaver product opens both operands (1 round;
with TTP party 0's dealer traffic is not modelled: it has no round, the search never prices it, and it depends on
the tuples pooled before -- mpcache/mpc/dealer.py -- so only dry runs count it); a replicated product sends each party's share of both
operands to the next party (1 round); CrypTen's comparison ``_ltz`` is an A2B adder (1 AND + 6 prefix levels)
per halving of the n sharings and a B2A opening: 8 rounds and 216 B per element in 2PC; the lean 32-bit-lane
comparison (``ops._ltz_lean``) is bit-sliced (64 elements a word per bit plane): 2PC 1 + 4 levels + B2A, 6 rounds,
~25 B.
Leakage: none (public sizes only).
"""

from __future__ import annotations

import functools
import math
import pickle
from dataclasses import dataclass, field

import torch

SCALE = 2**16  # CrypTen's default fixed-point scale
SPK_LEVELS = 6  # log2(64): levels of the carry tree of one binary adder


@dataclass(frozen=True)
class Setting:
    """n compute parties, ``protocol`` arithmetic (Beaver) | replicated (3PC), ``provider`` tfp | ttp | none
    (dealer-free 3PC, replicated only)."""

    n: int = 2
    protocol: str = "arithmetic"
    provider: str = "tfp"

    def __post_init__(self):
        if self.protocol not in ("arithmetic", "replicated"):
            raise ValueError(f"protocol must be arithmetic or replicated, got {self.protocol!r}")
        if self.provider not in ("tfp", "ttp", "none"):
            raise ValueError(f"provider must be tfp, ttp or none, got {self.provider!r}")
        if self.provider == "none" and self.protocol != "replicated":
            raise ValueError("provider none (dealer-free) needs the replicated protocol (3 parties)")
        if self.protocol == "replicated" and self.n != 3:
            raise ValueError("the replicated protocol needs exactly 3 parties")
        if self.protocol == "arithmetic" and self.n != 2:
            raise ValueError("arithmetic sharing runs 2 compute parties; use replicated for 3")

    @property
    def label(self) -> str:
        return f"{self.n}PC {self.protocol} {'dealer-free' if self.provider == 'none' else self.provider.upper()}"


KINDS = ("online", "dealer")
FIELDS = ("bytes_sent", "bytes_recv", "rounds")


ELT = 8  # bytes per ring element (int64)


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
        return {
            "bytes_sent": self.get("bytes_sent", "online"),
            "bytes_recv": self.get("bytes_recv", "online"),
            "rounds": max(self.get("rounds")),
            "online_rounds": max(self.get("rounds", "online")),
            "dealer_bytes": self.get("bytes_recv", "dealer"),
            "dealer_sent": self.get("bytes_sent", "dealer"),
        }

    def __repr__(self):
        return f"Cost({self.summary()})"


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def _size(shape) -> torch.Size:
    return torch.Size([int(s) for s in shape])


def _bshape(*shapes) -> torch.Size:
    """Broadcast shape, in plain Python (torch.broadcast_shapes imports sympy on first use: ~3 s per process)."""
    shapes = [tuple(_size(s)) for s in shapes]
    n = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (n - len(s)) + s for s in shapes]):
        big = {d for d in dims if d != 1}
        if len(big) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(big.pop() if big else 1)
    return torch.Size(out)


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
    return len(pickle.dumps(obj)) + 4  # the ledger's count for send_obj/recv_obj


def _bilinear(s: Setting, op: str, xshape, yshape, out_shape, trunc: bool) -> Cost:
    xshape, yshape = _size(xshape), _size(yshape)
    nb = _numel(xshape) + _numel(yshape)
    c = Cost(s.n)
    if s.protocol == "replicated":
        for r in range(s.n):
            c.add(r, ELT * nb, ELT * nb, 1)
    else:
        c += open_(s, nb)
    assert not trunc, "layer products multiply ring integers (bits x values): never truncated"
    return c


def mul(s: Setting, xshape, yshape, trunc: bool = True) -> Cost:
    """Elementwise product of two shares (broadcasting); ``trunc`` when both are fixed-point (scale > 1)."""
    return _bilinear(s, "mul", xshape, yshape, _bshape(xshape, yshape), trunc)


def _and(s: Setting, xshape, yshape) -> Cost:
    """Binary Beaver AND (always from the provider's triples, whatever the protocol)."""
    return open_(s, _numel(xshape) + _numel(yshape))


def _adder(s: Setting, shape) -> Cost:
    """circuit.add of two binary sharings of ``shape``: S = x & y, then the SPK tree (operands broadcast to 2x)."""
    shape = _size(shape)
    c = _and(s, shape, shape)
    sp = _size((2, *shape))
    for _ in range(SPK_LEVELS):
        c += _and(s, sp, sp)
    return c


def b2a(s: Setting, shape) -> Cost:
    """CrypTen's B2A_single_bit of a bit sharing of ``shape``: the provider's B2A tuple and the opening of
    ``x ^ r`` (1 round); dealer-free 3PC (mpcache/mpc/dealer_free.py) adds, in the same exchange, 8 bytes per
    element from party 1 to party 2."""
    shape = _size(shape)
    c = open_(s, shape.numel())
    if s.provider == "none":
        c.add(1, sent=ELT * shape.numel()).add(2, recv=ELT * shape.numel())
    return c


def ltz(s: Setting, shape) -> Cost:
    """``MPCTensor._ltz`` (the comparison [x < 0]) of a share of ``shape``: A2B (binary tree of adders over the n
    parties' shares) and B2A of the sign bit."""
    shape = _size(shape)
    c = Cost(s.n)
    k = s.n
    one = _size((1, *shape))
    while k > 1:  # BinarySharedTensor.sum's log-reduction over the n stacked sharings
        c += _adder(s, one)
        k = k // 2 + k % 2
    return c + b2a(s, shape)


def ltz_lanes(s: Setting, shape, width: int = 32) -> Cost:
    """compare._ltz_lanes, bit-sliced (W = ceil(N/64) words a plane): with 3 parties, party 2's share to party 0
    first (1 round, N elements); the blocks' cross ANDs in one round (blocks of compare.block_size(width, N)
    positions), then the levels (compare.and_planes_2pc); then the packed B2A (W words opened; dealer-free: + 8 B
    per element from party 1 to party 2)."""
    from .compare import and_planes_2pc, block_size

    N = _numel(shape)
    W = -(-N // 64)
    c = Cost(s.n)
    if s.n == 3:
        c.add(2, sent=ELT * N).add(0, recv=ELT * N, rounds=1)
    for planes in and_planes_2pc(width, block_size(width, N)):
        c += _and(s, (planes, W), (planes, W))
    c += open_(s, W)
    if s.provider == "none":
        c.add(1, sent=ELT * N).add(2, recv=ELT * N)
    return c


def ltz_lean(s: Setting, shape) -> Cost:
    """ops._ltz_lean: :func:`ltz_lanes` at width 32."""
    return ltz_lanes(s, shape, 32)


def _cmp(s: Setting, shape, lean: bool) -> Cost:
    return ltz_lean(s, shape) if lean else ltz(s, shape)


# ---- layers of the tournaments -------------------------------------------------------------------------------
def _product_rounds(r: int, w: int) -> list[list[int]]:
    """The product tree of one radix-r level of the one-hot tournament: r - 1 bits (width 1) and the member's
    vector [value, one-hot] (width 1 + w), paired left to right each round (the vector is always last).
    Returns, per round, the widths of its pairs (one batched product per round)."""
    widths = [1] * (r - 1) + [1 + w]
    rounds = []
    while len(widths) > 1:
        pairs = [max(widths[i], widths[i + 1]) for i in range(0, len(widths) - 1, 2)]
        rounds.append(pairs)
        widths = pairs + widths[2 * len(pairs) :]
    return rounds


def masked_max(s: Setting, r: int, lean: bool) -> bool:
    """Whether ops.tree_max runs a radix-r layer on a mask plan (tournament._masked_max_layer): 2PC with TFP or the
    dealer, the lean comparison, r <= tournament.MASKED_MAX_RADIX (with ``MpcConfig.masked_acts``, the default)."""
    from .tournament import MASKED_MAX_RADIX

    return s.n == 2 and s.protocol == "arithmetic" and s.provider in ("tfp", "ttp") and lean and r <= MASKED_MAX_RADIX


def max_layer(s: Setting, lead, m: int, r: int, lean: bool, masked: bool = True) -> Cost:
    """One layer of ops.tree_max over m entries with radix r (r <= m) for the leading shape ``lead``.
    On a mask plan (:func:`masked_max`): the comparisons (r = 2: one per pair; r >= 3: r (r - 1) per group) and the
    values opened in their first round, no product round. Otherwise, radix 2: 1 comparison of the h pairs and 1 mux product (bit x value, no truncation). Radix r
    (ops._radix_layer): one comparison layer over the r(r-1)/2 pairs of each of the G groups, then a product tree
    over the r bits/entries of each group (ring integers, no truncation)."""
    lead = tuple(_size(lead))
    if masked and masked_max(s, r, lean):  # tournament._masked_max_layer: the comparison, its values opened beside it
        n_cmp, n_val = ((*lead, m // 2), (*lead, m // 2)) if r == 2 else ((*lead, -(-m // r), r * (r - 1)), None)
        c = _cmp(s, n_cmp, lean)
        vals = _numel(n_val if n_val is not None else (*lead, -(-m // r), r))
        for rank in range(s.n):
            c.add(rank, ELT * vals, ELT * vals)
        return c
    if r == 2:
        hs = (*lead, m // 2)
        return _cmp(s, hs, lean) + mul(s, hs, hs, trunc=False)
    G = -(-m // r)  # ops._onehot_radix_levels: flat comparisons and flat products
    c = _cmp(s, (_numel((*lead, G, r * (r - 1) // 2)),), lean)
    k = r
    while k > 1:
        n = _numel((*lead, G, r, k // 2))
        c += mul(s, (n,), (n,), trunc=False)
        k = k // 2 + k % 2
    return c


def strata_level(s: Setting, lead, n: int, w: int, r: int, lean: bool, ones: bool = False) -> Cost:
    """One level of ops.strata_select: n survivors per stratum carrying one-hots of width w, radix r <= n
    (ops._onehot_radix_level, r = 2 included): the r(r-1)/2 pairs of each of the G groups in one comparison
    layer, then the product tree's rounds (_product_rounds), ring integers; on a mask plan where
    :func:`masked_level` (tournament._masked_levels: the comparisons, the opened values, no product round).
    ``ones``: the first level, whose width-1 one-hots are public (on a mask plan nothing is opened for them)."""
    return _lockstep(s, [(_numel(lead), n, 0 if ones and masked_level(s, r, 0, lean) else w, r)], lean)


def masked_level(s: Setting, r: int, w: int, lean: bool) -> bool:
    """Whether a radix-r level with one-hot payloads of width w (0: values only, or the public first one-hots) runs
    on a mask plan (tournament.masked_levels_ok): 2PC with TFP or the dealer, the lean comparison, r <=
    tournament.MASKED_MAX_RADIX (values) or MASKED_ONEHOT_RADIX (one-hots)."""
    from .tournament import MASKED_ONEHOT_RADIX

    return masked_max(s, r, lean) and (w == 0 or r <= MASKED_ONEHOT_RADIX)


def _lockstep(s: Setting, tasks, lean: bool) -> Cost:
    """ops._onehot_radix_levels over ``[(rows, n, w, r)]``: one comparison layer for all the tasks' pairs, then
    one product per round of the deepest product tree over every task's pairs of that round. On a mask plan (every
    task :func:`masked_level`; tournament._masked_levels): the comparisons (r = 2: one per group, r >= 3: r (r - 1))
    and the opened [value, one-hot] elements (r = 2: 1 + 2w per pair, r >= 3: r (1 + w)) in their first round."""
    if all(masked_level(s, r, w, lean) for _, _, w, r in tasks):
        n_cmp = n_open = 0
        for rows, n, w, r in tasks:
            G = n // 2 if r == 2 else -(-n // r)  # radix 2: an odd survivor out passes through
            n_cmp += rows * G * (1 if r == 2 else r * (r - 1))
            n_open += rows * G * (1 + 2 * w if r == 2 else r * (1 + w))
        c = _cmp(s, (n_cmp,), lean)
        for rank in range(s.n):
            c.add(rank, ELT * n_open, ELT * n_open)
        return c
    n_cmp, trees = 0, []
    for rows, n, w, r in tasks:
        G = -(-n // r)
        n_cmp += rows * G * r * (r - 1) // 2
        trees.append([rows * G * r * sum(widths) for widths in _product_rounds(r, w)])
    c = _cmp(s, (n_cmp,), lean)
    for k in range(max(len(t) for t in trees)):
        n = sum(t[k] for t in trees if k < len(t))
        c += mul(s, (n,), (n,), trunc=False)
    return c


# ---- the searches ----------------------------------------------------------------------------------------------
def _radix_schedule(m: int, radix) -> list[int]:
    """Radices of the layers of a tournament over m entries: ``radix`` an int (every layer) or a sequence (used in
    order, its last entry repeated); a layer never uses a radix above the number of entries left."""
    rs = [radix] if isinstance(radix, int) else list(radix)
    out, i = [], 0
    while m > 1:
        r = min(rs[min(i, len(rs) - 1)], m)
        out.append(r)
        m, i = -(-m // r), i + 1
    return out


SCHEDULE_PROFILE = "lan"  # the default network profile whose latency the searches minimise (MpcConfig.schedule_profile)
SCHEDULE_RADICES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # candidate layer radices (and any r = m <= 64 last)


#: a schedule objective beside the network profiles: the fewest bytes, rounds only breaking ties -- for tournaments
#: off the critical path (MPCache's selection made ahead runs beside a layer whose rounds hide its own)
BYTES_FIRST = "bytes"


def schedule_profile(name: str):
    """The :class:`~mpcache.latency.NetworkProfile` a schedule search minimises: a named network profile, or
    :data:`BYTES_FIRST` (1 B/s and a negligible round trip: bytes decide, rounds break ties)."""
    from ..latency import PROFILES, NetworkProfile

    if name == BYTES_FIRST:
        return NetworkProfile(BYTES_FIRST, 8.0, 1e-9)
    return PROFILES[name]


def max_schedule(
    rows: int, m: int, lean: bool, setting: Setting, profile: str = SCHEDULE_PROFILE, masked: bool = True
) -> tuple[int, ...]:
    """The radix schedule of a tournament max over ``m`` entries in each of ``rows`` rows that minimises the modelled
    network latency ``rounds x RTT + bytes / bandwidth`` on ``SCHEDULE_PROFILE`` (LAN: 1 round ~ 112 KB), from the
    layer model above (tested equal to dry runs of the layer protocol). A public function
    of public sizes and the protocol setting (``setting``: a dry run's; None = the running session's), so
    every party and a dry run derive the same schedule. ``masked``: price the layers as ops.tree_max runs them
    (on mask plans where :func:`masked_max`); False for a tournament whose layers keep the product tree. Short rows get one or two wide layers (few rounds,
    few bytes in all); long rows start with cheap narrow layers. Dynamic programming over the entries left."""
    if m <= 1:
        return ()
    return _best_levels("max" if masked else "max_beaver", setting, int(rows), int(m), 0, bool(lean), profile)[1]


@functools.lru_cache(maxsize=1 << 16)
def _best_levels(kind: str, setting, rows: int, n: int, w: int, lean: bool, profile: str):
    """(modelled seconds, radices) of the cheapest tournament over ``n`` entries per row: ``kind`` "max" (values
    only, :func:`max_layer`; "max_beaver": its layers priced without mask plans, for tournaments that keep the
    product tree: the argmax's index payload), "levels" (values only through ops._onehot_radix_levels,
    :func:`_lockstep`: the head max and the side maxima of ops.strata_select) or "strata" (each level also multiplies
    the one-hots of width ``w`` carried so far, :func:`strata_level`; w = 1 is the public first level). Dynamic
    programming over the entries left (ceil(n / r) after a radix-r level). ``profile``: :func:`schedule_profile`."""
    if n <= 1:
        return 0.0, ()
    prof = schedule_profile(profile)
    best = None
    for r in sorted({r for r in SCHEDULE_RADICES if r < n} | ({n} if n <= SCHEDULE_RADICES[-1] else set())):
        if kind in ("max", "max_beaver"):
            cost = max_layer(setting, (rows,), n, r, lean, masked=kind == "max")
        elif kind == "levels":  # values only, through ops._onehot_radix_levels
            cost = _lockstep(setting, [(rows, n, 0, r)], lean)
        else:
            cost = strata_level(setting, (rows,), n, w, r, lean, ones=w == 1)
        sm = cost.summary()
        t = sm["rounds"] * prof.rtt_s + 8.0 * max(sm["bytes_sent"]) / prof.bandwidth_bps
        sub_t, sub = _best_levels(kind, setting, rows, -(-n // r), r * w, lean, profile)
        if best is None or t + sub_t < best[0]:
            best = (t + sub_t, (r, *sub))
    return best


def levels_schedule(
    rows: int, m: int, lean: bool, setting: Setting, profile: str = SCHEDULE_PROFILE
) -> tuple[int, ...]:
    """:func:`max_schedule` for a values-only tournament run through ops._onehot_radix_levels (the head max and the
    side maxima of ops.strata_select), each level priced by :func:`_lockstep` (on a mask plan where
    :func:`masked_level`)."""
    if m <= 1:
        return ()
    return _best_levels("levels", setting, int(rows), int(m), 0, bool(lean), profile)[1]


def strata_schedule(
    rows: int, g: int, lean: bool, radix="auto", setting: Setting | None = None, profile: str = SCHEDULE_PROFILE
) -> tuple[int, ...]:
    """The level radices of a stratified tournament over ``g`` slots per stratum (``rows`` strata in all): ``radix``
    an int (every level, capped at the survivors left) or a sequence (in order, the last repeated), or "auto": the
    schedule minimising the modelled latency on ``SCHEDULE_PROFILE`` (as :func:`max_schedule`, but each level
    also multiplies the one-hots carried so far, whose width grows with the radices before it)."""
    if radix != "auto":
        out, n = [], g
        rs = [radix] if isinstance(radix, int) else list(radix)
        while n > 1:
            r = min(rs[min(len(out), len(rs) - 1)], n)
            out.append(r)
            n = n // 2 + n % 2 if r == 2 else -(-n // r)
        return tuple(out)
    if g <= 1:
        return ()
    return _best_levels("strata", setting, int(rows), int(g), 1, bool(lean), profile)[1]


def lockstep_schedule(
    n: int, rows: int, caps: tuple, lean: bool, setting: Setting, profile: str = SCHEDULE_PROFILE
) -> tuple[int, ...]:
    """The level radices (1 = idle at that level) of a max over ``n`` entries in each of ``rows`` rows run in
    lockstep beside levels of radices ``caps`` (:func:`strata_select`), then its own levels for what is left.

    Beside a level of radix c, a level of radix r <= 2^ceil(log2 c) adds no round (its product tree is no deeper),
    only bytes; levels after ``caps`` add their rounds. Of the choices per level (idle, or a candidate radix within
    that bound) and :func:`max_schedule` for the rest, the one minimising the modelled latency (``SCHEDULE_PROFILE``:
    bytes / bandwidth + added rounds x RTT, from the layer model) is returned: e.g. 12 anchor columns beside one radix-11
    level take radix 12 there (no added round, a few KB), 16-row cluster summaries (tens of thousands of rows)
    take cheap narrow levels. A public function of public sizes and the setting."""
    return _lockstep_levels(int(n), int(rows), tuple(caps), bool(lean), setting, profile)


@functools.lru_cache(maxsize=4096)
def _lockstep_levels(n: int, rows: int, caps: tuple, lean: bool, setting, profile: str) -> tuple[int, ...]:
    prof = schedule_profile(profile)

    def seconds(c):
        sm = c.summary()
        return 8.0 * max(sm["bytes_sent"]) / prof.bandwidth_bps, sm["rounds"]

    @functools.cache
    def best(i: int, left: int):
        if left <= 1:
            return 0.0, ()
        if i == len(caps):
            sched = _radix_schedule(left, levels_schedule(rows, left, lean, setting, profile))
            t, m = 0.0, left
            for r in sched:
                b, rounds = seconds(_lockstep(setting, [(rows, m, 0, r)], lean))
                t += b + rounds * prof.rtt_s
                m = -(-m // r)
            return t, tuple(sched)
        bound = 1 << max(1, math.ceil(math.log2(caps[i])))
        out = None
        for r in [1] + sorted(
            {r for r in SCHEDULE_RADICES if r <= min(left, bound)} | ({left} if left <= bound else set())
        ):
            t = 0.0 if r == 1 else seconds(_lockstep(setting, [(rows, left, 0, r)], lean))[0]
            sub_t, sub = best(i + 1, -(-left // r))
            if out is None or t + sub_t < out[0]:
                out = (t + sub_t, (r, *sub))
        return out

    return best(0, int(n))[1]
