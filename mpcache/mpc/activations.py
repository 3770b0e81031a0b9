"""SiLU and GeLU on shares as x/2 plus an even part (a Chebyshev polynomial inside +-T, |x|/2 beyond), the two
breakpoints in one coarse comparison layer, beside their float models: in 2PC with TFP or the dealer on open-once
masks (:mod:`mpcache.mpc.masked`), else in Beaver forms. Leakage: shapes only.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .compare import _ltz_lanes
from .config import MpcConfig
from .masked import usable


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


def _cmp_lanes(x, lanes: int, block: int | None = 2, b2a=None):
    """[x < 0] with the comparison ``lanes`` names: 16 (coarse: 1/16 resolution, |x| < 2032, :func:`_ltz_lanes`),
    32 (exact, |x| < 32760, the lean circuit) or 64 (CrypTen's 64-bit circuit). ``block``: the bit-sliced circuit's
    first-round blocks (compare.py: 2 = the fewest bytes, 4 = one round less in 2PC)."""
    if lanes == 64:
        if b2a is not None:
            raise ValueError("a mask plan's B2A needs the bit-sliced comparison (act_lanes 8, 16 or 32)")
        return x._ltz()
    return _ltz_lanes(x, lanes, 12 if lanes == 16 else 0, block=block, b2a=b2a)


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


@functools.lru_cache(maxsize=8)
def _ps_coeffs(coeffs: tuple) -> tuple[tuple[float, ...], ...]:
    """(B0, B1, B2), each the Chebyshev coefficients of a polynomial of degree <= 2, with
    B0 + T3 (B1 + T3 B2) = sum_k coeffs[k] T_k for a polynomial of degree <= 8 (Paterson-Stockmeyer with baby steps
    T0..T2 and the giant step T3, in the Chebyshev basis: the 9 products T3^i T_j have degrees 0..8, so the system
    is triangular). For SiLU's and GeLU's fits every |B| < 2.5: the basis keeps fixed-point errors small."""
    from numpy.polynomial import chebyshev as C

    cols = []
    for power in range(3):
        base = np.array([1.0])
        for _ in range(power):
            base = C.chebmul(base, [0, 0, 0, 1])
        for j in range(3):
            col = C.chebmul(base, [0] * j + [1])
            cols.append(np.pad(col, (0, 9 - len(col))))
    if len(coeffs) > 9:
        raise ValueError(f"the Paterson-Stockmeyer form takes degree <= 8, got {len(coeffs) - 1}")
    b = np.linalg.solve(np.array(cols).T, np.pad(np.asarray(coeffs, dtype=np.float64), (0, 9 - len(coeffs))))
    b = np.where(np.abs(b) < 1e-12, 0.0, b)  # a lower degree's unused products (GeLU's degree 6: B2 is a constant)
    return tuple(tuple(float(v) for v in b[3 * i : 3 * i + 3]) for i in range(3))


def _chebyshev_ps(u, coeffs, gate=None):
    """sum_k coeffs[k] T_k(u) (degree <= 8) as B0 + T3 (B1 + T3 B2) (:func:`_ps_coeffs`): T2 (a square),
    T3 = 2 u T2 - u, T3 B2, then T3 (B1 + T3 B2) -- 4 rounds and 8 + 3 x 16 = 56 B per element (2PC) at degree
    7-8, against the doubling's (:func:`chebyshev_terms`) 3 rounds and 104 B at degree 8; at degree <= 6 B2 is a
    constant: 3 rounds and 40 B (the doubling: 3 and 72). ``gate`` (a share, degree 7-8 only): the product with
    the gate in the same 4 rounds, g p = (T3 g)(T3 B2 + B1) + B0 g, with T3 g and B0 g in T3 B2's round: 88 B
    (where p, then p g, takes 5 rounds and 72 B). Float model: :func:`_chebyshev` (the same series; times the
    gate). Leaks: shapes only."""
    b0, b1, b2 = _ps_coeffs(tuple(coeffs))
    t2 = _square(u) * 2 - 1
    t3 = (u * t2) * 2 - u

    def comb(b):  # a public constant where B has degree 0 (its product with T3 is then local)
        return b[0] if b[1] == b[2] == 0 else t2 * b[2] + u * b[1] + b[0]

    c0, c1, c2 = comb(b0), comb(b1), comb(b2)
    if gate is None:
        return t3 * (t3 * c2 + c1) + c0
    if any(isinstance(c, float) for c in (c0, c2)):
        raise ValueError("the gated Paterson-Stockmeyer form needs degree 7-8 (B0 and B2 of degree >= 1)")
    prods = _stack([t3, c0, t3]) * _stack([gate, gate, c2])  # T3 g, B0 g, T3 B2: one round
    return prods[0] * (prods[2] + c1) + prods[1]


#: rounds of the comparison by lane width in 2PC (compare.py: 1 + ceil(log2(width / 2)) + 1; 64 = CrypTen's circuit)
CMP_ROUNDS = {8: 4, 16: 5, 32: 6, 64: 8}


def _ps_fits(cfg: MpcConfig, lanes: int, poly_rounds: int) -> bool:
    """Whether the Paterson-Stockmeyer polynomial (``poly_rounds`` with x^2, gated or not) runs inside the
    comparison's rounds: lockstep merges openings (2PC), and the comparison is at least as long."""
    return cfg.lockstep and cfg.n_parties == 2 and poly_rounds <= CMP_ROUNDS.get(lanes, 0)


def _half_plus_even(x, T: float, coeffs, lanes: int, lockstep: bool = True, gate=None, ps: bool = False, block=2):
    """x/2 + h(x) for an even h ~ |x|/2 beyond +-T: h a Chebyshev polynomial in u = 2 (x/T)^2 - 1 inside, |x|/2
    outside. The breakpoints' comparison and the polynomial are independent: they run in lockstep
    (:mod:`mpcache.mpc.lockstep`, one exchange per round for both). The shared body of :func:`silu` and
    :func:`gelu` (their docstrings state the costs). ``gate`` (a share shaped like x): (x/2 + h(x)) * gate, with
    the gate's products x * gate (a third branch) and p * gate (inside the Paterson-Stockmeyer form's rounds, or
    after the doubling's) and the mux applied to the gated pieces. ``ps``: the polynomial in its Paterson-Stockmeyer
    form (:func:`_chebyshev_ps`: one round more, 48 B less per element), for where the comparison's rounds cover
    it (2PC lockstep)."""
    from .lockstep import parallel

    def poly():
        u = _square(x) * (2.0 / T**2) - 1.0
        if ps:
            return _chebyshev_ps(u, coeffs, gate)
        q = _chebyshev(u, coeffs)
        return q if gate is None else q * gate

    b, p, half = parallel(
        lambda: _cmp_lanes(_stack([-x + T, x + T]), lanes, block),  # [x > T], [x < -T]: one comparison layer
        poly,
        lambda: (x if gate is None else x * gate) * 0.5,
        enabled=lockstep,
    )
    return half + p + (b * _stack([half - p, -half - p])).sum(0)


def _cheb_monomials(k: int, slot: dict) -> tuple[dict, float]:
    """T_k(u) as (monomials of opened slots -> coefficient, constant), from the slots u, t2, t3 (and t4 for degree 7-8)
    by T_(m+n) = 2 T_m T_n - T_(m-n): every term a product of at most two opened values."""
    u, t2, t3, t4 = slot["u"], slot["t2"], slot["t3"], slot.get("t4")
    table = {
        0: ({}, 1.0),
        1: ({(u,): 1.0}, 0.0),
        2: ({(t2,): 1.0}, 0.0),
        3: ({(t3,): 1.0}, 0.0),
        4: ({(t4,): 1.0}, 0.0) if t4 is not None else ({(t2, t2): 2.0}, -1.0),
        5: ({(t2, t3): 2.0, (u,): -1.0}, 0.0),
        6: ({(t3, t3): 2.0}, -1.0),
        7: ({(t3, t4): 2.0, (u,): -1.0}, 0.0),
        8: ({(t4, t4): 2.0}, -1.0),
    }
    return table[k]


def _series_monomials(coeffs, slot: dict) -> tuple[dict, float]:
    """sum_k coeffs[k] T_k(u) as (monomials -> coefficient, constant) (:func:`_cheb_monomials`)."""
    terms: dict = {}
    const = 0.0
    for k, c in enumerate(coeffs):
        m, c0 = _cheb_monomials(k, slot)
        for key, v in m.items():
            key = tuple(sorted(key))
            terms[key] = terms.get(key, 0.0) + c * v
        const += c * c0
    return terms, const


def _masked_half_plus_even(x, T: float, coeffs, lanes: int, lockstep: bool = True, gate=None):
    """x/2 + h(x) (times ``gate``) on open-once masks (:mod:`mpcache.mpc.masked`): the values x (and the gate),
    u = 2 (x/T)^2 - 1, T2(u), T3(u) (and T4(u) at degree 7-8) are each opened once (rounds A-D, in lockstep with the
    breakpoints' comparison), every Chebyshev term T_5..T_8 is then a product of two opened values (local), and the
    comparison's bits gt = [x > T], lt = [x < -T] come out of its B2A as bit slots of the same plan, so with
    s = gt - lt and o = 1 - gt - lt (public affine combinations of their masks: one factor each) the output is one
    local sum:

        ungated:  (1 + s) x/2 + o p           (o p = sum c_k o T_k: monomials of o and <= 2 opened values)
        gated:    (1 + s) x g/2 + o g p       (p opened in round E)

    Where |x| > T the polynomial overflows the ring (garbage), but it only enters through monomials with the factor
    o, which are exactly 0 there (:mod:`mpcache.mpc.masked`, exact zeros). Rounds (2PC): ungated max(cmp, 4): 4 on
    a decode row (the comparison's blocks of 4), 5 over many rows (blocks of 2); gated one more (p's opening).
    Bytes per element: 2 comparisons (2 x ~22.6 B with blocks of 4, 2 x ~11.4 B with 2, their B2A included) + 8 per
    opened value: 8 x (x, u, t2, t3, t4) = 40 (SiLU: ~85 B on a decode row), GeLU (no t4) 32 (~77 B), gated SiLU
    8 x 7 = 56 (~101 B; ~79 B over many rows). Float model: :func:`_half_plus_even_reference` (the same function;
    fixed-point error: a few ulps per term). Leaks: shapes only."""
    from .lockstep import parallel
    from .masked import BIT, RING, Plan

    degree = len(coeffs) - 1
    shape = tuple(int(d) for d in x.size())
    ring = ["x", "u", "t2", "t3"] + (["t4"] if degree >= 7 else []) + (["g", "p"] if gate is not None else [])
    slots = {n: (shape, RING) for n in ring} | {"gt": (shape, BIT), "lt": (shape, BIT)}
    derived = {"s": (0, {"gt": 1, "lt": -1}), "o": (1, {"gt": -1, "lt": -1})}
    slot = {n: n for n in slots}
    p_terms, p_const = _series_monomials(coeffs, slot)
    if gate is None:
        out = {("x",): 0.5, ("s", "x"): 0.5, ("o",): p_const}
        for m, c in p_terms.items():
            out[("o", *m)] = out.get(("o", *m), 0.0) + c
    else:
        out = {("g", "x"): 0.5, ("g", "s", "x"): 0.5, ("g", "o", "p"): 1.0}
    monos = [("x", "x"), ("u", "u"), ("t2", "u"), ("t2", "t2"), *p_terms, *out]
    plan = Plan(slots, monos, derived, device=x.device)

    def poly():
        plan.open([("x", x)] + ([("g", gate)] if gate is not None else []))  # A
        plan.open([("u", plan.lin({("x", "x"): 2.0 / T**2}, -1.0))])  # B
        plan.open([("t2", plan.lin({("u", "u"): 2.0}, -1.0))])  # C
        opens = [("t3", plan.lin({("t2", "u"): 2.0, ("u",): -1.0}))]
        if "t4" in slots:
            opens.append(("t4", plan.lin({("t2", "t2"): 2.0}, -1.0)))
        plan.open(opens)  # D
        return plan.lin(p_terms, p_const) if gate is not None else None

    # [x > T], [x < -T]: one comparison layer, its first round's blocks by size (compare.block_size: 4 on a decode
    # row -- 4 rounds, as long as A-D -- and 2 over many rows, where bytes outweigh a round), its B2A into the plan
    _, p = parallel(
        lambda: _cmp_lanes(_stack([-x + T, x + T]), lanes, block=None, b2a=plan.b2a("gt", "lt")),
        poly,
        enabled=lockstep,
    )
    if gate is not None:
        plan.open([("p", p)])  # E
    return plan.lin(out)


def _half_plus_even_reference(x: torch.Tensor, T: float, coeffs) -> torch.Tensor:
    x = x.double()
    b = torch.stack([(x > T).double(), (x < -T).double()])
    p = _chebyshev(x * x * (2.0 / T**2) - 1.0, coeffs)
    half = x * 0.5
    return half + p + (b * torch.stack([half - p, -half - p])).sum(0)


def silu(x, lanes: int | None = None, cfg: MpcConfig | None = None, gate=None, ps: bool | None = None):
    """SiLU(x) = x/2 + h(x): h a degree-8 Chebyshev polynomial in u = 2 (x/8)^2 - 1 on |x| <= 8 and |x|/2 beyond.

    **2PC with TFP or the dealer (the default, ``cfg.masked_acts``):** on open-once masks
    (:func:`_masked_half_plus_even`): 4 rounds on a decode row, ~86 B per element (gated: 5 rounds, ~102 B; over
    many rows 5 / 6 rounds, ~63 / ~79 B). The Beaver forms below run in 3PC, with ``masked_acts = False``, or with ``ps`` forced.

    [x > 8] and [x < -8] in one comparison layer (``lanes``, default ``cfg.act_lanes``: 16 = coarse 16-bit lanes,
    1/16 resolution, valid for |x| < 2032; next to +-8 either piece is within 2.8e-3 of SiLU, so a comparison that
    errs there adds no error beyond the bound; 3.0e-3 in 3PC, whose window is 1/8), x^2 (a square), the polynomial,
    the mux (one stacked product of 2 bits x 2 values). The polynomial: where lockstep merges (2PC) and the
    comparison is at least as long, its Paterson-Stockmeyer form (:func:`_chebyshev_ps`: 4 rounds, 56 B), else the
    Chebyshev terms by doubling (:func:`chebyshev_terms`: 3 rounds, a square + 2 stacked products, 104 B).
    Rounds (2PC): max(cmp, 1 + 4) + 1 = 6 with 16-bit lanes (cmp = 5, compare.py; 6 with 32, 8 with CrypTen's):
    the comparison runs in lockstep with x^2 and the polynomial (``cfg.lockstep = False``: cmp + 1 + 3 + 1 = 10).
    Bytes per element (2PC): 2 comparisons (2 x ~11.4 B, bit-sliced 16-bit lanes) + 8 (x^2) + 56 (polynomial) +
    32 (mux) ~ 119 B (the doubling: 167 B; session 11's lane-packed comparisons: 184 B). Float model:
    :func:`silu_reference` (max abs error vs SiLU 2.7e-3, at |x| = 8; both forms are the same polynomial).
    ``gate`` (the MLP's up projection): SiLU(x) * gate in the same 6 rounds where lockstep merges (2PC), instead
    of 6 + 1: x * gate rides in x^2's round, the polynomial's form takes the gate inside its 4 rounds
    (:func:`_chebyshev_ps`: 88 B) and the mux selects among the gated pieces: ~167 B in all. 3PC (resharing not
    merged) and ``cfg.lockstep = False``: SiLU, then the product. Float model: ``silu_reference(x) * gate``.
    ``ps`` (None: the choice above) forces the polynomial's form (``experiments/floor_bench.py`` compares both).
    Leaks: shapes only."""
    cfg = cfg or MpcConfig.current()
    lanes = cfg.act_lanes if lanes is None else lanes
    if ps is None and usable(cfg):
        return _masked_half_plus_even(x, SILU_T, SILU_CHEB, lanes, cfg.lockstep, gate)
    merged = cfg.lockstep and cfg.n_parties == 2
    # the Beaver forms: the gate inside the rounds for one row (decode); many rows (prefill): after (16 B less each)
    if gate is not None and (not merged or (x.dim() > 1 and int(x.shape[0]) > 1)):
        return silu(x, lanes, cfg, ps=ps) * gate
    if ps is None:
        ps = _ps_fits(cfg, lanes, 5)
    return _half_plus_even(x, SILU_T, SILU_CHEB, lanes, cfg.lockstep, gate, ps)


def silu_reference(x: torch.Tensor) -> torch.Tensor:
    """The float model of :func:`silu` (exact comparisons)."""
    return _half_plus_even_reference(x, SILU_T, SILU_CHEB)


def gelu(x, lanes: int | None = None, cfg: MpcConfig | None = None, ps: bool | None = None):
    """GeLU (tanh form) = x/2 + h(x): h a degree-6 Chebyshev polynomial in u = 2 (x/4)^2 - 1 on |x| <= 4, |x|/2
    beyond (as :func:`silu`). 2PC with TFP or the dealer (the default): on open-once masks
    (:func:`_masked_half_plus_even`): 4 rounds, ~77 B per element on a decode row. Otherwise (``ps`` forced, 3PC):
    the polynomial in its Paterson-Stockmeyer form (at degree 6 as many rounds as the doubling, 3, and 40 B instead
    of 72). Rounds: max(cmp, 1 + 3) + 1 (lockstep, as :func:`silu`): 5 in 2PC, the
    comparison's first round in blocks of 4 (4 rounds, as long as the polynomial; blocks of 2: 5 rounds and half the
    bytes). Bytes per element (2PC): 2 x ~22.6 (16-bit lanes) + 8 (x^2) + 40 + 32 (mux) ~ 125 B. Float model:
    :func:`gelu_reference` (max abs error vs GeLU 8.1e-4). ``ps=False``: the doubling (for comparison). Leaks:
    shapes only."""
    cfg = cfg or MpcConfig.current()
    lanes = cfg.act_lanes if lanes is None else lanes
    if ps is None and usable(cfg):
        return _masked_half_plus_even(x, GELU_T, GELU_CHEB, lanes, cfg.lockstep)
    return _half_plus_even(x, GELU_T, GELU_CHEB, lanes, cfg.lockstep, ps=ps is not False, block=4)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """The float model of :func:`gelu` (exact comparisons)."""
    return _half_plus_even_reference(x, GELU_T, GELU_CHEB)
