"""Function approximations on shares, each beside its float model: the limit exp, and the reciprocal by Newton or by
Goldschmidt from a one-comparison-layer initial guess. Pure algorithms: their parameters are explicit arguments.
Leakage: shapes only.
"""

from __future__ import annotations

import math

import torch

from .compare import _ltz, _ltz_lanes, _minus_publics

# ---- exp -----------------------------------------------------------------------------------------------------
EXP_ITERS = 8


def exp_fit_coeffs(fit_range: float, iters: int = EXP_ITERS) -> tuple[float, float]:
    """Base c0 + c1 x whose 2^iters-th power is a minimax-log-error exp on [-fit_range, 0]: u = c1/c0 makes the
    log error n ln(1 + u x) - x vanish at both ends (n = 2^iters), c0 centres it (equioscillation). For
    fit_range 8: log error <= 0.0156 on [-8, 0] (relative error 1.6% on [-5, 0], 5.4% at -10, 17% at -14)."""
    n = 2**iters
    u = (1 - math.exp(-fit_range / n)) / fit_range
    xs = (n * u - 1) / u
    c0 = math.exp(-(n * math.log(1 + u * xs) - xs) / 2 / n)
    return c0, c0 * u


def exp_limit(x, iters: int = EXP_ITERS, fit_range: float | None = None, order: int = 1):
    """exp(x) ~ (1 + x / 2^iters)^(2^iters) for x <= 0 (CrypTen's limit approximation).

    Valid for x > -2^iters (= -256): below, the base turns negative; callers only pass x - max(x) with masked
    entries zeroed afterwards. Error (float model): relative error exp(x) vs approx is x^2/2^(iters+1) to first
    order, e.g. 5% at x = -5 and 0.2% at x = -1; probabilities renormalise most of it away.
    ``fit_range``: use the minimax base of ``exp_fit_coeffs`` instead of 1 + x/2^iters (same cost; spreads the
    error evenly over [-fit_range, 0] instead of exact at 0 and 18% off at -10).
    ``order=2``: the base is 1 + t + t^2/2 (t = x / 2^iters; one more square): relative error ~ 2^iters t^3/6 =
    |x|^3 / (6 4^iters) instead of x^2 / 2^(iters+1) -- at iters = 7, 1.0% at |x| = 10 and 0.07% at 4 (the
    order-1 base at iters = 10: 4.9% and 0.8%) in 8 rounds instead of 10; valid for x > -2^(iters+1) (the base
    stays in (0, 1]: it is >= 1/2 everywhere, <= 1 on [-2, 0] in t), e.g. -256 at iters = 7.
    Rounds: iters mul (+1 with order 2) (squares: 8 bytes/element each in 2PC).  Leaks: shapes only.
    """
    if fit_range:
        c0, c1 = exp_fit_coeffs(fit_range, iters)
        y = x * c1 + c0
    elif order == 2:
        t = x * (1.0 / 2**iters)
        y = 1 + t + t.square() * 0.5
    else:
        y = 1 + x * (1.0 / 2**iters)
    for _ in range(iters):
        y = y.square()  # opens only y - r (a square pair): half a product's bytes
    return y


def exp_limit_reference(
    x: torch.Tensor, iters: int = EXP_ITERS, fit_range: float | None = None, order: int = 1
) -> torch.Tensor:
    if fit_range:
        c0, c1 = exp_fit_coeffs(fit_range, iters)
        y = x.double() * c1 + c0
    elif order == 2:
        t = x.double() / 2**iters
        y = 1 + t + t * t * 0.5
    else:
        y = 1 + x.double() / 2**iters
    for _ in range(iters):
        y = y * y
    return y


# ---- reciprocal and reciprocal square root: range-free initial guess + Newton --------------------------------
RECIP_RANGE = (-8, 8)  # softmax denominators scaled by 1/sqrt(m) lie in [2^-8, 2^8] for m <= 65536
RECIP_ITERS = 4


def _pow2_guess_coeffs(lo: int, hi: int, power: float, c: float) -> tuple[float, list[float]]:
    """y0(x) = c * 2^(-j*power) for x in [2^j, 2^(j+1)), written as base + sum_j [x >= 2^j] * delta_j."""
    ys = [c * 2.0 ** (-j * power) for j in range(lo - 1, hi + 1)]
    return ys[0], [ys[i + 1] - ys[i] for i in range(len(ys) - 1)]


