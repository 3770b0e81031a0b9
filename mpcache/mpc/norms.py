"""v / sqrt(sum v^2 + c) on shares, the normalisation of RMSNorm and LayerNorm, beside its float model.
Leakage: shapes only.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from .compare import _from_shares, _ltz, _minus_publics
from .config import MpcConfig
from .masked import usable

# ---- v / sqrt(sum v^2 + c): the normalisation of RMSNorm and LayerNorm ------------------------------------------
# MpcConfig.norm_range (-10, 30): the sum of squares (+ D eps) in [2^-10, 2^31) (SmolLM2 reaches ~6e8 ~ 2^29.2:
# massive activations); norm_steps (5): thresholds per octave of the step guess (its guesses Y on a grid of
# Y_STEP ulps: z = s Y^2 within [0.8995, 1.1018]); norm_degree (2): the polynomial in z - 1 for z^-1/2 (relative
# error 8.5e-5 at q = 5, degree 2; 1.24e-4 at q = 4, one fifth fewer thresholds; 3.8e-6 at degree 3, one more
# round); norm_lean: comparisons in 32-bit lanes (the fine sum is < 2^12 where used, the coarse one is
# s / 2^16). The split of the two sums is part of the algorithm (not a knob):
SUMSQ_SPLIT_LOG2 = 12  # sums >= 2^12 are taken from the coarse sum of (x / 2^8)^2, smaller ones from the fine sum
SUMSQ_SHIFT = 8
Y_STEP = 16  # the guesses Y are multiples of 16 ulps, so Y^2 / 2^8 is an exact ring integer: z = s' Y^2 is ONE
#              product beside v' Y (with exact Y^2 at scale 2^32 the product would reach 2^48 in the ring, where a
#              2PC truncation fails with probability ~2^-16; at Y^2 / 2^8 it is ~2^40, 2^-24), at the price of a
#              wider z range (Y within 16 ulps of its ideal, >= 362 ulps at s = 2^31): the 5th threshold per octave


@functools.lru_cache(maxsize=16)
def _norm_table(lo: int, hi: int, q: int) -> tuple[tuple[float, ...], tuple[int, ...], float, float]:
    """Thresholds t_k = 2^(lo + k/q) (k = 0..(hi-lo+1)q); for each count i of thresholds <= s, the guess Y_i ~ s^-1/2
    as a ring integer at scale 2^16, IN THE UNITS OF ITS BRANCH: below 2^12 of s (the fine branch: s and v as they
    are), at and above 2^12 of Y_i 2^8 (the coarse branch works on s / 2^16 and v / 2^8, so its guess is 2^8 larger
    and keeps >= 362 ulps up to s = 2^31, where Y itself is ~1 ulp); rounded (floor or ceil) so that z = s Y^2 is
    closest to 1 over the whole interval [2^(lo+(i-1)/q), 2^(lo+i/q)). Also the range [z_lo, z_hi] of z over every
    interval (what the polynomial is fitted on)."""
    n = (hi - lo + 1) * q
    ts = [2.0 ** (lo + k / q) for k in range(n + 1)]
    ys, zs = [], []
    for i in range(n + 2):
        a, b = 2.0 ** (lo + (i - 1) / q), 2.0 ** (lo + i / q)
        f = 2.0**SUMSQ_SHIFT if a >= 2.0**SUMSQ_SPLIT_LOG2 else 1.0
        y = (a * b) ** -0.25 * 2**16 * f / Y_STEP
        cands = {Y_STEP * max(1, math.floor(y)), Y_STEP * max(1, math.ceil(y))}
        c = min(
            cands, key=lambda c: max(abs(math.log(a * (c / 2**16 / f) ** 2)), abs(math.log(b * (c / 2**16 / f) ** 2)))
        )
        ys.append(c)
        zs += [a * (c / 2**16 / f) ** 2, b * (c / 2**16 / f) ** 2]
    return tuple(ts), tuple(ys), min(zs), max(zs)  # tuples: the result is cached and shared


@functools.lru_cache(maxsize=16)
def _rsqrt_poly(z_lo: float, z_hi: float, degree: int) -> tuple[float, ...]:
    """Coefficients c_k of p(e) = sum c_k e^k, e = z - 1, with p(z - 1) ~ z^-1/2 on [z_lo, z_hi] in RELATIVE error:
    a least-squares fit weighted by sqrt(z) at 512 Chebyshev nodes (within a small factor of the minimax)."""
    k = np.arange(512)
    z = np.cos(np.pi * (k + 0.5) / 512) * (z_hi - z_lo) / 2 + (z_hi + z_lo) / 2
    return tuple(float(c) for c in np.polynomial.polynomial.polyfit(z - 1, z**-0.5, degree, w=z**0.5))


def _poly(e, coeffs, square):
    """sum c_k e^k by its powers (e^2 by one square, e^3 by one more product): degree - 1 rounds."""
    out, powers = e * coeffs[1] + coeffs[0], [None, e]
    for k in range(2, len(coeffs)):
        powers.append(square(e) if k == 2 else powers[k - 1] * e)
        out = out + powers[k] * coeffs[k]
    return out


def _branch_masked(d, n_small: int, cf, dv, fine, v, lockstep: bool):
    """Steps 2-3 of :func:`norm_scale` on a mask plan (:mod:`mpcache.mpc.masked`): the comparison layer's B2A gives
    the bits as bit slots (below 2^12, u = [s >= 2^12], above), cf = coarse - fine and dv = v/2^8 - v are opened once
    in lockstep with the comparison's first round (8 B per element: (1 + D) per row), and step 3's products u cf,
    u dv and u b_k (the small bits ORed with u) are then local and exact (a bit times one fixed-point value).
    Returns (bits (T, ..., 1), the small bits ORed with u, the share of (s', v')). Rounds: the comparison's; the
    Beaver form's product round (16 B x (n_small + 1 + D) per row) is gone."""
    from .compare import _ltz_lanes
    from .lockstep import parallel
    from .masked import BIT, RING, Plan

    T, lead = int(d.shape[0]), tuple(int(x) for x in d.shape[1:])
    slots = {
        "lo": ((n_small, *lead), BIT),
        "u": ((1, *lead), BIT),
        "hi": ((T - n_small - 1, *lead), BIT),
        "cf": (tuple(int(x) for x in cf.size()), RING),
        "dv": (tuple(int(x) for x in dv.size()), RING),
    }
    plan = Plan(slots, [("lo", "u"), ("cf", "u"), ("dv", "u")], device=d.device)
    ltz, _ = parallel(
        lambda: _ltz_lanes(d, 32, 0, b2a=plan.b2a("lo", "u", "hi", complement=True)),
        lambda: plan.open([("cf", cf), ("dv", dv)]),
        enabled=lockstep,
    )
    bits = 1 - ltz  # (T, ..., 1) [s >= t]; the slots stand for these bits
    u = bits.share[n_small : n_small + 1]
    small = bits[:n_small].clone()
    small.share = small.share + u - plan.raw(("lo", "u"))  # b_k OR u = b_k + u - u b_k
    branch = torch.cat([fine.share, v.share], dim=-1) + torch.cat(
        [plan.raw(("cf", "u"))[0], plan.raw(("dv", "u"))[0]], dim=-1
    )
    return bits, small, branch


