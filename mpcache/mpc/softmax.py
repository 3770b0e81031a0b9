"""The softmax on shares (row max or anchored offset, limit exp, range-safe reciprocal), beside its float model.
Leakage: shapes only.
"""

from __future__ import annotations

import math

import torch

from . import approx
from .compare import _cat
from .config import MpcConfig
from .masked import usable
from .tournament import tree_max

# ---- softmax -------------------------------------------------------------------------------------------------
MASK_SHIFT = 1024.0  # masked logits are shifted down by this before the max; exp(.) of them is zeroed publicly


# The knobs (MpcConfig.softmax_radix / softmax_lean / softmax_recip / softmax_exp_fit / exp_iters) default to the
# choice of experiments/softmax_bench.py (RESULTS.md "Lean softmax vs stock"): 2PC, vs the pairwise tree + CrypTen
# comparison + Newton, rounds 115 -> 58 at 1k and 142 -> 68 at 8k for ~12% more bytes. softmax_exp_fit = 8.0 (the
# minimax base on [-8, 0]) is ~6-9x more accurate on peaked rows but less on near-flat ones: not the default.


# Anchored softmax (decode rows, no mask): the exp's offset is the max over a few always-attended PUBLIC columns
# (the first a and the last b of the row, ``anchor=(a, b)``: the attention sinks and the newest rows) instead of the
# max over the whole row. Softmax is shift-invariant, so the result is the same function; what changes is the
# exp's argument range: y = x - anchor_max <= D, where D = row max - anchor max >= 0. Measured on SmolLM2-135M
# (full-cache decode, passkey prompts, every layer and head; experiments/anchor_excess.py): D <= 8.9 at 1k and
# <= 9.9 at 4k tokens, 99% of rows D <= 4.6. Precision: the sum s of the exps reaches ~e^D, and 1/(s/sqrt(m)) in
# 16-bit fixed point keeps fewer ulps as D grows. Fixed-point emulation on a 412-entry row (RESULTS.md):
# max abs error 1.6e-3 at D = 4, 4.5e-3 at 8, 8.5e-3 at 10, then a common scale error of the row's probabilities,
# 3% at D = 12, 8% at 13, and all-zero output from D ~ 15 (the exp itself overflows only past ~21.5). So the
# anchors must be rows whose logits are near the top: the sinks and the NEWEST rows (Transformer.DECODE_ANCHOR).
# The low side is always safe: the anchors are attended, so the largest term is >= 1.
# MpcConfig.anchor_exp_iters / anchor_exp_order (7, 2: (1 + t + t^2/2)^128, t = y/128, relative error ~|y|^3/98304:
# 1.0% at |y| = 10, in 8 rounds; session 9's (10, 1): (1 + y/1024)^1024, ~y^2/2048: 4.9% at 10, 10 rounds) and
# anchor_recip ((-8, 30, 4): the reciprocal's range 2^lo..2^(hi+1), since sum/sqrt(m) <= sqrt(m) e^D, and its
# steps per octave) and anchor_recip_iters (2 Goldschmidt steps: relative error 5.7e-5) set the anchored branch.
ANCHOR_MAX_EXCESS = 10.0  # D up to which the output is within ~1e-2 (fixed-point emulation, m = 412; larger
#                               m is better: the sum is divided by sqrt(m)); beyond, the row's scale degrades
# The guard (MpcConfig.anchor_guard = G, default ANCHOR_MAX_EXCESS): every entry's exp argument y = x - anchor max is
# clamped at G by a coarse comparison (16-bit lanes, 1/16 resolution: compare.py _ltz_lanes) and one product, so the
# exp and the reciprocal never leave the range above, whatever the row. The output is then EXACTLY the softmax of the
# clamped row min(x, anchor max + G) (the float model, up to the fixed-point error: at most the unguarded error at
# D = G, i.e. ~8.5e-3 per entry and a common scale error of the row of ~1 ulp of r = sqrt(m) / sum, relative:
# 2-4% when one or two entries sit at e^10 in a 300-entry row, less in longer rows): a distribution in which
# an entry above the bound weighs e^G relative to the anchors instead of e^y -- the row's mass moves from the
# entries above the bound to the others, and every entry above the bound still weighs at least as much as any
# entry below it. The coarse comparison may also clamp entries up to (n - 1)/16 BELOW G to G (one-sided): a weight
# error of at most e^((n-1)/16) - 1 (6.5% in 2PC) on entries already e^(G - 1/16) above the anchors. Rows inside
# the bound (measured: every SmolLM2 row at 1k-4k, experiments/anchor_excess.py) are unchanged. Cost per entry
# (2PC): ~11.4 B (comparison, bit-sliced) + 16 B (product), 6 rounds per softmax call; None turns the guard off (the row then
# degrades silently beyond ANCHOR_MAX_EXCESS, as described above).


