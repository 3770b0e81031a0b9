"""Tournaments on shares: the max (values only), the argmax and the top-k as one-hot rows, and the stratified top-k
of the cache policies (one winner per public stratum) with side maxima in lockstep. Each protocol is beside its float
model (``*_reference``) and states its rounds, bytes and leakage (shapes only). Radix schedules ("auto") come from
:mod:`mpcache.mpc.schedules`, for the setting of the :class:`~mpcache.mpc.config.MpcConfig` passed in.

Why one file (~550 lines): every tournament here runs on the same level protocol (``_onehot_radix_levels``: Beaver
product trees, or ``_masked_levels`` on a mask plan), whose radices the schedules price; splitting the max, the
argmax and the strata apart would split that one protocol from its users.
"""

from __future__ import annotations

import torch

from ..layout import STRATA_PAD, STRATA_PAD_LEAN, strata_layout
from .compare import _cat, _from_shares, _ltz, _minus_publics, _mul_public_int, _ring_ones
from .config import MpcConfig
from .masked import usable
from .schedules import _radix_schedule, levels_schedule, lockstep_schedule, max_schedule, strata_schedule


# ---- max -----------------------------------------------------------------------------------------------------
def _radix_layer(x, r: int, lean: bool):
    """One layer of a radix-r tournament along the last dim: (..., m) -> (..., ceil(m / r)).

    Groups of r (the last group padded by repeating the row's last entry: duplicates never change a max) compare
    all r(r-1)/2 pairs in ONE comparison layer; the winner of a group is the entry that beats every other (ties
    to the lower index, so exactly one wins), and the product of its r - 1 bits with the entry itself is formed
    in a multiplication tree of ceil(log2 r) rounds, on ring integers (bits times a share: exact, no truncation);
    the group max is the sum of those products. r = 2 is the classic compare + mux.
    Rounds: cmp + ceil(log2 r) mul.  Bytes/party: (r-1)/2 comparisons + ~(r-1) products per entry.
    """
    return _onehot_radix_level(x, None, r, lean)[0]


def tree_max(x, dim: int = -1, keepdim: bool = False, *, radix=2, lean: bool = False, cfg: MpcConfig | None = None):
    """Maximum along ``dim`` by a tournament: values only (no argmax one-hot, no random tie-break,
    unlike CrypTen's ``max(dim)``, which spends ~45% more bytes on them). Exact: the result is one of the entries.

    ``radix`` (int or sequence of layer radices, see ``_radix_layer``): 2 = the pairwise tree (ceil(log2 m) x
    (cmp + 1 mul)); higher radices trade bytes for rounds. ``lean``: use ``_ltz_lean`` (32-bit lanes, bit-sliced:
    6 rounds and ~25 bytes per comparison in 2PC instead of 8 and 216), valid when every difference of two entries is below
    2^15 in magnitude (|x| < 16384).
    Rounds: sum over layers of cmp + ceil(log2 r) mul.  Leaks: shapes only.
    """
    dim = dim % x.dim()
    x = x.transpose(dim, -1) if dim != x.dim() - 1 else x
    cfg = cfg or MpcConfig.current()
    if radix == "auto":
        radix = max_schedule(
            int(torch.Size(x.shape[:-1]).numel()), int(x.shape[-1]), lean, cfg.setting, cfg.schedule_profile
        )
    for r in _radix_schedule(x.shape[-1], radix):
        if lean and r <= MASKED_MAX_RADIX and usable(cfg):
            x = _masked_max_layer(x, r, cfg.lockstep)
        elif r == 2:  # compare + mux: 1 product per pair
            m = x.shape[-1]
            h = m // 2
            a, b = x[..., :h], x[..., h : 2 * h]
            d = a - b
            top = b + d * (1 - _ltz(d, lean))  # max(a, b) = b + (a - b) * [a - b >= 0]
            x = top if m % 2 == 0 else _cat([top, x[..., 2 * h :]], dim=-1)
        else:
            x = _radix_layer(x, r, lean)
    if dim != x.dim() - 1:
        x = x.transpose(dim, -1)  # the size-1 reduced axis goes back to ``dim``
    return x if keepdim else x.squeeze(dim)