def _pow2_guess(x, lo: int, hi: int, power: float, c: float):
    """One batched comparison layer against the public thresholds 2^lo .. 2^hi, then a local linear combination
    of the bits with public fixed-point coefficients (shares times integers: exact)."""
    base, deltas = _pow2_guess_coeffs(lo, hi, power, c)
    bits = 1 - _minus_publics(x, [2.0**j for j in range(lo, hi + 1)])._ltz()  # (J, ...), scale 1
    scale = x.encoder.scale
    d = torch.tensor([round(v * scale) for v in deltas], dtype=torch.long).reshape(-1, *([1] * x.dim()))
    y = x.clone()
    y.share = (bits.share * d.to(bits.share.device)).sum(0)
    return y + base


def _pow2_guess_reference(x: torch.Tensor, lo: int, hi: int, power: float, c: float) -> torch.Tensor:
    base, deltas = _pow2_guess_coeffs(lo, hi, power, c)
    y = torch.full_like(x, base, dtype=torch.float64)
    for j, dj in zip(range(lo, hi + 1), deltas):
        y = y + (x >= 2.0**j).double() * dj
    return y


def reciprocal_nr(x, iters: int = RECIP_ITERS, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1]):
    """1/x for x in [2^lo, 2^(hi+1)): initial guess (2/3) 2^-j on [2^j, 2^(j+1)) (so x*y0 in [2/3, 4/3)),
    then Newton y <- y (2 - x y), whose relative error squares each step: 1/3 -> 1e-1 -> 1e-2 -> 1e-4 -> 1e-8.
    Rounds: 1 cmp + 2*iters mul.  Bytes: (hi-lo+1) comparisons per element.  Leaks: shapes only.
    """
    y = _pow2_guess(x, lo, hi, 1.0, 2.0 / 3.0)
    for _ in range(iters):
        y = y * (2 - x * y)
    return y


def reciprocal_nr_reference(
    x: torch.Tensor, iters: int = RECIP_ITERS, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1]
) -> torch.Tensor:
    x = x.double()
    y = _pow2_guess_reference(x, lo, hi, 1.0, 2.0 / 3.0)
    for _ in range(iters):
        y = y * (2 - x * y)
    return y


RECIP_GS_ITERS = 3
RECIP_GS_STEPS = 4  # thresholds per octave of the Goldschmidt initial guess


def _step_guess_coeffs(lo: int, hi: int, q: int) -> tuple[list[float], float, list[float]]:
    """Thresholds t_k = 2^(lo + k/q) on [2^lo, 2^(hi+1)] and the step function y = 2 / (t_k + t_(k+1)) on each
    [t_k, t_(k+1)) (extended one step below and above), as base + sum_k [x >= t_k] delta_k."""
    ts = [2.0 ** (lo + k / q) for k in range((hi + 1 - lo) * q + 1)]
    rho = 2.0 ** (1 / q)
    edges = [ts[0] / rho] + ts + [ts[-1] * rho]
    ys = [2.0 / (edges[i] + edges[i + 1]) for i in range(len(edges) - 1)]
    return ts, ys[0], [ys[i + 1] - ys[i] for i in range(len(ys) - 1)]


#: lean="sliced": the resolution of the one wide comparison relative to the smallest threshold (2^-7: a bit may
#: read 0 only for x within 2^-7 t above its threshold t, where the interval below's guess still gives
#: |1 - x y0| <= 0.095 at q = 4 instead of 0.087)
SLICED_RESOLUTION_LOG2 = 7


def sliced_window(lo: int, hi: int, scale_bits: int = 16) -> tuple[int, int]:
    """(width, shift) of the one comparison of x - t_k over [2^lo, 2^(hi+1)): the shift keeps 2^shift ulps <=
    2^-SLICED_RESOLUTION_LOG2 of the smallest threshold, the width covers |x - t| < 2^(hi+1) (+ a bit of margin
    for the n 2^shift of :func:`mpcache.mpc.compare._ltz_lanes`). Public (the range)."""
    shift = max(0, lo + scale_bits - SLICED_RESOLUTION_LOG2)
    return min(64, hi + 1 + scale_bits - shift + 2), shift


def _bits_and_d0_masked(x, diffs, d: torch.Tensor, base: float, lo: int, hi: int, lockstep: bool):
    """The step guess's bits b_k = [x >= t_k] and d0 = x y0 with d0 local: the comparison's B2A into a mask plan's
    bit slot, x opened once in lockstep with its first round (8 B per element), then x y0 = base x + sum_k d_k
    (b_k x), every b_k x an exact ring product of a bit and one opened value (:mod:`mpcache.mpc.masked`); the sum is
    exact in the ring (its terms may wrap, their sum ~ 2^32 does not), then ONE truncation. The Beaver product's
    round is gone."""
    from .lockstep import parallel
    from .masked import BIT, RING, Plan

    shape = tuple(int(v) for v in x.size())
    plan = Plan({"b": (tuple(int(v) for v in diffs.size()), BIT), "x": (shape, RING)}, [("b", "x")], device=x.device)
    ltz, _ = parallel(
        lambda: _ltz_lanes(
            diffs, *sliced_window(lo, hi, x.encoder._precision_bits), b2a=plan.b2a("b", complement=True)
        ),
        lambda: plan.open([("x", x)]),
        enabled=lockstep,
    )
    prec = x.encoder._precision_bits
    acc = (plan.raw(("b", "x")) * d.to(x.share.device)).sum(0) + x.share * round(base * 2**prec)
    d0 = x.clone()
    d0.share = acc.div(2**prec, rounding_mode="trunc")  # CrypTen's 2PC truncation, on this party's share
    return 1 - ltz, d0