def softmax(
    x,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    *,
    radix=None,
    lean: bool | None = None,
    recip: str | None = None,
    exp_fit: float | None | str = "default",
    anchor=None,
    offset=None,
    cfg: MpcConfig | None = None,
):
    """Softmax along the last dim, correct for rows of up to 2^16 entries (tested flat and peaked at 8k).

    Stock CrypTen divides by the sum of exponentials with a reciprocal whose Newton iterations diverge once the
    sum exceeds ~250 (garbage on long flat rows). Here the sum s in [1, m] is scaled by the public 1/sqrt(m) into
    [m^-1/2, m^1/2], inside the reciprocal's convergence range for m <= 8k, and the result rescaled.
    ``mask`` (public 0/1, broadcastable): excluded entries are shifted down before the max and zeroed after exp.
    ``exp_fit``: exp_limit's fit_range ("default" = ``cfg.softmax_exp_fit``). ``radix``/``lean`` go to ``tree_max`` (lean needs |x| < 16384, masked entries included), ``recip`` picks
    ``reciprocal_gs`` ("goldschmidt") or ``reciprocal_nr`` ("newton"); None = ``cfg``'s.
    Rounds: sum over max layers of (cmp + ceil(log2 r)) + cfg.exp_iters + reciprocal (cmp + 1 + RECIP_GS_ITERS, or
    cmp + 2 RECIP_ITERS) + 1, with cmp = 5-6 (lean, 2PC: compare.block_size) or 8.
    ``anchor=(a, b)`` (no mask; see the note above): the offset is the max of the first a and last b columns only (a
    max over a + b entries: one layer), exp by cfg.anchor_exp_iters squarings (of an order-cfg.anchor_exp_order base), the reciprocal over the range the
    guard bounds (:func:`anchored_recip_range`) with one bit-sliced comparison layer as wide as that range (approx.sliced_window). ``offset`` (with ``anchor``): that max, already computed by
    the caller over always-attended columns (MPCache makes it in its selection's comparison layers:
    :func:`strata_select`). The exp's argument is clamped at ``cfg.anchor_guard`` (see the note above: the output
    is the softmax of the clamped row; its comparison runs in lockstep with the exp, :func:`guarded_exp`). Rounds:
    (cmp + ceil(log2(a + b))) + (cfg.anchor_exp_iters + order - 1) + 1 (guard) + (cmp' + 1 + cfg.anchor_recip_iters)
    + 1 = 8 + 9 + 8 + 1 = 26 for (4, 4) on a 2PC decode row (cmp = 5, cmp' = 5: the bit-sliced comparisons in
    blocks of 4; one more each where a call is large enough for blocks of 2, or in 3PC), 18 with the ``offset``
    given; with TFP or the dealer the anchors' max takes its comparison's rounds only (a radix-8 layer on a mask
    plan: :func:`mpcache.mpc.tournament._masked_max_layer`) and the reciprocal's d0 is local
    (:func:`mpcache.mpc.approx._bits_and_d0_masked`): 5 + 9 + 7 + 1 = 22, and 17 with the offset; ``cfg.lockstep = False`` adds the guard's comparison; bytes: the guard
    (~27 B in 2PC), the exp's squarings and one product per entry, the rest per row. ``anchor`` WITH a ``mask`` whose rows
    are prefixes (causal rows: row r attends columns [0, n_r)): the anchors are row r's first a and last b attended
    columns (the sinks and the row's own newest keys, public per row), the exp's entries outside the prefix are
    zeroed publicly and 1/sqrt(n_r) replaces 1/sqrt(m); same rounds, whatever the row lengths (the causal prefill:
    no max tree over each row). Leaks: shapes only.
    """
    assert dim in (-1, x.dim() - 1), "secure softmax works along the last dim"
    m = x.shape[-1]
    if m > 2**16:
        raise ValueError(f"secure softmax supports rows of up to 65536 entries, got {m}")
    cfg = cfg or MpcConfig.current()
    if cfg.softmax_baseline == "stock":
        return stock_softmax(x, mask)
    radix = cfg.softmax_radix if radix is None else radix
    lean = cfg.softmax_lean if lean is None else lean
    if anchor is not None and mask is None and sum(anchor) < m:
        if offset is None:
            mx = tree_max(_anchor_columns(x, anchor), dim=-1, keepdim=True, radix="auto", lean=lean, cfg=cfg)
        else:
            mx = offset  # (..., 1): the anchors' max, made earlier in a batched layer by the caller
        e = guarded_exp(x - mx, cfg)
        c = 1.0 / math.sqrt(m)
        lo, hi, q = anchored_recip_range(m, cfg)
        r = approx.reciprocal_gs(
            e.sum(dim=-1, keepdim=True) * c,
            cfg.anchor_recip_iters,
            lo,
            hi,
            q,
            lean="sliced",
            masked=usable(cfg),
            lockstep=cfg.lockstep,
        )
        return (e * r) * c
    if anchor is not None and mask is not None:
        return _anchored_prefix(x, mask, anchor, lean, cfg)
    if mask is not None:
        x = x + (mask.to(torch.float32) - 1) * MASK_SHIFT
    recip = cfg.softmax_recip if recip is None else recip
    exp_fit = cfg.softmax_exp_fit if exp_fit == "default" else exp_fit
    mx = tree_max(x, dim=-1, keepdim=True, radix=radix, lean=lean, cfg=cfg)
    e = approx.exp_limit(x - mx, iters=cfg.exp_iters, fit_range=exp_fit)
    if mask is not None:
        e = e * mask.to(torch.float32)
    c = 1.0 / math.sqrt(m)
    s = e.sum(dim=-1, keepdim=True) * c
    r = approx.reciprocal_gs(s, lean=lean) if recip == "goldschmidt" else approx.reciprocal_nr(s)
    return (e * r) * c  # (e r) first: r c alone can be a few ulps