def norm_scale(
    v, add: float = 0.0, lean: bool | None = None, cfg: MpcConfig | None = None, scale: bool = False, then=None
):
    """v / sqrt(sum(v^2, last dim) + add), precise in fixed point over s in [2^-10, 2^31) (RMSNorm: v = x,
    LayerNorm: v = x - mean; ``add`` = D * eps is public). ``scale``: also return R = 2^8 s^-1/2 (..., 1), the
    factor itself, for a caller that scales something made from the UNnormalised v (a max of its products: see
    ``Transformer._decode_offset``): same rounds (its bit products are local, its last product rides in step 4's
    last one), one more element per row; R keeps >= 362 ulps over the whole range (2^8 s^-1/2 in the coarse branch
    is the branch's own guess Y p; the fine branch's is 2^8 Y p, exactly: ``u Y`` is a local sum of the bits).
    ``then`` (a LINEAR map of the last dim, e.g. the product with the next layer's fixed weights): returns
    then(v / sqrt(s)) as then(v' Y) p, then(v' Y) running in lockstep with the polynomial (2PC): the layer's
    product costs no round of its own (9 rounds for norm + layer on a 2PC decode row); the last product is then over
    then's outputs instead of D values.

    1. Two sums of squares in one square of the stacked (v, v/2^8): a fine one, sum v^2 (exact while every
       |v| < 64; beyond, CrypTen's local 2PC truncation of v^2 ~ 2^61 in the ring fails with probability ~15%),
       and a coarse one, sum (v/2^8)^2 = s / 2^16 (safe up to s < 2^31, ~1 unit of s of error per element).
    2. ONE comparison layer: s against the guess's thresholds below 2^12 on the fine sum, at and above 2^12 on
       the coarse sum (both inside the 32-bit-lane comparison's range); u = [s >= 2^12] is one of them.
    3. ONE product (ring integers, no truncation) of u with the stacked (1 - small bits, coarse - fine,
       v/2^8 - v): the small bits are ORed with u (garbage fine bits when s is large cancel), and the branch's
       operands are selected: (s', v') = (s, v) below 2^12, (s / 2^16, v / 2^8) above. In 2PC with TFP or the
       dealer (``cfg.masked_acts``) this step is local: the comparison's B2A opens into a mask plan's bit slots and
       (coarse - fine, v/2^8 - v) are opened once beside its first round (:func:`_branch_masked`): no round.
    4. The bits are a thermometer code, so the guess Y (a ring integer per interval in its branch's units, a
       multiple of Y_STEP: _norm_table) and Q = Y^2 / 2^8 (an exact ring integer) are local linear combinations.
       z = s' Q (one truncation by 2^24: s Y^2) and v' Y in ONE round (lockstep), z^-1/2 by a polynomial of
       ``cfg.norm_degree`` in z - 1 (_rsqrt_poly, fitted on the table's z range), out = (v' Y) p:
       v' Y (s' Y^2)^-1/2 = v / sqrt(s) for ANY Y, so Y's rounding only moves z.
    Rounds: 1 + cmp + 1 + 1 + (cfg.norm_degree - 1) + 1 = 10 in 2PC for up to ~11 rows (the bit-sliced lean cmp
    in blocks of 4: 5 rounds; 11 with more rows, blocks of 2: 6; 7 before session 12); 9 (10) with step 3 on the
    mask plan (session 13) at degree 2 (13 with the older cmp when z took its own product after (s' Y, v' Y); 17 with the 3 Goldschmidt steps before, which also erred by up to
    2% above s ~ 2^26, where Y was a few ulps; 3PC: as before, its resharing is not merged). Bytes per row: 2 D squares
    + (hi-lo+1) cfg.norm_steps + 1 comparisons + D + ~8 products. Float model (:func:`norm_scale_reference`) vs
    exact: the polynomial's relative error (8.5e-5 at the defaults) over the whole range. Leaks: shapes only.
    """
    import crypten

    cfg = cfg or MpcConfig.current()
    lean = cfg.norm_lean if lean is None else lean
    ts, ys, z_lo, z_hi = _norm_table(*cfg.norm_range, cfg.norm_steps)
    split = 2.0**SUMSQ_SPLIT_LOG2
    n_small = sum(t < split for t in ts)
    v8 = v * (1.0 / 2**SUMSQ_SHIFT)
    sq = crypten.stack([v, v8]).square().sum(-1, keepdim=True)  # (2, ..., 1)
    fine, coarse = sq[0] + add, sq[1] + add / 2 ** (2 * SUMSQ_SHIFT)
    d = crypten.cat(
        [_minus_publics(fine, ts[:n_small]), _minus_publics(coarse, [t / 2 ** (2 * SUMSQ_SHIFT) for t in ts[n_small:]])]
    )
    prec = fine.encoder._precision_bits
    sv = fine.clone()
    if lean and usable(cfg):  # step 3 local: u a bit slot of a mask plan, (coarse - fine, v/2^8 - v) opened once
        bits, small, sv.share = _branch_masked(d, n_small, coarse - fine, v8 - v, fine, v, cfg.lockstep)
    else:
        bits = 1 - _ltz(d, lean)  # (T, ..., 1) [s >= t]
        u = bits[n_small]
        small_bits = (1 - bits[:n_small]).share.movedim(0, -1).flatten(-2)  # (..., n_small)
        w = _from_shares(torch.cat([small_bits, (coarse - fine).share, (v8 - v).share], dim=-1), precision=0)
        prod = u * w  # exact ring products, (..., n_small + 1 + D)
        small = bits[:n_small] + _from_shares(prod.share[..., :n_small].movedim(-1, 0).unsqueeze(-1), precision=0)
        sv.share = torch.cat([fine.share, v.share], dim=-1) + prod.share[..., n_small:]  # (s', v'): the branch's
    u = bits[n_small]
    thermo = torch.cat([small.share, bits.share[n_small:]])
    dy = torch.tensor([b - a for a, b in itertools.pairwise(ys)], dtype=torch.long).reshape(
        -1, *([1] * (thermo.dim() - 1))
    )
    y = _from_shares((thermo * dy.to(thermo.device)).sum(0), precision=prec) + ys[0] / 2**prec
    # Q = Y^2 / 2^8 as a ring integer (scale 1): (Y / Y_STEP)^2 exactly, a local sum of the bits like Y
    qs = [(c // Y_STEP) ** 2 for c in ys]
    dq = torch.tensor([b - a for a, b in itertools.pairwise(qs)], dtype=torch.long).reshape(dy.shape)
    q8 = _from_shares((thermo * dq.to(thermo.device)).sum(0), precision=0) + qs[0]
    coeffs = _rsqrt_poly(z_lo, z_hi, cfg.norm_degree)

    def poly():  # z = s' Y^2: s' 2^prec times Y^2 2^(2 prec - 8) is z 2^(3 prec - 8) in the ring, ~2^40: one truncation
        z = (sv[..., :1] * q8).div(2 ** (2 * prec - 8))
        return _poly(z - 1.0, coeffs, lambda e: e.square())

    def linear():
        vy = sv[..., 1:] * y
        return vy if then is None else then(vy)

    from .lockstep import parallel

    vy, p = parallel(linear, poly, enabled=cfg.lockstep)
    if not scale:
        return vy * p
    # R = Y' p with Y' = Y (2^8 - u (2^8 - 1)) in the ring: u Y is local, since the thermometer's bits satisfy
    # u small_k = u (small bits are ORed with u) and u b_k = b_k for the coarse thresholds >= 2^12 (b_k = 1 implies
    # u = 1: the same coarse sum against increasing thresholds)
    c0 = ys[0] + sum(int(d) for d in dy.reshape(-1)[:n_small].tolist())
    dyl = dy[n_small:].to(thermo.device)
    uy = u.share * c0 + (bits.share[n_small:] * dyl).sum(0)
    yp = y.clone()
    yp.share = y.share * 2**SUMSQ_SHIFT - uy * (2**SUMSQ_SHIFT - 1)
    out = crypten.cat([vy, yp], dim=-1) * p
    return out[..., :-1], out[..., -1:]


def norm_scale_reference(
    v: torch.Tensor, add: float = 0.0, cfg: MpcConfig | None = None, scale: bool = False, then=None
):
    """The float model of :func:`norm_scale` (with ``scale``: also R = 2^8 Y p, its model of 2^8 s^-1/2; ``then``:
    applied to the output)."""
    cfg = cfg or MpcConfig()
    v = v.double()
    s = (v * v).sum(-1, keepdim=True) + add
    ts, ys, z_lo, z_hi = _norm_table(*cfg.norm_range, cfg.norm_steps)
    count = sum((s >= t).long() for t in ts)
    unit = torch.where(s >= 2.0**SUMSQ_SPLIT_LOG2, 2.0 ** (16 + SUMSQ_SHIFT), 2.0**16)  # the branch's guess units
    y = torch.tensor(ys, dtype=torch.float64)[count] / unit
    p = _poly(s * y * y - 1.0, _rsqrt_poly(z_lo, z_hi, cfg.norm_degree), torch.square)
    out = v * y * p if then is None else then(v * y * p)
    return (out, 2.0**SUMSQ_SHIFT * y * p) if scale else out
