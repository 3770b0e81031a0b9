"""SiLU and GeLU on shares as x/2 plus an even part (a Chebyshev polynomial inside +-T, |x|/2 beyond), the two
breakpoints in one coarse comparison layer, beside their float models. Leakage: shapes only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .compare import _ltz_lanes
from .config import MpcConfig


def _cheb_fit(f, degree: int, T: float) -> list[float]:
    """Chebyshev coefficients (ascending) of f on x in [0, T] in the variable u = 2 (x/T)^2 - 1: a near-minimax
    fit (iteratively re-weighted least squares on a deterministic grid)."""
    from numpy.polynomial import chebyshev as C

    xs = np.linspace(0.0, T, 8001)
    u, y = 2 * (xs / T) ** 2 - 1, f(xs)
    w = np.ones_like(xs)
    for _ in range(60):
        c = C.chebfit(u, y, degree, w=np.sqrt(w))
        w = w * (np.abs(C.chebval(u, c) - y) + 1e-9)
        w /= w.sum()
    return C.chebfit(u, y, degree, w=np.sqrt(w)).tolist()


def _h_silu(x):
    return 0.5 * x * np.tanh(0.5 * x)  # SiLU(x) - x/2


def _h_gelu(x):
    return 0.5 * x * np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))  # GeLU_tanh(x) - x/2


# SiLU(x) = x/2 + h(x) with h(x) = (x/2) tanh(x/2) even and smooth, ~|x|/2 for large |x|: on |x| <= SILU_T a degree-8
# polynomial in u = 2 (x/SILU_T)^2 - 1 in the Chebyshev basis (every |coefficient| < 2.5 and every term in [-1, 1]:
# fixed-point errors are not amplified, unlike a monomial basis whose coefficients reach ~1e3 here); beyond, |x|/2.
# Max abs error of the float model: 2.7e-3 (the tail |x| e^-|x| at |x| = 8; the fit inside: 1.9e-3). The pieces
# differ by that much at +-T, so a comparison that errs next to a breakpoint (the coarse one, within 1/16) picks a
# piece whose error there is still <= 2.7e-3 + 1e-4.
SILU_T, SILU_DEGREE = 8.0, 8
SILU_CHEB = _cheb_fit(_h_silu, SILU_DEGREE, SILU_T)
# GeLU (tanh form): the same split with T = 4, degree 6: max abs error 8.1e-4 (the tail beyond 4: 7e-5).
GELU_T, GELU_DEGREE = 4.0, 6
GELU_CHEB = _cheb_fit(_h_gelu, GELU_DEGREE, GELU_T)
# MpcConfig.act_lanes = 16: the breakpoints by 16-bit-lane comparisons at 1/16 resolution, valid for |x| < 2032;
# SmolLM2's gate inputs reach |x| ~ 50 on Austen text (measured over 3 x 1k-token prompts), 40x inside it.


def _stack(xs):
    if isinstance(xs[0], torch.Tensor):
        return torch.stack(xs)
    import crypten

    return crypten.stack(xs)


def _square(x):
    return x * x if isinstance(x, torch.Tensor) else x.square()


def _cmp_lanes(x, lanes: int):
    """[x < 0] with the comparison ``lanes`` names: 16 (coarse: 1/16 resolution, |x| < 2032, :func:`_ltz_lanes`),
    32 (exact, |x| < 32760, the lean circuit) or 64 (CrypTen's 64-bit circuit)."""
    if lanes == 64:
        return x._ltz()
    return _ltz_lanes(x, lanes, 12 if lanes == 16 else 0)


def chebyshev_terms(u, degree: int):
    """[T_1(u), ..., T_degree(u)] for u in [-1, 1] (shares or a float tensor), by T_(m+n) = 2 T_m T_n - T_(m-n)
    with m - n in {0, 1}: each doubling of the known degrees is ONE stacked product (T_2 alone: a square).
    Rounds: ceil(log2 degree). Bytes per element (2PC): 8 for T_2, then 16 per term. Every term stays in [-1, 1],
    so each carries a few ulps of fixed-point error (a doubling multiplies an earlier error by <= 4)."""
    ts = [None, u]
    if degree >= 2:
        ts.append(_square(u) * 2 - 1)
    while len(ts) <= degree:
        k = len(ts) - 1
        js = list(range(k + 1, min(2 * k, degree) + 1))
        ms = [(j + 1) // 2 for j in js]
        prod = _stack([ts[m] for m in ms]) * _stack([ts[j - m] for j, m in zip(js, ms)]) * 2
        for i, (j, m) in enumerate(zip(js, ms)):
            ts.append(prod[i] - (ts[2 * m - j] if 2 * m - j > 0 else 1))
    return ts[1:]


def _chebyshev(u, coeffs):
    """sum_k coeffs[k] T_k(u): the terms, then one public linear combination (local)."""
    ts = _stack(chebyshev_terms(u, len(coeffs) - 1))
    c = torch.tensor(coeffs[1:], dtype=torch.float64).reshape(-1, *([1] * (ts.dim() - 1)))
    return (ts * (c if isinstance(ts, torch.Tensor) else c.float())).sum(0) + coeffs[0]


def _half_plus_even(x, T: float, coeffs, lanes: int, lockstep: bool = True, gate=None):
    """x/2 + h(x) for an even h ~ |x|/2 beyond +-T: h a Chebyshev polynomial in u = 2 (x/T)^2 - 1 inside, |x|/2
    outside. The breakpoints' comparison and the polynomial are independent: they run in lockstep
    (:mod:`mpcache.mpc.lockstep`, one exchange per round for both). The shared body of :func:`silu` and
    :func:`gelu` (their docstrings state the costs). ``gate`` (a share shaped like x): (x/2 + h(x)) * gate, with
    the gate's products x * gate (a third branch) and p * gate (after the polynomial) inside the comparison's rounds
    and the mux applied to the gated pieces: the same rounds as the activation alone, + 16 B per element."""
    from .lockstep import parallel

    def poly():
        q = _chebyshev(_square(x) * (2.0 / T**2) - 1.0, coeffs)
        return q if gate is None else q * gate

    b, p, half = parallel(
        lambda: _cmp_lanes(_stack([-x + T, x + T]), lanes),  # [x > T], [x < -T]: one comparison layer
        poly,
        lambda: (x if gate is None else x * gate) * 0.5,
        enabled=lockstep,
    )
    return half + p + (b * _stack([half - p, -half - p])).sum(0)


def _half_plus_even_reference(x: torch.Tensor, T: float, coeffs) -> torch.Tensor:
    x = x.double()
    b = torch.stack([(x > T).double(), (x < -T).double()])
    p = _chebyshev(x * x * (2.0 / T**2) - 1.0, coeffs)
    half = x * 0.5
    return half + p + (b * torch.stack([half - p, -half - p])).sum(0)


def silu(x, lanes: int | None = None, cfg: MpcConfig | None = None, gate=None):
    """SiLU(x) = x/2 + h(x): h a degree-8 Chebyshev polynomial in u = 2 (x/8)^2 - 1 on |x| <= 8 and |x|/2 beyond.
    [x > 8] and [x < -8] in one comparison layer (``lanes``, default ``cfg.act_lanes``: 16 = coarse 16-bit lanes,
    1/16 resolution, valid for |x| < 2032; next to +-8 either piece is within 2.8e-3 of SiLU, so a comparison that
    errs there adds no error beyond the bound; 3.0e-3 in 3PC, whose window is 1/8), x^2 (a square), the Chebyshev terms (a square + 2 stacked products), the mux (one stacked
    product of 2 bits x 2 values).
    Rounds: max(cmp, 1 + 3) + 1 = 7 with 16-bit lanes (cmp = 6; 7 with 32, 8 with CrypTen's): the comparison runs
    in lockstep with x^2 and the Chebyshev terms (``cfg.lockstep = False``: cmp + 1 + 3 + 1 = 11).
    Bytes per element (2PC): 2 comparisons (2 x 44 B with 16-bit lanes) + 8 (x^2) + 8 + 32 + 64 (Chebyshev) +
    32 (mux) ~ 232 B (the previous 4-breakpoint, monomial-Horner design: ~680 B). Float model:
    :func:`silu_reference` (max abs error vs SiLU 2.7e-3, at |x| = 8).
    ``gate`` (the MLP's up projection): SiLU(x) * gate in the same 7 rounds where lockstep merges (2PC), instead
    of 7 + 1: the gate multiplies x and the polynomial inside the comparison's rounds and the mux selects among the
    gated pieces (+ 16 B per element: two products by the gate instead of one); 3PC (resharing not merged) and
    ``cfg.lockstep = False``: SiLU, then the product. Float model: ``silu_reference(x) * gate``. Leaks: shapes
    only."""
    cfg = cfg or MpcConfig.current()
    lanes = cfg.act_lanes if lanes is None else lanes
    if gate is not None and not (cfg.lockstep and cfg.n_parties == 2):
        return _half_plus_even(x, SILU_T, SILU_CHEB, lanes, cfg.lockstep) * gate
    return _half_plus_even(x, SILU_T, SILU_CHEB, lanes, cfg.lockstep, gate)


def silu_reference(x: torch.Tensor) -> torch.Tensor:
    """The float model of :func:`silu` (exact comparisons)."""
    return _half_plus_even_reference(x, SILU_T, SILU_CHEB)


def gelu(x, lanes: int | None = None, cfg: MpcConfig | None = None):
    """GeLU (tanh form) = x/2 + h(x): h a degree-6 Chebyshev polynomial in u = 2 (x/4)^2 - 1 on |x| <= 4, |x|/2
    beyond (as :func:`silu`). Rounds: max(cmp, 1 + 3) + 1 (lockstep, as :func:`silu`). Bytes per element (2PC): 2 x 44 (16-bit lanes) + 8 + 8 +
    32 + 32 + 32 ~ 200 B. Float model: :func:`gelu_reference` (max abs error vs GeLU 8.1e-4). Leaks: shapes only."""
    cfg = cfg or MpcConfig()
    return _half_plus_even(x, GELU_T, GELU_CHEB, cfg.act_lanes if lanes is None else lanes, cfg.lockstep)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """The float model of :func:`gelu` (exact comparisons)."""
    return _half_plus_even_reference(x, GELU_T, GELU_CHEB)