def stock_softmax(x, mask: torch.Tensor | None = None):
    """CrypTen 0.4.1's own ``MPCTensor.softmax`` along the last dim (``MpcConfig.softmax_baseline = "stock"``): the
    full-cache baseline of the kind the MPCache paper measured against, for COST comparisons. Its max is a pairwise
    tree (``max_method="log_reduction"``: ceil(log2 m) layers of CrypTen's 64-bit comparison, ~15 rounds each, then
    a one-hot argmax product per layer), its exp 8 squarings, its reciprocal 10 Newton iterations from an exp-based
    guess (~30 rounds). With a public 0/1 ``mask`` the same steps (CrypTen's max over the row with masked entries
    shifted down by MASK_SHIFT, its exp, the masked entries zeroed before its reciprocal of the sum: CrypTen's
    softmax has no mask, and its limit exp is garbage below -256). Float model: the exact softmax -- within
    CrypTen's precision only while the sum of exponentials stays under ~250 (its reciprocal diverges beyond: wrong
    on long flat rows, ``../shared/crypten-notes.md``), which is why it is never used for output. Bytes and rounds:
    what the ledger counts (``experiments/softmax_bench.py`` tabulates them per row length). Leaks: shapes only."""
    if mask is None:
        return x.softmax(-1)
    import crypten

    m = mask.to(torch.float32)
    mx = (x + (m - 1) * MASK_SHIFT).max(-1, keepdim=True)[0]
    e = (x - mx).exp() * m
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        return e * e.sum(-1, keepdim=True).reciprocal()


def anchored_recip_range(m: int, cfg: MpcConfig) -> tuple[int, int, int]:
    """The anchored reciprocal's (lo, hi, q): its input s / sqrt(m) lies in [2^lo, 2^(hi+1)). The anchors' max
    entry contributes exp(0) = 1, so s >= 1; with the guard every entry is <= e^G, so s <= m e^G: the range is
    [m^-1/2, m^1/2 e^G] (m = 45: 2^-3 .. 2^17.2; m = 65536: 2^-8 .. 2^22.5), fewer thresholds than the unguarded
    ``cfg.anchor_recip`` (up to 2^31). Public (m, G)."""
    lo, hi, q = cfg.anchor_recip
    if cfg.anchor_guard is None:
        return lo, hi, q
    half = 0.5 * math.log2(max(m, 1))
    return max(lo, math.floor(-half)), min(hi, math.ceil(half + cfg.anchor_guard / math.log(2))), q