def _step_guess(x, lo: int, hi: int, q: int, lean, masked: bool = False, lockstep: bool = True):
    """y0 (and, ``masked``, d0 = x y0 without its product round: :func:`_bits_and_d0_masked`)."""
    ts, base, deltas = _step_guess_coeffs(lo, hi, q)
    d = torch.tensor([round(v * x.encoder.scale) for v in deltas], dtype=torch.long).reshape(-1, *([1] * x.dim()))
    diffs = _minus_publics(x, ts)  # (T, ...): x - t_k, one local op
    d0 = None
    if masked:
        if lean != "sliced":
            raise ValueError("the masked step guess needs the sliced comparison (lean='sliced')")
        bits, d0 = _bits_and_d0_masked(x, diffs, d, base, lo, hi, lockstep)
    elif lean == "sliced":
        bits = 1 - _ltz_lanes(diffs, *sliced_window(lo, hi, x.encoder._precision_bits))
    else:
        bits = 1 - _ltz(diffs, bool(lean))  # (T, ...), scale 1
    y = x.clone()
    y.share = (bits.share * d.to(bits.share.device)).sum(0)
    return (y + base, d0) if masked else y + base


def reciprocal_gs(
    x,
    iters: int = RECIP_GS_ITERS,
    lo: int = RECIP_RANGE[0],
    hi: int = RECIP_RANGE[1],
    q: int = RECIP_GS_STEPS,
    lean: bool | str = False,
    masked: bool = False,
    lockstep: bool = True,
):
    """1/x for x in [2^lo, 2^(hi+1)) by Goldschmidt's iteration from a finer step guess.
    ``masked`` (2PC with TFP or the dealer, ``lean="sliced"``): d0 = x y0 without its product's round
    (:func:`_bits_and_d0_masked`: x opened once beside the comparison, the bits' B2A into a mask plan).
    ``lean``: the guess's comparisons in 32-bit lanes (True: valid while x < 2^15), "sliced": ONE bit-sliced
    comparison layer as wide as the range needs (:func:`sliced_window`: width hi - lo + 10 bits at a resolution of
    2^-7 of the smallest threshold; e.g. 31 bits for a 45-entry anchored row: 5 rounds in 2PC), or CrypTen's.

    One batched comparison layer against q thresholds per octave gives y0 with |1 - x y0| <= (r-1)/(r+1),
    r = 2^(1/q) (0.087 for q = 4); then d0 = x y0 and, per step, f = 2 - d, (y, d) <- (y f, d f): the two
    products are independent, so a step is ONE round (Newton's y (2 - x y) is two). Relative error
    0.087^(2^iters) ~ 3e-9 after 3 steps (float model), plus ~1 ulp of truncation per step.
    Rounds: 1 cmp + 1 + iters mul (``masked``: 1 cmp + iters mul; Newton from the octave guess: 1 cmp + 2*4 mul).
    Bytes: (hi-lo+1) q comparisons per element (the softmax calls it once per row).  Leaks: shapes only.
    """
    import crypten

    if masked:
        y, d = _step_guess(x, lo, hi, q, lean, masked=True, lockstep=lockstep)
    else:
        y = _step_guess(x, lo, hi, q, lean)
        d = x * y
    for k in range(iters):
        f = 2 - d
        if k == iters - 1:
            y = y * f
        else:
            yd = crypten.stack([y, d]) * f
            y, d = yd[0], yd[1]
    return y


def reciprocal_gs_reference(
    x: torch.Tensor,
    iters: int = RECIP_GS_ITERS,
    lo: int = RECIP_RANGE[0],
    hi: int = RECIP_RANGE[1],
    q: int = RECIP_GS_STEPS,
) -> torch.Tensor:
    x = x.double()
    ts, base, deltas = _step_guess_coeffs(lo, hi, q)
    y = torch.full_like(x, base)
    for t, dl in zip(ts, deltas):
        y = y + (x >= t).double() * dl
    d = x * y
    for _ in range(iters):
        f = 2 - d
        y, d = y * f, d * f
    return y