#: the widest radix whose layer runs on a mask plan (its winners' monomials have r - 1 bit factors: 2^r terms)
MASKED_MAX_RADIX = 8


def _masked_max_layer(x, r: int, lockstep: bool = True):
    """One max layer of radix r on a mask plan: :func:`_masked_levels` with values only (2PC with TFP or the dealer,
    the lean comparison). The mux is local, so a layer takes the comparison's rounds only (the Beaver layers add
    ceil(log2 r) product rounds). r = 2: d = a - b opened once beside the comparison's first round, max = b + [d >= 0] d;
    r >= 3: each pair compared twice, the group's values opened once, the max sum_i f_0 ... f_(r-2) v_i. Bytes (2PC):
    the comparisons + 8 B per value. Exact. Leaks: shapes only. Float model: :func:`tree_max_reference`."""
    return _masked_levels([(x, None, r)], lockstep)[0][0]


def tree_max_reference(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    return x.max(dim=dim, keepdim=keepdim).values


# ---- argmax and top-k as one-hot rows ------------------------------------------------------------------------
def argmax_index(x, cfg: MpcConfig | None = None):
    """The index of the first maximum along the last dim, as a share (..., 1) at scale 1 (ring integers): a
    tournament that carries each survivor's index beside its value, so nothing of size m is built after the max.

    Radix-2 layers pair ADJACENT survivors (2i, 2i + 1: each survivor stands for a contiguous block, so "ties to the
    left" is "ties to the lower index" at every layer): d = a - b, one comparison [d >= 0], then ONE product of the
    bit with [d, i_a - i_b] (bit times ring elements: exact). Wider layers (radix r >= 3, from the schedule): the
    one-hot tournament level of :func:`_onehot_radix_level` with the index as a width-1 payload, summed.
    Radices: ``cfg.argmax_radix`` ("auto": :func:`max_schedule`). Exact (a mux of ring elements).
    Rounds per radix-2 layer: cmp + 1 (8 lean). Bytes (2PC, lean): per pair 96 (cmp) + 24 (the bit and the two
    differences opened) -> ~120 B per entry over an all-radix-2 tree (128 rounds at m = 49,152); the LAN schedule
    ("auto") takes ~143 B per entry and 65 rounds there (the one-hot argmax it replaces: ~340 B and 80 rounds: the
    max tree, then [x >= max] and a tie-break comparison over all m). Leaks: shapes only (the index stays shared; the caller
    opens it to one party, e.g. the generated token to the client). Float model: :func:`argmax_index_reference`."""
    cfg = cfg or MpcConfig.current()
    lean = cfg.argmax_lean
    m = int(x.shape[-1])
    lead = tuple(int(d) for d in x.shape[:-1])
    radix = cfg.argmax_radix
    if radix == "auto":
        # priced with the Beaver layers it runs (its index payload keeps the product tree)
        radix = max_schedule(int(torch.Size(lead).numel()), m, lean, cfg.setting, cfg.schedule_profile, masked=False)
    ones = _ring_ones(x)  # a public constant's sharing (party 0 holds it), scale 1
    idx = _mul_public_int(ones, torch.arange(m, dtype=torch.long).expand(*lead, m))
    v = x
    for r in _radix_schedule(m, radix):
        n = int(v.shape[-1])
        if r == 2:
            h = n // 2
            a, b, ia, ib = (
                v[..., 0 : 2 * h : 2],
                v[..., 1 : 2 * h : 2],
                idx[..., 0 : 2 * h : 2],
                idx[..., 1 : 2 * h : 2],
            )
            d = a - b
            bit = 1 - _ltz(d, lean)  # [a >= b]: the left (lower index) wins ties
            di = ia - ib
            di.encoder = d.encoder  # the product's operands share an encoding (bit x ring integer: exact either way)
            y = bit.unsqueeze(0) * _stack2(d, di)
            top, itop = b + y[0], ib + _as_int(y[1], ib)
            if n % 2:
                top, itop = _cat([top, v[..., n - 1 :]], dim=-1), _cat([itop, idx[..., n - 1 :]], dim=-1)
            v, idx = top, itop
        else:
            v, payload = _onehot_radix_level(v, idx.unsqueeze(-1), r, lean)
            idx = payload.sum(-1)
    return idx


def _stack2(a, b):
    import crypten

    return crypten.stack([a, b])


def _as_int(y, like):
    """``y``'s shares with ``like``'s encoding (scale 1): the product of a scale-1 bit and a scale-1 index."""
    out = like.clone()
    out.share = y.share
    return out


def argmax_index_reference(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1, keepdim=True).double()


def _pairwise_rank(s):
    """rank_i = #{j : s_j > s_i, or s_j == s_i and j < i}: the position of item i in a stable descending sort.

    One comparison layer over all m*m pairs: for j < i the bit is [s_j - s_i >= 0], for j > i it is
    1 - [s_i - s_j >= 0]; both come from one ``_ltz`` of w_ij = (s_j - s_i) * sign_ij (sign public).
    """
    m = s.shape[-1]
    diff = s.unsqueeze(-2) - s.unsqueeze(-1)  # [..., i, j] = s_j - s_i
    lower = torch.tril(torch.ones(m, m), diagonal=-1)  # j < i
    upper = torch.triu(torch.ones(m, m), diagonal=1)  # j > i
    neg = _mul_public_int(diff, (lower - upper).long())._ltz()  # [w_ij < 0]
    # j < i: [s_j >= s_i] = 1 - neg ; j > i: [s_j > s_i] = 1 - [s_i - s_j >= 0] = neg ; diagonal: 0
    bits = (1 - neg) * lower + neg * upper
    return bits.sum(-1)  # (..., m), integer-valued (scale 1)


def _onehot_of_small_int(v, k: int):
    """(..., k, m) with row r = [v == r] for integer-valued shares v (..., m), via [v >= r] - [v >= r+1]."""
    ge = 1 - _minus_publics(v, [float(r) for r in range(k + 1)])._ltz()  # (k+1, ..., m)
    oh = ge[:k] - ge[1:]  # (k, ..., m)
    perm = list(range(1, oh.dim() - 1)) + [0, oh.dim() - 1]
    return oh.permute(*perm)


def topk_onehot(scores, k: int):
    """Rows (..., k, m): row r is the one-hot of the r-th largest score (stable: ties to the lower index).

    Rank by pairwise comparison, then one-hot rows by a second batched comparison layer — constant rounds,
    unlike k sequential argmax passes (k * log2 m layers).
    Rounds: 2 cmp.  Bytes/party: m^2 + (k+1) m comparisons per row.  Leaks: shapes only.
    """
    m = scores.shape[-1]
    if not 0 < k <= m:
        raise ValueError(f"top-k needs 0 < k <= {m}, got k={k}")
    return _onehot_of_small_int(_pairwise_rank(scores), k)


def keep_onehot(scores, k: int):
    """Rows (..., k, m) selecting the k largest scores, rows in increasing position order (for compaction).

    keep_i = [rank_i < k]; the kept items' output slots are the prefix sums p_i of keep (local); dropped items
    are pushed out of range by adding 2k (local), and one batched comparison layer builds the rows.
    Rounds: 3 cmp.  Bytes/party: m^2 + m + (k+1) m comparisons per row.  Leaks: shapes only.
    """
    m = scores.shape[-1]
    if not 0 < k <= m:
        raise ValueError(f"top-k needs 0 < k <= {m}, got k={k}")
    rank = _pairwise_rank(scores)
    keep = (rank - float(k))._ltz()  # [rank < k]
    slot = keep.cumsum(-1) - keep + (1 - keep) * float(2 * k)
    return _onehot_of_small_int(slot, k)


# ---- stratified top-k: one winner per public stratum, O(m) comparisons -----------------------------------------


def _onehot_radix_level(v, oh, r: int, lean: bool):
    """One level of the one-hot tournament: survivors (..., n) with one-hots (..., n, w) -> (..., ceil(n/r)) and
    (..., ceil(n/r), r·w) (``oh=None``: values only, w = 0 — a radix-r max layer). Groups of r consecutive survivors (the last padded by repeating the last survivor: a
    duplicate ties it and loses to the lower index) compare all r(r-1)/2 pairs in one comparison layer; member
    i's indicator is the product of its r - 1 "beats" bits, multiplied into [v_i, oh_i] in the same product tree
    (ceil(log2 r) rounds, ring integers: exact). The group's value is the sum of the products; its one-hot is
    their concatenation, so the original slot order is kept (padding only ever adds trailing zero slots)."""
    return _onehot_radix_levels([(v, oh, r)], lean)[0]


#: a task's one-hot payload that is every survivor's public width-1 one-hot (a tournament's first level): on a mask
#: plan the new one-hots are then the winners' indicators themselves, nothing opened for them
ONES = "ones"

#: the widest radix of a one-hot level on a mask plan (a winner's monomial: r - 1 bits and its payload, 2^r terms)
MASKED_ONEHOT_RADIX = 4


def masked_levels_ok(tasks, lean: bool, cfg: MpcConfig | None = None) -> bool:
    """Whether :func:`_onehot_radix_levels` runs ``[(v, oh, r)]`` on a mask plan (:func:`_masked_levels`): 2PC with
    TFP or the dealer (:func:`mpcache.mpc.masked.usable`), the lean comparison, radices within the plan's bounds
    (values and :data:`ONES`: :data:`MASKED_MAX_RADIX`; secret one-hots: :data:`MASKED_ONEHOT_RADIX`). The same rule
    as :func:`mpcache.mpc.schedules.masked_level`, which prices the levels."""
    cfg = cfg or MpcConfig.current()
    return (
        lean
        and usable(cfg)
        and all(r <= (MASKED_MAX_RADIX if oh is None or oh is ONES else MASKED_ONEHOT_RADIX) for _, oh, r in tasks)
    )


def _masked_levels(tasks, lockstep: bool = True) -> list:
    """:func:`_onehot_radix_levels` on ONE mask plan (:mod:`mpcache.mpc.masked`; 2PC with TFP or the dealer, the lean
    comparison): every task's comparisons in one comparison, every survivor's [value, one-hot] opened once beside its
    first round, and the winners' products local -- a level costs the comparison's rounds alone, no product round.

    Radix 2 (groups of two consecutive survivors; an odd last one passes through unpaired, its one-hot [oh, 0]: what
    a duplicate that ties would give): d = a - b, one comparison, the
    bit f = [d >= 0] a bit slot; P = [d, oh_a, oh_b] opened; the winner's value is b + f d and its one-hot
    [f oh_a, oh_b - f oh_b] (one monomial f P). Radix r >= 3 (as :func:`_masked_max_layer`): each pair compared
    twice (member i's r - 1 "beats" bits are its own bit slots), P = [v_i, oh_i] opened, member i's product
    f_0 ... f_(r-2) P_i one monomial (2^r terms). ``oh`` = :data:`ONES` (every survivor's public one-hot): the
    one-hots are the indicators themselves, nothing opened for them; None: values only.
    Bytes (2PC): the comparisons (r = 2: one per pair, floor(n / 2); r >= 3: r (r - 1) per group of the ceil(n / r))
    + 8 B per opened element (r = 2: 1 + 2w per pair; r >= 3: r (1 + w) per group; w = 0 for ONES or values only).
    Rounds: the comparison's.
    Exact (a mux of ring elements), ties to the lower index as :func:`_onehot_radix_level`. Leaks: shapes only.
    Float model: :func:`strata_top1_onehot_reference` / :func:`tree_max_reference`."""
    import crypten.communicator as comm

    from .compare import _ltz_lanes
    from .lockstep import parallel
    from .masked import BIT, RING, Plan

    rank = comm.get().get_rank()
    slots, monos, diffs, bits, opens, preps = {}, [], [], [], [], []
    for t, (v, oh, r) in enumerate(tasks):
        n, dev = int(v.shape[-1]), v.share.device
        lead = tuple(int(d) for d in v.shape[:-1])
        ones = oh is ONES
        w = 0 if oh is None or ones else int(oh.shape[-1])
        G = -(-n // r)
        if r == 2:  # an odd survivor out passes through, unpaired (its one-hot [oh, 0]: as a duplicate that ties)
            G = n // 2
        idx = torch.tensor(list(range(min(n, G * r))) + [n - 1] * (G * r - n), device=dev)
        sv = v.share.index_select(v.dim() - 1, idx).reshape(*lead, G, r)
        so = None if w == 0 else oh.share.index_select(oh.dim() - 2, idx).reshape(*lead, G, r, w)
        if r == 2:
            d = sv[..., 0] - sv[..., 1]
            names = [f"f{t}"]
            slots[names[0]] = ((*lead, G, 1), BIT)
            diffs.append(d.reshape(-1))
            pay = d.unsqueeze(-1) if so is None else torch.cat([d.unsqueeze(-1), so[..., 0, :], so[..., 1, :]], -1)
        else:
            opp = torch.tensor([[j for j in range(r) if j != i] for i in range(r)], device=dev).t()  # (r - 1, r)
            dd = sv.unsqueeze(0) - sv[..., opp].movedim(-2, 0)  # (r - 1, ..., G, r): v_i - v_(opp[t][i])
            if rank == 0:  # i > j loses ties: compare v_i - v_j - 1 (ring units)
                dd = dd - (torch.arange(r, device=dev) > opp).long().reshape(r - 1, *([1] * (len(lead) + 1)), r)
            names = [f"f{t}_{j}" for j in range(r - 1)]
            slots.update({nm: ((*lead, G, r, 1), BIT) for nm in names})
            diffs.append(dd.reshape(-1))
            pay = sv.unsqueeze(-1) if so is None else torch.cat([sv.unsqueeze(-1), so], -1)
        slots[f"p{t}"] = (tuple(pay.shape), RING)
        monos.append((*names, f"p{t}"))  # its closure holds the bits' products too (the ONES indicators)
        bits += names
        opens.append((f"p{t}", _from_shares(pay, precision=None)))
        preps.append((v, oh, r, w, ones, lead, G, sv, so, names, n))
    plan = Plan(slots, monos, device=tasks[0][0].share.device)
    dx = _from_shares(torch.cat(diffs), precision=None)
    dx.encoder = tasks[0][0].encoder
    parallel(
        lambda: _ltz_lanes(dx, 32, 0, b2a=plan.b2a(*bits, complement=True)),
        lambda: plan.open(opens),
        enabled=lockstep,
    )
    results = []
    for t, (v, oh, r, w, ones, lead, G, sv, so, names, n) in enumerate(preps):
        fp = plan.raw((*names, f"p{t}"))
        if r == 2:
            top = sv[..., 1] + fp[..., 0]
            if ones:
                f = plan.raw((names[0],))  # (..., G, 1)
                new = torch.cat([f, (1 if rank == 0 else 0) - f], -1)
            elif w:
                new = torch.cat([fp[..., 1 : 1 + w], so[..., 1, :] - fp[..., 1 + w :]], -1)
            if n % 2:  # the unpaired last survivor: its value, its one-hot then zeros
                top = torch.cat([top, v.share[..., n - 1 :]], -1)
                if ones:
                    last = torch.zeros(*lead, 1, 2, dtype=torch.long, device=top.device)
                    if rank == 0:
                        last[..., 0] = 1
                    new = torch.cat([new, last], -2)
                elif w:
                    last = oh.share[..., n - 1 :, :]
                    new = torch.cat([new, torch.cat([last, torch.zeros_like(last)], -1)], -2)
        else:
            top = fp[..., 0].sum(-1)
            if ones:
                new = plan.raw(tuple(names)).reshape(*lead, G, r)
            elif w:
                new = fp[..., 1:].reshape(*lead, G, r * w)
        top = _from_shares(top, precision=None)
        top.encoder = v.encoder
        if oh is None:
            results.append((top, None))
            continue
        if ones:
            new_oh = _from_shares(new, precision=0)
        else:
            new_oh = _from_shares(new, precision=None)
            new_oh.encoder = oh.encoder
        results.append((top, new_oh))
    return results


def _onehot_radix_levels(tasks, lean: bool, masked: bool = False) -> list:
    """Independent levels ``[(v, oh, r)]`` of :func:`_onehot_radix_level` in lockstep: ONE comparison layer for
    all their pairs (their differences concatenated) and one batched product per product-tree round, so the
    rounds are those of the deepest tree alone (cmp + ceil(log2 max r)) and the bytes the sum. Exact, as alone.
    ``masked`` (where :func:`masked_levels_ok`): on a mask plan instead (:func:`_masked_levels`: no product round).
    ``oh`` may be :data:`ONES` (the public first-level one-hots)."""
    if masked:
        return _masked_levels(tasks, MpcConfig.current().lockstep)
    tasks = [(v, _ring_ones(v).unsqueeze(-1) if oh is ONES else oh, r) for v, oh, r in tasks]
    preps, diffs = [], []
    for v, oh, r in tasks:
        n, w = int(v.shape[-1]), 0 if oh is None else int(oh.shape[-1])
        lead = tuple(int(d) for d in v.shape[:-1])
        G = -(-n // r)
        idx = torch.tensor(list(range(n)) + [n - 1] * (G * r - n))
        sv = v.share.index_select(v.dim() - 1, idx.to(v.share.device)).reshape(*lead, G, r)
        iu, ju = torch.triu_indices(r, r, offset=1)
        diffs.append(sv[..., iu] - sv[..., ju])  # v_i - v_j for i < j
        preps.append((v, oh, r, w, lead, G, idx, sv, iu, ju))
    d = _from_shares(torch.cat([x.reshape(-1) for x in diffs]), precision=None)
    d.encoder = tasks[0][0].encoder
    b_all = 1 - _ltz(d, lean)  # [v_i >= v_j]: i beats j
    nb_all = (1 - b_all).share
    trees, at = [], 0
    for (v, oh, r, w, lead, G, idx, sv, iu, ju), x in zip(preps, diffs):
        b, nb = b_all.share[at : at + x.numel()].reshape(x.shape), nb_all[at : at + x.numel()].reshape(x.shape)
        at += x.numel()
        pair = {(int(i), int(j)): t for t, (i, j) in enumerate(zip(iu, ju))}
        opponents = [[j for j in range(r) if j != i] for i in range(r)]
        factors = []
        for t in range(r - 1):  # member i's t-th opponent
            cols = [
                b[..., pair[(i, j)]] if i < j else nb[..., pair[(j, i)]]
                for i, j in ((i, opponents[i][t]) for i in range(r))
            ]
            factors.append(torch.stack(cols, dim=-1).unsqueeze(-1))  # (..., G, r, 1)
        vec = sv.unsqueeze(-1)  # (..., G, r, 1 + w)
        if oh is not None:
            so = oh.share.index_select(oh.dim() - 2, idx.to(oh.share.device)).reshape(*lead, G, r, w)
            vec = torch.cat([vec, so], dim=-1)
        factors.append(vec)
        trees.append(factors)
    while any(len(f) > 1 for f in trees):  # one batched product per round
        plans, left_flat, right_flat = [], [], []
        for factors in trees:
            if len(factors) <= 1:
                plans.append(None)
                continue
            left, right = [], []
            for i in range(0, len(factors) - 1, 2):
                a, c = factors[i], factors[i + 1]
                width = max(a.shape[-1], c.shape[-1])
                left.append(a.expand(*a.shape[:-1], width))
                right.append(c.expand(*c.shape[:-1], width))
            lt = torch.cat(left, -1)
            plans.append((left, lt.shape))
            left_flat.append(lt.reshape(-1))
            right_flat.append(torch.cat(right, -1).reshape(-1))
        prod = (
            _from_shares(torch.cat(left_flat), precision=0) * _from_shares(torch.cat(right_flat), precision=0)
        ).share
        at = 0
        for ti, plan in enumerate(plans):
            if plan is None:
                continue
            left, shape = plan
            p = prod[at : at + shape.numel()].reshape(shape)
            at += shape.numel()
            out, col = [], 0
            for x in left:
                out.append(p[..., col : col + x.shape[-1]])
                col += x.shape[-1]
            trees[ti] = out + trees[ti][2 * len(left) :]
    results = []
    for (v, oh, r, w, lead, G, *_), factors in zip(preps, trees):
        f = factors[0]  # (..., G, r, 1 + w): indicator x [v_i, oh_i]
        top = _from_shares(f[..., 0].sum(-1), precision=None)
        top.encoder = v.encoder
        if oh is None:
            results.append((top, None))
            continue
        new_oh = _from_shares(f[..., 1:].reshape(*lead, G, r * w), precision=None)
        new_oh.encoder = oh.encoder
        results.append((top, new_oh))
    return results


def strata_top1_onehot(
    scores, k: int, lean: bool | None = None, radix=None, cfg: MpcConfig | None = None, interleave: bool = False
):
    """Compact one-hot rows (..., k, g), ring 0/1 at scale 1 (so products with it need no truncation): row r marks
    the first maximum of stratum r (see :func:`strata_layout`).

    A tournament per stratum that carries each survivor's one-hot. At each level (radices: ``radix``, default
    ``cfg.strata_radix``) groups of r survivors (:func:`_onehot_radix_level`; r = 2: adjacent pairs) compare all
    their pairs in one comparison layer for all strata and leading dims, and ceil(log2 r) product rounds give
    both the winner's value and its one-hot; r = 4 needs ~half the levels of the pairwise tree at ~3x its first
    level's comparisons. Ties go to the lower index. Unlike the exact top-k
    (:func:`topk_onehot`, m^2 comparisons), this costs O(m) comparisons: the budget is spread evenly over the
    position range (exactly one winner per stratum).
    ``lean`` (default ``cfg.select_lean``): comparisons in 32-bit lanes (6 rounds / ~25 B instead of 8 / 216 B in 2PC),
    exact while |score| < 12288 (MPCache's scores are attention logits, q·rep / sqrt(d): O(10)).
    Rounds: per level cmp + ceil(log2 r) (radix 4 and g = 10: 2 x 9 = 18, pairwise 4 x 8 = 32).
    Bytes/party: per level r(r-1)/2 comparisons per group of r survivors + the products.
    Leaks: shapes only (the strata are public functions of m and k).
    """
    return strata_select(scores, k, lean=lean, radix=radix, cfg=cfg, interleave=interleave)[0]


def strata_select(
    scores,
    k: int,
    *,
    heads: bool = False,
    also=(),
    lean: bool | None = None,
    radix=None,
    cfg: MpcConfig | None = None,
    interleave: bool = False,
    profile: str | None = None,
):
    """:func:`strata_top1_onehot` with two fusions that save whole comparison layers. Returns (one-hot, maxima).

    ``heads=True``: ``scores`` is (..., G, m), one score per query head of a group, and a candidate's score is
    its max over the G heads: first values-only max levels over the heads (:func:`levels_schedule`; folding the
    heads into the tournament's entries instead makes every level carry G times wider one-hots, which measured more
    bytes and no fewer rounds at SmolLM2's G = 3). ``also``: tensors (..., a) whose max along the last dim is wanted too (MPCache:
    the anchored softmax's offset, new clusters' summaries); their tournaments run in lockstep with the head max
    and the strata levels, in the same comparison layers and product rounds (:func:`_onehot_radix_levels`), with
    level radices from :func:`lockstep_schedule` (no added round beside a strata level; what is left after them
    adds its own). Every level, radix 2 included, is a radix level. ``interleave``: the strata of
    :func:`strata_layout` with ``interleave`` (same sizes, same costs). ``profile``: what the "auto" schedules
    minimise (default ``cfg.schedule_profile``; :data:`~mpcache.mpc.schedules.BYTES_FIRST` for a selection off the
    critical path). In 2PC with TFP or the dealer each level runs on a mask plan (:func:`_masked_levels`: no product
    round) where its radices allow.
    Rounds: per level index, cmp (+ ceil(log2 of the largest radix in use) off mask plans). Bytes: the sum. Exact.
    Leaks: shapes only.
    """
    cfg = cfg or MpcConfig.current()
    lean = cfg.select_lean if lean is None else lean
    radix = cfg.strata_radix if radix is None else radix
    profile = profile or cfg.schedule_profile
    pad = STRATA_PAD_LEAN if lean else STRATA_PAD
    m = int(scores.shape[-1])
    idx, valid = strata_layout(m, k, interleave)
    g = int(idx.shape[1])
    rows = int(torch.Size(scores.shape[: -2 if heads else -1]).numel()) * k
    G = int(scores.shape[-2]) if heads else 1
    heads_sched = (
        levels_schedule(int(torch.Size(scores.shape[:-2]).numel()) * m, G, lean, cfg.setting, profile) if G > 1 else ()
    )
    caps = tuple(heads_sched) + tuple(strata_schedule(rows, g, lean, radix, cfg.setting, profile))
    extra = list(also)
    plans = [
        lockstep_schedule(int(t.shape[-1]), int(torch.Size(t.shape[:-1]).numel()), caps, lean, cfg.setting, profile)
        for t in also
    ]
    step = 0

    def level(tasks):  # one lockstep level: the given tasks plus this level of every extra max
        nonlocal step
        live = [i for i, pl in enumerate(plans) if step < len(pl) and pl[step] > 1]
        every = tasks + [(extra[i], None, plans[i][step]) for i in live]
        outs = _onehot_radix_levels(every, lean, masked=masked_levels_ok(every, lean, cfg))
        for i, (top, _) in zip(live, outs[len(tasks) :]):
            extra[i] = top
        step += 1
        return outs[: len(tasks)]

    if G > 1:  # the max over the G heads: values-only levels (:func:`levels_schedule`), no one-hots to carry
        xh = scores.transpose(-1, -2)  # (..., m, G)
        for r in heads_sched:
            xh = level([(xh, None, r)])[0][0]
        scores = xh.squeeze(-1)
    elif heads:
        scores = scores.squeeze(-2)
    x = scores.index_select(scores.dim() - 1, idx.reshape(-1))
    x = x.reshape(*scores.shape[:-1], k, g)  # (..., k, g)
    if not bool(valid.all()):
        x = _mul_public_int(x, valid.long()) + (~valid).float() * pad
    v = x
    oh = ONES  # (..., k, n, w): each survivor's one-hot, ring 0/1 at scale 1 (exact); first the public width-1 ones
    for r in caps[len(heads_sched) :]:
        v, oh = level([(v, oh, r)])[0]
    while any(step < len(pl) for pl in plans):
        level([])
    oh = _ring_ones(v).unsqueeze(-1) if oh is ONES else oh  # g = 1: no level
    oh = oh[..., 0, :g]
    return oh, [t.squeeze(-1) for t in extra]


def strata_top1_onehot_reference(
    scores: torch.Tensor, k: int, heads: bool = False, interleave: bool = False
) -> torch.Tensor:
    if heads:
        scores = scores.amax(dim=-2)
    idx, valid = strata_layout(int(scores.shape[-1]), k, interleave)
    x = scores.double()[..., idx].masked_fill(~valid, STRATA_PAD)
    best = x.argmax(dim=-1, keepdim=True)  # first maximum
    return torch.zeros_like(x).scatter_(-1, best, 1.0)