def guarded_exp(y, cfg: MpcConfig):
    """exp(min(y, G)) of the anchored softmax (G = ``cfg.anchor_guard``; None: exp(y)) by the limit exp
    (``cfg.anchor_exp_iters`` squarings of an order-``cfg.anchor_exp_order`` base). The guard's coarse comparison b = [y > G] (16-bit lanes, 1/16 resolution,
    |G - y| < 2032; one-sided: entries within (n - 1)/16 below G may count as above) runs in LOCKSTEP with the exp of
    the unclamped y (:mod:`mpcache.mpc.lockstep`: its 5 rounds in 2PC travel inside the exp's 8), then one product picks
    e^G where b: e + b (e^G - e), exact in the ring (a bit times a ring element), so an exp that overflowed above
    the bound is replaced whole. Float model: :func:`guarded_exp_reference` (the exp of min(y, G)). Rounds
    cfg.anchor_exp_iters + cfg.anchor_exp_order (the sum of both branches + 1 with ``cfg.lockstep = False``). Bytes per entry (2PC): the
    exp's + ~11.4 B (comparison) + 16 B (product). Leaks: shapes only."""
    from .compare import _ltz_lanes
    from .lockstep import parallel

    G = cfg.anchor_guard
    if G is None:
        return approx.exp_limit(y, iters=cfg.anchor_exp_iters, order=cfg.anchor_exp_order)
    b, e = parallel(
        lambda: _ltz_lanes(-y + G, 16, 12, block=2),  # the exp is the longer branch: the fewest bytes
        lambda: approx.exp_limit(y, iters=cfg.anchor_exp_iters, order=cfg.anchor_exp_order),
        enabled=cfg.lockstep,
    )
    e_g = float(
        approx.exp_limit_reference(
            torch.tensor(G, dtype=torch.float64), iters=cfg.anchor_exp_iters, order=cfg.anchor_exp_order
        )
    )
    return e + b * (-e + e_g)


def guarded_exp_reference(y: torch.Tensor, cfg: MpcConfig) -> torch.Tensor:
    """The float model of :func:`guarded_exp`: the limit exp of min(y, G) (exact comparison; None: of y)."""
    G = cfg.anchor_guard
    return approx.exp_limit_reference(
        y if G is None else y.clamp(max=G), iters=cfg.anchor_exp_iters, order=cfg.anchor_exp_order
    )


