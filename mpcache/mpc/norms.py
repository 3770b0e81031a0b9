"""v / sqrt(sum v^2 + c) on shares, the normalisation of RMSNorm and LayerNorm, beside its float model.
Leakage: shapes only.
"""

from __future__ import annotations

import itertools
import math

import torch

from .compare import _from_shares, _ltz, _minus_publics, _mul_public_int
from .config import MpcConfig

# ---- v / sqrt(sum v^2 + c): the normalisation of RMSNorm and LayerNorm ------------------------------------------
# MpcConfig.norm_range (-10, 30): the sum of squares (+ D eps) in [2^-10, 2^31) (SmolLM2 reaches ~6e8 ~ 2^29.2:
# massive activations); norm_steps (2): thresholds per octave of the step guess (z = s Y^2 within [2^-1/4, 2^1/4]);
# norm_iters (3): Goldschmidt steps for z^-1/2 (float model <= 1e-7 relative for z in [0.84, 1.19]); norm_lean:
# comparisons in 32-bit lanes (the fine sum is < 2^12 where used, the coarse one is s / 2^16).
# The split of the two sums is part of the algorithm (not a knob):
SUMSQ_SPLIT_LOG2 = 12  # sums >= 2^12 are taken from the coarse sum of (x / 2^8)^2, smaller ones from the fine sum
SUMSQ_SHIFT = 8


def _norm_table(lo: int, hi: int, q: int) -> tuple[list[float], list[int]]:
    """Thresholds t_k = 2^(lo + k/q) (k = 0..(hi-lo+1)q) and, for each count i of thresholds <= s, the guess
    Y_i ~ s^-1/2 as a ring integer at scale 2^16 (>= 1), chosen (floor or ceil) so that z = s Y^2 is closest to 1
    over the whole interval [2^(lo+(i-1)/q), 2^(lo+i/q))."""
    n = (hi - lo + 1) * q
    ts = [2.0 ** (lo + k / q) for k in range(n + 1)]
    ys = []
    for i in range(n + 2):
        a, b = 2.0 ** (lo + (i - 1) / q), 2.0 ** (lo + i / q)
        y = (a * b) ** -0.25 * 2**16
        cands = {max(1, math.floor(y)), max(1, math.ceil(y))}
        ys.append(
            min(cands, key=lambda c: max(abs(math.log(a * (c / 2**16) ** 2)), abs(math.log(b * (c / 2**16) ** 2))))
        )
    return ts, ys


def _goldschmidt_rsqrt(z, iters: int, stack):
    """h ~ z^-1/2 / 2 from g = z, h = 1/2: rho = 1/2 - g h; (g, h) *= 1 + rho. The first step is one product
    (h is public), later ones two rounds each (g h, then the stacked (g, h) times 1 + rho; the last: h only)."""
    rho = 0.5 - z * 0.5
    g, h = z + z * rho, rho * 0.5 + 0.5
    for k in range(1, iters):
        rho = 0.5 - g * h
        if k == iters - 1:
            h = h + h * rho
        else:
            gh = stack([g, h]) * (rho + 1)
            g, h = gh[0], gh[1]
    return h


def norm_scale(v, add: float = 0.0, lean: bool | None = None, cfg: MpcConfig | None = None):
    """v / sqrt(sum(v^2, last dim) + add), precise in fixed point over s in [2^-10, 2^31) (RMSNorm: v = x,
    LayerNorm: v = x - mean; ``add`` = D * eps is public).

    1. Two sums of squares in one square of the stacked (v, v/2^8): a fine one, sum v^2 (exact while every
       |v| < 64; beyond, CrypTen's local 2PC truncation of v^2 ~ 2^61 in the ring fails with probability ~15%),
       and a coarse one, sum (v/2^8)^2 = s / 2^16 (safe up to s < 2^31, ~1 unit of s of error per element).
    2. ONE comparison layer: s against the guess's thresholds below 2^12 on the fine sum, at and above 2^12 on
       the coarse sum (both inside the 32-bit-lane comparison's range); u = [s >= 2^12] is one of them.
    3. ONE product (ring integers, no truncation) of u with the stacked (1 - small bits, coarse - fine): the small
       bits are ORed with u (garbage fine bits when s is large cancel) and s = fine + u (coarse - fine).
    4. The bits are a thermometer code, so the guess Y (a ring integer per interval, _norm_table) is a local
       linear combination. (s Y, v Y) in one product, z = (s Y) Y (Y^2 itself would underflow), z^-1/2 by
       Goldschmidt from h = 1/2, out = (v Y)(2h): v Y (s Y^2)^-1/2 = v / sqrt(s) for ANY Y, so Y's rounding only
       moves z (within [0.5, 2] at the top of the range, where Y is a few ulps).
    Rounds: 1 + cmp + 1 + 1 + 1 + (2 cfg.norm_iters - 1) + 1 = 17 with the lean cmp (7).  Bytes per row:
    2 D squares + (hi-lo+1) cfg.norm_steps + 1 comparisons + ~10 products.  Leaks: shapes only.
    """
    import crypten

    cfg = cfg or MpcConfig()
    lean = cfg.norm_lean if lean is None else lean
    ts, ys = _norm_table(*cfg.norm_range, cfg.norm_steps)
    split = 2.0**SUMSQ_SPLIT_LOG2
    n_small = sum(t < split for t in ts)
    sq = crypten.stack([v, v * (1.0 / 2**SUMSQ_SHIFT)]).square().sum(-1, keepdim=True)  # (2, ..., 1)
    fine, coarse = sq[0] + add, sq[1] + add / 2 ** (2 * SUMSQ_SHIFT)
    d = crypten.cat(
        [_minus_publics(fine, ts[:n_small]), _minus_publics(coarse, [t / 2 ** (2 * SUMSQ_SHIFT) for t in ts[n_small:]])]
    )
    bits = 1 - _ltz(d, lean)  # (T, ..., 1) [s >= t]
    u = bits[n_small]
    coarse_full = _mul_public_int(coarse, torch.tensor(2 ** (2 * SUMSQ_SHIFT)))
    w = _from_shares(torch.cat([(1 - bits[:n_small]).share, (coarse_full - fine).share.unsqueeze(0)]), precision=0)
    prod = u * w  # exact ring products
    small = bits[:n_small] + _from_shares(prod.share[:n_small], precision=0)
    s = fine + _from_shares(prod.share[n_small], precision=fine.encoder._precision_bits)
    thermo = torch.cat([small.share, bits.share[n_small:]])
    dy = torch.tensor([b - a for a, b in itertools.pairwise(ys)], dtype=torch.long).reshape(
        -1, *([1] * (thermo.dim() - 1))
    )
    y = s.clone()
    y.share = (thermo * dy.to(thermo.device)).sum(0)
    y = y + ys[0] / s.encoder.scale
    sv = crypten.cat([s, v], dim=-1) * y
    z = sv[..., :1] * y
    h = _goldschmidt_rsqrt(z, cfg.norm_iters, crypten.stack)
    return sv[..., 1:] * (h + h)


def norm_scale_reference(v: torch.Tensor, add: float = 0.0, cfg: MpcConfig | None = None) -> torch.Tensor:
    cfg = cfg or MpcConfig()
    v = v.double()
    s = (v * v).sum(-1, keepdim=True) + add
    ts, ys = _norm_table(*cfg.norm_range, cfg.norm_steps)
    count = sum((s >= t).long() for t in ts)
    y = torch.tensor(ys, dtype=torch.float64)[count] / 2**16
    z = s * y * y
    h = _goldschmidt_rsqrt(z, cfg.norm_iters, torch.stack)
    return v * y * (h + h)