def _prefix_anchors(mask: torch.Tensor, anchor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a public 0/1 mask whose rows are prefixes (R, m): each row's length n_r (R, 1) and the columns of its
    first a and last b attended entries (R, a + b), clipped into the prefix (repeats are harmless to a max)."""
    mask = mask.reshape(-1, mask.shape[-1])
    lens = mask.sum(-1).long()
    m = int(mask.shape[-1])
    if not torch.equal(mask.bool(), torch.arange(m)[None, :] < lens[:, None]) or int(lens.min()) < 1:
        raise ValueError("an anchored softmax with a mask needs non-empty prefix rows (a causal mask)")
    a, b = anchor
    idx = torch.cat([torch.arange(a).expand(len(lens), a), lens[:, None] - b + torch.arange(b)], dim=-1)
    return lens[:, None], torch.minimum(idx.clamp(min=0), lens[:, None] - 1)


def _anchored_prefix(x, mask, anchor, lean: bool, cfg: MpcConfig):
    """The anchored softmax of causal rows (see :func:`softmax`) on the attended entries only: they are gathered
    into one flat (ragged) vector by public indices (local), so the masked entries cost nothing; the anchors' max
    (one small tournament per row), the guarded exp, the per-row sums (a local segment sum), the reciprocal per row,
    one product per entry; scattered back with zeros at the masked entries (local). Rounds as the decode rows'."""
    from .compare import _from_shares

    lens, idx = _prefix_anchors(mask, anchor)
    R, m = int(lens.shape[0]), int(x.shape[-1])
    lead = tuple(int(d) for d in x.shape[:-2])
    valid = mask.reshape(R, m).bool().reshape(-1)
    flat = valid.nonzero().reshape(-1)  # public: the attended entries, row-major
    row_of = flat // m
    dev = x.share.device
    flat_d, row_d = flat.to(dev), row_of.to(dev)
    xs = x.share.reshape(*lead, R * m)

    def wrap(share, like):
        t = _from_shares(share, precision=None)
        t.encoder = like.encoder
        return t

    cols = (torch.arange(R)[:, None] * m + idx).reshape(-1).to(dev)  # the anchors' flat positions
    anchors = wrap(xs.index_select(-1, cols).reshape(*lead, R, idx.shape[-1]), x)
    mx = tree_max(anchors, dim=-1, keepdim=False, radix="auto", lean=lean, cfg=cfg)  # (..., R)
    y = wrap(xs.index_select(-1, flat_d), x) - wrap(mx.share.index_select(-1, row_d), mx)
    e = guarded_exp(y, cfg)  # (..., E)
    s = wrap(torch.zeros(*lead, R, dtype=e.share.dtype, device=dev).index_add_(-1, row_d, e.share), e)
    c = (1.0 / lens.reshape(-1).double().sqrt()).float()  # (R,), public
    lo, hi, q = anchored_recip_range(int(lens.max()), cfg)
    r = approx.reciprocal_gs(
        s * c, cfg.anchor_recip_iters, lo, hi, q, lean="sliced", masked=usable(cfg), lockstep=cfg.lockstep
    )  # (..., R)
    p = (e * wrap(r.share.index_select(-1, row_d), r)) * c[row_of]
    out = torch.zeros(*lead, R * m, dtype=p.share.dtype, device=dev)
    out[..., flat_d] = p.share
    return wrap(out.reshape(*lead, R, m), p)


def _anchored_prefix_reference(x, mask, anchor, cfg: MpcConfig):
    lens, idx = _prefix_anchors(mask, anchor)
    idx = idx.reshape(*([1] * (x.dim() - 2)), *idx.shape).expand(*x.shape[:-1], idx.shape[-1])
    e = guarded_exp_reference(x - x.gather(-1, idx).max(dim=-1, keepdim=True).values, cfg) * mask.double()
    c = 1.0 / lens.double().sqrt()
    lo, hi, q = anchored_recip_range(int(lens.max()), cfg)
    return e * (approx.reciprocal_gs_reference(e.sum(dim=-1, keepdim=True) * c, cfg.anchor_recip_iters, lo, hi, q) * c)


def _anchor_columns(x, anchor):
    a, b = anchor
    m = x.shape[-1]
    parts = ([x[..., :a]] if a else []) + ([x[..., m - b :]] if b else [])
    if isinstance(x, torch.Tensor):
        return torch.cat(parts, dim=-1)
    return parts[0] if len(parts) == 1 else _cat(parts, dim=-1)


def softmax_reference(
    x: torch.Tensor,
    dim: int = -1,
    mask: torch.Tensor | None = None,
    *,
    radix=None,
    lean: bool | None = None,
    recip: str | None = None,
    exp_fit: float | None | str = "default",
    anchor=None,
    cfg: MpcConfig | None = None,
) -> torch.Tensor:
    """The float model of ``softmax`` (the max is exact whatever ``radix``/``lean``; ``recip`` picks the model)."""
    cfg = cfg or MpcConfig()
    x = x.double()
    m = x.shape[-1]
    if cfg.softmax_baseline == "stock":  # CrypTen's: modelled as the exact softmax (see stock_softmax)
        y = torch.softmax(x if mask is None else x.masked_fill(mask == 0, -math.inf), dim=-1)
        return y if mask is None else y * mask.double()
    if anchor is not None and mask is not None:
        return _anchored_prefix_reference(x, mask, anchor, cfg)
    if anchor is not None and mask is None and sum(anchor) < m:
        e = guarded_exp_reference(x - _anchor_columns(x, anchor).max(dim=-1, keepdim=True).values, cfg)
        c = 1.0 / math.sqrt(m)
        lo, hi, q = anchored_recip_range(m, cfg)
        return e * (
            approx.reciprocal_gs_reference(e.sum(dim=-1, keepdim=True) * c, cfg.anchor_recip_iters, lo, hi, q) * c
        )
    if mask is not None:
        x = x + (mask.double() - 1) * MASK_SHIFT
    exp_fit = cfg.softmax_exp_fit if exp_fit == "default" else exp_fit
    e = approx.exp_limit_reference(x - x.max(dim=-1, keepdim=True).values, iters=cfg.exp_iters, fit_range=exp_fit)
    if mask is not None:
        e = e * mask.double()
    c = 1.0 / math.sqrt(m)
    s = e.sum(dim=-1, keepdim=True) * c
    recip = cfg.softmax_recip if recip is None else recip
    return e * (
        (approx.reciprocal_gs_reference(s) if recip == "goldschmidt" else approx.reciprocal_nr_reference(s)) * c
    )
