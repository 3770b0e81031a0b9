"""Secure nonlinear protocols on CrypTen arithmetic shares, each with its float model beside it.

Every ``<op>`` works on ``MPCTensor`` shares; ``<op>_reference`` is the same algorithm (same iterations, same
approximation) on float64 torch tensors, so tests can measure the fixed-point error alone (secure vs reference)
and the approximation error alone (reference vs the exact torch op).

Cost notation (per call, 2PC, CrypTen 0.4.1, 64-bit ring): ``cmp`` = one comparison layer (``_ltz``: A2B with a
log-depth adder + bit extraction; ~8 rounds; measured rounds/bytes are pinned in tests/test_secure_ops.py);
``mul`` = one Beaver multiplication (1 round: open x-a and y-b); a public scalar/tensor product is local in 2PC
(truncation is local) and communicates only in 3PC. Shapes (numbers of comparisons, iterations) depend only on
public sizes. **Leakage of every protocol here: none beyond the shapes of its inputs.**
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .schedules import _radix_schedule, lockstep_schedule, max_schedule, strata_schedule

# ---- comparisons and max -------------------------------------------------------------------------------------


def _cat(xs, dim):
    import crypten

    return crypten.cat(xs, dim=dim)


# ---- a lean comparison: 32-bit lanes, two elements per 64-bit word ----------------------------------------------
LEAN_CMP_BITS = 32      # the lean comparison is exact for |x| < 2^31 ring units (|x| < 32768 at 16 fractional bits)


def _from_shares(share: torch.Tensor, precision: int | None):
    from crypten.mpc import MPCTensor

    return MPCTensor.from_shares(share, precision=precision)


def _ltz_lean(x):
    """[x < 0] as an arithmetic 0/1 share at scale 1 (what CrypTen's ``_ltz`` returns), for |x| < 2^31 ring units.

    CrypTen's ``_ltz`` converts the additive shares to XOR shares and adds them with a 64-bit Sklansky adder
    (1 AND round for the generate bits + 6 prefix rounds), then turns the sign bit into an arithmetic share
    (1 opening): 8 rounds, 216 bytes/element (2PC). When |x| < 2^31, bit 31 of x mod 2^32 is the sign, and only
    the carry into bit 31 is needed: 5 prefix levels, which never cross an aligned 32-bit block, so two elements
    share one 64-bit word (one in each half). Same circuit, half the words, one level fewer:
    1 + 5 + 1 = 7 rounds and ~96 bytes/element (2PC). With n > 2 parties the n binary shares are first reduced
    to two by carry-save adders (1 AND round each, carries masked at the lane boundary).
    Exact (no approximation) inside the bound; outside it the result is the sign of x mod 2^32.
    Leaks: shapes only.
    """
    import crypten.communicator as comm
    from crypten.mpc.primitives import BinarySharedTensor
    from crypten.mpc.primitives.beaver import B2A_single_bit

    n = comm.get().get_world_size()
    if n < 2:
        return x._ltz()
    shape, flat = x.share.shape, x.share.reshape(-1)
    N = flat.numel()
    h = (N + 1) // 2
    lo, hi = flat[:h], flat[h:]
    if hi.numel() < h:
        hi = torch.cat([hi, hi.new_zeros(h - hi.numel())])
    packed = (lo & 0xFFFFFFFF) | (hi << 32)                 # each party's own arithmetic share, two lanes a word
    xs = [BinarySharedTensor(packed, src=i) for i in range(n)]  # XOR shares of each party's share: no traffic
    not_lane_carry = ~(1 << 32)
    while len(xs) > 2:                                       # carry-save: a + b + c = (a^b^c) + 2 maj(a, b, c)
        a, b, c = xs.pop(), xs.pop(), xs.pop()
        ab = a ^ b
        prods = BinarySharedTensor.stack([a, c]) & BinarySharedTensor.stack([b, ab])
        maj = prods[0] ^ prods[1]
        xs += [ab ^ c, (maj << 1) & not_lane_carry]
    a, b = xs
    S, P = a & b, a ^ b                                      # generate / propagate
    SP = BinarySharedTensor.stack([S, P])
    masks, out_masks, mults = _spk_constants()
    for i in range(5):                                       # Sklansky prefix inside aligned 32-bit blocks
        P0 = SP[1] & int(out_masks[i])
        S1P1 = SP & int(masks[i])
        S1P1._tensor *= mults[i]
        update = P0 & S1P1
        SP[1] &= int(out_masks[i] ^ -1)
        SP ^= update
    t = P ^ (SP[0] << 1)                                     # bit 31 / 63: sign of lane 0 / lane 1
    bits = BinarySharedTensor.stack([(t >> 31) & 1, (t >> 63) & 1])
    ar = B2A_single_bit(bits)
    return _from_shares(ar.share.reshape(-1)[:N].reshape(shape), precision=0)


def _minus_publics(x, ts):
    """``crypten.stack([x - t for t in ts])`` as ONE local op: party 0 subtracts the encoded thresholds from a
    broadcast copy of its share (the encoding of each ``t`` is CrypTen's, ``int(scale * t)``), the others copy
    theirs. Same shares bit for bit, without T CrypTensor subtractions and a T-way stack (~9 ms of Python per
    call for the 82 thresholds of ``norm_scale``). No communication in any protocol (additive shares at rest)."""
    import crypten.communicator as comm

    share = x.share
    enc = torch.tensor([x.encoder.scale * t for t in ts], dtype=torch.long, device=share.device)
    out = share.unsqueeze(0).expand(len(ts), *share.shape)
    out = out - enc.reshape(-1, *([1] * share.dim())) if comm.get().get_rank() == 0 else out.clone()
    res = _from_shares(out, precision=None)
    res.encoder = x.encoder
    return res


def _spk_constants():
    masks = torch.tensor([6148914691236517205, 2459565876494606882, 578721382704613384, 36029346783166592,
                          140737488388096, 2147483648], dtype=torch.long)
    mults = torch.tensor([(1 << (2 ** i + 1)) - 2 for i in range(6)], dtype=torch.long)
    return masks, masks * mults, mults


def _ltz(x, lean: bool):
    return _ltz_lean(x) if lean else x._ltz()


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


def tree_max(x, dim: int = -1, keepdim: bool = False, *, radix=2, lean: bool = False):
    """Maximum along ``dim`` by a tournament: values only (no argmax one-hot, no random tie-break,
    unlike CrypTen's ``max(dim)``, which spends ~45% more bytes on them). Exact: the result is one of the entries.

    ``radix`` (int or sequence of layer radices, see ``_radix_layer``): 2 = the pairwise tree (ceil(log2 m) x
    (cmp + 1 mul)); higher radices trade bytes for rounds. ``lean``: use ``_ltz_lean`` (32-bit lanes: 7 rounds
    and ~96 bytes per comparison instead of 8 and 216), valid when every difference of two entries is below
    2^15 in magnitude (|x| < 16384).
    Rounds: sum over layers of cmp + ceil(log2 r) mul.  Leaks: shapes only.
    """
    dim = dim % x.dim()
    x = x.transpose(dim, -1) if dim != x.dim() - 1 else x
    if radix == "auto":
        radix = max_schedule(int(torch.Size(x.shape[:-1]).numel()), int(x.shape[-1]), lean)
    for r in _radix_schedule(x.shape[-1], radix):
        if r == 2:                                      # compare + mux: 1 product per pair
            m = x.shape[-1]
            h = m // 2
            a, b = x[..., :h], x[..., h:2 * h]
            d = a - b
            top = b + d * (1 - _ltz(d, lean))           # max(a, b) = b + (a - b) * [a - b >= 0]
            x = top if m % 2 == 0 else _cat([top, x[..., 2 * h:]], dim=-1)
        else:
            x = _radix_layer(x, r, lean)
    if dim != x.dim() - 1:
        x = x.transpose(dim, -1)                        # the size-1 reduced axis goes back to ``dim``
    return x if keepdim else x.squeeze(dim)


def tree_max_reference(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    return x.max(dim=dim, keepdim=keepdim).values


# ---- exp -----------------------------------------------------------------------------------------------------
EXP_ITERS = 8


def exp_fit_coeffs(fit_range: float, iters: int = EXP_ITERS) -> tuple[float, float]:
    """Base c0 + c1 x whose 2^iters-th power is a minimax-log-error exp on [-fit_range, 0]: u = c1/c0 makes the
    log error n ln(1 + u x) - x vanish at both ends (n = 2^iters), c0 centres it (equioscillation). For
    fit_range 8: log error <= 0.0156 on [-8, 0] (relative error 1.6% on [-5, 0], 5.4% at -10, 17% at -14)."""
    n = 2 ** iters
    u = (1 - math.exp(-fit_range / n)) / fit_range
    xs = (n * u - 1) / u
    c0 = math.exp(-(n * math.log(1 + u * xs) - xs) / 2 / n)
    return c0, c0 * u


def exp_limit(x, iters: int = EXP_ITERS, fit_range: float | None = None):
    """exp(x) ~ (1 + x / 2^iters)^(2^iters) for x <= 0 (CrypTen's limit approximation).

    Valid for x > -2^iters (= -256): below, the base turns negative; callers only pass x - max(x) with masked
    entries zeroed afterwards. Error (float model): relative error exp(x) vs approx is x^2/2^(iters+1) to first
    order, e.g. 5% at x = -5 and 0.2% at x = -1; probabilities renormalise most of it away.
    ``fit_range``: use the minimax base of ``exp_fit_coeffs`` instead of 1 + x/2^iters (same cost; spreads the
    error evenly over [-fit_range, 0] instead of exact at 0 and 18% off at -10).
    Rounds: iters mul (squares: 8 bytes/element each in 2PC).  Leaks: shapes only.
    """
    if fit_range:
        c0, c1 = exp_fit_coeffs(fit_range, iters)
        y = x * c1 + c0
    else:
        y = 1 + x * (1.0 / 2 ** iters)
    for _ in range(iters):
        y = y.square()                                  # opens only y - r (a square pair): half a product's bytes
    return y


def exp_limit_reference(x: torch.Tensor, iters: int = EXP_ITERS, fit_range: float | None = None) -> torch.Tensor:
    if fit_range:
        c0, c1 = exp_fit_coeffs(fit_range, iters)
        y = x.double() * c1 + c0
    else:
        y = 1 + x.double() / 2 ** iters
    for _ in range(iters):
        y = y * y
    return y


# ---- reciprocal and reciprocal square root: range-free initial guess + Newton --------------------------------
RECIP_RANGE = (-8, 8)      # softmax denominators scaled by 1/sqrt(m) lie in [2^-8, 2^8] for m <= 65536
RECIP_ITERS = 4


def _pow2_guess_coeffs(lo: int, hi: int, power: float, c: float) -> tuple[float, list[float]]:
    """y0(x) = c * 2^(-j*power) for x in [2^j, 2^(j+1)), written as base + sum_j [x >= 2^j] * delta_j."""
    ys = [c * 2.0 ** (-j * power) for j in range(lo - 1, hi + 1)]
    return ys[0], [ys[i + 1] - ys[i] for i in range(len(ys) - 1)]


def _pow2_guess(x, lo: int, hi: int, power: float, c: float):
    """One batched comparison layer against the public thresholds 2^lo .. 2^hi, then a local linear combination
    of the bits with public fixed-point coefficients (shares times integers: exact)."""
    base, deltas = _pow2_guess_coeffs(lo, hi, power, c)
    bits = 1 - _minus_publics(x, [2.0 ** j for j in range(lo, hi + 1)])._ltz()           # (J, ...), scale 1
    scale = x.encoder.scale
    d = torch.tensor([round(v * scale) for v in deltas], dtype=torch.long).reshape(-1, *([1] * x.dim()))
    y = x.clone()
    y.share = (bits.share * d.to(bits.share.device)).sum(0)
    return y + base


def _pow2_guess_reference(x: torch.Tensor, lo: int, hi: int, power: float, c: float) -> torch.Tensor:
    base, deltas = _pow2_guess_coeffs(lo, hi, power, c)
    y = torch.full_like(x, base, dtype=torch.float64)
    for j, dj in zip(range(lo, hi + 1), deltas):
        y = y + (x >= 2.0 ** j).double() * dj
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


def reciprocal_nr_reference(x: torch.Tensor, iters: int = RECIP_ITERS, lo: int = RECIP_RANGE[0],
                            hi: int = RECIP_RANGE[1]) -> torch.Tensor:
    x = x.double()
    y = _pow2_guess_reference(x, lo, hi, 1.0, 2.0 / 3.0)
    for _ in range(iters):
        y = y * (2 - x * y)
    return y


RECIP_GS_ITERS = 3
RECIP_GS_STEPS = 4         # thresholds per octave of the Goldschmidt initial guess


def _step_guess_coeffs(lo: int, hi: int, q: int) -> tuple[list[float], float, list[float]]:
    """Thresholds t_k = 2^(lo + k/q) on [2^lo, 2^(hi+1)] and the step function y = 2 / (t_k + t_(k+1)) on each
    [t_k, t_(k+1)) (extended one step below and above), as base + sum_k [x >= t_k] delta_k."""
    ts = [2.0 ** (lo + k / q) for k in range((hi + 1 - lo) * q + 1)]
    rho = 2.0 ** (1 / q)
    edges = [ts[0] / rho] + ts + [ts[-1] * rho]
    ys = [2.0 / (edges[i] + edges[i + 1]) for i in range(len(edges) - 1)]
    return ts, ys[0], [ys[i + 1] - ys[i] for i in range(len(ys) - 1)]


def _step_guess(x, lo: int, hi: int, q: int, lean: bool):
    ts, base, deltas = _step_guess_coeffs(lo, hi, q)
    bits = 1 - _ltz(_minus_publics(x, ts), lean)                        # (T, ...), scale 1
    d = torch.tensor([round(v * x.encoder.scale) for v in deltas], dtype=torch.long).reshape(-1, *([1] * x.dim()))
    y = x.clone()
    y.share = (bits.share * d.to(bits.share.device)).sum(0)
    return y + base


def reciprocal_gs(x, iters: int = RECIP_GS_ITERS, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1],
                  q: int = RECIP_GS_STEPS, lean: bool = False):
    """1/x for x in [2^lo, 2^(hi+1)) by Goldschmidt's iteration from a finer step guess.

    One batched comparison layer against q thresholds per octave gives y0 with |1 - x y0| <= (r-1)/(r+1),
    r = 2^(1/q) (0.087 for q = 4); then d0 = x y0 and, per step, f = 2 - d, (y, d) <- (y f, d f): the two
    products are independent, so a step is ONE round (Newton's y (2 - x y) is two). Relative error
    0.087^(2^iters) ~ 3e-9 after 3 steps (float model), plus ~1 ulp of truncation per step.
    Rounds: 1 cmp + 1 + iters mul (Newton from the octave guess: 1 cmp + 2*4 mul).
    Bytes: (hi-lo+1) q comparisons per element (the softmax calls it once per row).  Leaks: shapes only.
    """
    import crypten

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


def reciprocal_gs_reference(x: torch.Tensor, iters: int = RECIP_GS_ITERS, lo: int = RECIP_RANGE[0],
                            hi: int = RECIP_RANGE[1], q: int = RECIP_GS_STEPS) -> torch.Tensor:
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


# ---- softmax -------------------------------------------------------------------------------------------------
MASK_SHIFT = 1024.0   # masked logits are shifted down by this before the max; exp(.) of them is zeroed publicly


# Defaults chosen by experiments/softmax_bench.py (9 rows; RESULTS.md "Lean softmax vs stock"). 2PC: vs the
# pairwise tree + CrypTen comparison + Newton (radix 2, lean False, "newton"), rounds 115 -> 58 at 1k and
# 142 -> 68 at 8k for ~12% more bytes (2.83 -> 3.18 MB, 22.5 -> 25.1 MB); stock CrypTen: 137/167 rounds,
# 6.4/47.7 MB. 3PC: 63/74 rounds, 6.5/51 MB vs stock 208/259, 35/266 MB. Fewest bytes instead: radix 2 + lean
# (2PC 1.73/13.6 MB, 105/129 rounds).
SOFTMAX_RADIX = "auto"          # max-tree layer radices: "auto" = max_schedule (LAN latency), or a tuple (tree_max)
SOFTMAX_LEAN = True             # 32-bit-lane comparisons (_ltz_lean): logits must satisfy |x| < 16384
SOFTMAX_RECIP = "goldschmidt"   # "newton" (reciprocal_nr) or "goldschmidt" (reciprocal_gs)
SOFTMAX_EXP_FIT = None          # None: exp base 1 + x/256. 8.0: the minimax base on [-8, 0], same cost, peaked rows
#                                 ~6-9x more accurate (bench: 2.3e-2 -> 2.6e-3 at 1k, 3.8e-2 -> 6.2e-3 at 8k) but
#                                 near-flat rows less (1.6% vs 0.2% on [-1, 0]): it flipped a tiny-llama snapkv token
#                                 vs plaintext (tests/mpi_jobs.py job_oblivious), so it is not the default


# Anchored softmax (decode rows, no mask): the exp's offset is the max over a few always-attended PUBLIC columns
# (the first ANCHOR[0] and the last ANCHOR[1] of the row: the attention sinks and the newest rows) instead of the
# max over the whole row. Softmax is shift-invariant, so the result is the same function; what changes is the
# exp's argument range: y = x - anchor_max <= D, where D = row max - anchor max >= 0. Measured on SmolLM2-135M
# (full-cache decode, passkey prompts, every layer and head; experiments/anchor_excess.py): D <= 8.9 at 1k and
# <= 9.9 at 4k tokens, 99% of rows D <= 4.6. Precision: the sum s of the exps reaches ~e^D, and 1/(s/sqrt(m)) in
# 16-bit fixed point keeps fewer ulps as D grows. Fixed-point emulation on a 412-entry row (RESULTS.md):
# max abs error 1.6e-3 at D = 4, 4.5e-3 at 8, 8.5e-3 at 10, then a common scale error of the row's probabilities,
# 3% at D = 12, 8% at 13, and all-zero output from D ~ 15 (the exp itself overflows only past ~21.5). So the
# anchors must be rows whose logits are near the top: the sinks and the NEWEST rows (Transformer.DECODE_ANCHOR).
# The low side is always safe: the anchors are attended, so the largest term is >= 1.
ANCHOR = (4, 8)               # (leading, trailing) public columns whose max is the exp's offset
ANCHOR_EXP_ITERS = 10         # (1 + y/1024)^1024: relative error ~y^2/2048 (0.05% at |y| = 1, 4.8% at 10)
ANCHOR_RECIP = (-8, 30, 2)    # reciprocal_gs range 2^lo..2^(hi+1) and steps per octave: sum/sqrt(m) <= sqrt(m) e^D
ANCHOR_MAX_EXCESS = 10.0      # D up to which the output is within ~1e-2 (fixed-point emulation, m = 412; larger
#                               m is better: the sum is divided by sqrt(m)); beyond, the row's scale degrades


def softmax(x, dim: int = -1, mask: torch.Tensor | None = None, *, radix=None, lean: bool | None = None,
            recip: str | None = None, exp_fit: float | None | str = "default", anchor=None, offset=None):
    """Softmax along the last dim, correct for rows of up to 2^16 entries (tested flat and peaked at 8k).

    Stock CrypTen divides by the sum of exponentials with a reciprocal whose Newton iterations diverge once the
    sum exceeds ~250 (garbage on long flat rows). Here the sum s in [1, m] is scaled by the public 1/sqrt(m) into
    [m^-1/2, m^1/2], inside the reciprocal's convergence range for m <= 8k, and the result rescaled.
    ``mask`` (public 0/1, broadcastable): excluded entries are shifted down before the max and zeroed after exp.
    ``exp_fit``: exp_limit's fit_range ("default" = SOFTMAX_EXP_FIT). ``radix``/``lean`` go to ``tree_max`` (lean needs |x| < 16384, masked entries included), ``recip`` picks
    ``reciprocal_gs`` ("goldschmidt") or ``reciprocal_nr`` ("newton"); None = the module defaults above.
    Rounds: sum over max layers of (cmp + ceil(log2 r)) + EXP_ITERS + reciprocal (cmp + 1 + RECIP_GS_ITERS, or
    cmp + 2 RECIP_ITERS) + 1, with cmp = 7 (lean) or 8.
    ``anchor=(a, b)`` (no mask; see ANCHOR above): the offset is the max of the first a and last b columns only (a
    max over a + b entries: one layer), exp by ANCHOR_EXP_ITERS squarings, the reciprocal over the wider range
    ANCHOR_RECIP with CrypTen's full-width comparison. ``offset`` (with ``anchor``): that max, already computed by
    the caller over always-attended columns (MPCache makes it in its selection's comparison layers:
    :func:`strata_select`). Rounds: (cmp + ceil(log2(a + b))) + ANCHOR_EXP_ITERS +
    (8 + 1 + RECIP_GS_ITERS) + 1 = 11 + 10 + 12 + 1 = 34 for (4, 8), whatever the row length; bytes: the exp's
    squarings and one product per entry, the rest per row. Leaks: shapes only.
    """
    assert dim in (-1, x.dim() - 1), "secure softmax works along the last dim"
    m = x.shape[-1]
    if m > 2 ** 16:
        raise ValueError(f"secure softmax supports rows of up to 65536 entries, got {m}")
    radix = SOFTMAX_RADIX if radix is None else radix
    lean = SOFTMAX_LEAN if lean is None else lean
    if anchor is not None and mask is None and sum(anchor) < m:
        if offset is None:
            mx = tree_max(_anchor_columns(x, anchor), dim=-1, keepdim=True, radix="auto", lean=lean)
        else:
            mx = offset               # (..., 1): the anchors' max, made earlier in a batched layer by the caller
        e = exp_limit(x - mx, iters=ANCHOR_EXP_ITERS)
        c = 1.0 / math.sqrt(m)
        lo, hi, q = ANCHOR_RECIP
        r = reciprocal_gs(e.sum(dim=-1, keepdim=True) * c, lo=lo, hi=hi, q=q, lean=False)
        return (e * r) * c
    if mask is not None:
        x = x + (mask.to(torch.float32) - 1) * MASK_SHIFT
    recip = SOFTMAX_RECIP if recip is None else recip
    exp_fit = SOFTMAX_EXP_FIT if exp_fit == "default" else exp_fit
    mx = tree_max(x, dim=-1, keepdim=True, radix=radix, lean=lean)
    e = exp_limit(x - mx, fit_range=exp_fit)
    if mask is not None:
        e = e * mask.to(torch.float32)
    c = 1.0 / math.sqrt(m)
    s = e.sum(dim=-1, keepdim=True) * c
    r = reciprocal_gs(s, lean=lean) if recip == "goldschmidt" else reciprocal_nr(s)
    return (e * r) * c                                        # (e r) first: r c alone can be a few ulps


def _anchor_columns(x, anchor):
    a, b = anchor
    m = x.shape[-1]
    parts = ([x[..., :a]] if a else []) + ([x[..., m - b:]] if b else [])
    if isinstance(x, torch.Tensor):
        return torch.cat(parts, dim=-1)
    return parts[0] if len(parts) == 1 else _cat(parts, dim=-1)


def softmax_reference(x: torch.Tensor, dim: int = -1, mask: torch.Tensor | None = None, *, radix=None,
                      lean: bool | None = None, recip: str | None = None,
                      exp_fit: float | None | str = "default", anchor=None) -> torch.Tensor:
    """The float model of ``softmax`` (the max is exact whatever ``radix``/``lean``; ``recip`` picks the model)."""
    x = x.double()
    m = x.shape[-1]
    if anchor is not None and mask is None and sum(anchor) < m:
        e = exp_limit_reference(x - _anchor_columns(x, anchor).max(dim=-1, keepdim=True).values,
                                iters=ANCHOR_EXP_ITERS)
        c = 1.0 / math.sqrt(m)
        lo, hi, q = ANCHOR_RECIP
        return e * (reciprocal_gs_reference(e.sum(dim=-1, keepdim=True) * c, lo=lo, hi=hi, q=q) * c)
    if mask is not None:
        x = x + (mask.double() - 1) * MASK_SHIFT
    exp_fit = SOFTMAX_EXP_FIT if exp_fit == "default" else exp_fit
    e = exp_limit_reference(x - x.max(dim=-1, keepdim=True).values, fit_range=exp_fit)
    if mask is not None:
        e = e * mask.double()
    c = 1.0 / math.sqrt(m)
    s = e.sum(dim=-1, keepdim=True) * c
    recip = SOFTMAX_RECIP if recip is None else recip
    return e * ((reciprocal_gs_reference(s) if recip == "goldschmidt" else reciprocal_nr_reference(s)) * c)


# ---- piecewise-polynomial activations ------------------------------------------------------------------------
def _fit_even(f, degree: int, lo: float, hi: float) -> list[float]:
    """Least-squares coefficients c0, c2, c4, ... of an even polynomial on [lo, hi] (deterministic grid)."""
    xs = np.linspace(lo, hi, 4001)
    A = np.stack([xs ** p for p in range(0, degree + 1, 2)], axis=1)
    return np.linalg.lstsq(A, f(xs), rcond=None)[0].tolist()


def _np_silu(x):
    return x / (1 + np.exp(-x))


def _np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _fit_u(f, degree: int, lo: float, hi: float) -> list[float]:
    """Coefficients (ascending) of a polynomial in u = (x - mid) / half on [lo, hi] (well conditioned)."""
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    xs = np.linspace(lo, hi, 2001)
    return np.polynomial.polynomial.polyfit((xs - mid) / half, f(xs), degree).tolist()


# SiLU, piecewise like the authors' SPU code but tighter (max abs error of the float model 2.7e-3, at |x| = 8
# where the tails are cut): 0 below -8; cubic on [-8, -4); 0.5x + even degree-10 on [-4, 4]; cubic on (4, 8]; x above.
SILU_LOW = _fit_u(_np_silu, 3, -8.0, -4.0)
SILU_MID = _fit_even(lambda x: _np_silu(x) - 0.5 * x, 10, -4.0, 4.0)
SILU_HIGH = _fit_u(_np_silu, 3, 4.0, 8.0)
# GeLU (tanh form): 0 below -4; 0.5x + even degree-12 on [-4, 4]; x above (max abs error 2e-3).
GELU_MID = _fit_even(lambda x: _np_gelu(x) - 0.5 * x, 12, -4.0, 4.0)
POLY_T = 16.0   # even polynomials are evaluated in t = x^2 / 16 in [0, 1] so every coefficient is O(1) in fixed point


def _even_poly(x2, coeffs):
    """c0 + c2 x^2 + c4 x^4 + ... given x^2, by Horner in t = x^2/16 with coefficients c_2k 16^k."""
    cs = [c * POLY_T ** k for k, c in enumerate(coeffs)]
    t = x2 * (1.0 / POLY_T)
    y = t * cs[-1]
    for c in reversed(cs[1:-1]):
        y = (y + c) * t
    return y + cs[0]


ACT_LEAN = True   # breakpoints of silu/gelu in 32-bit lanes (_ltz_lean): exact while |x| < 32760. SmolLM2's gate
#                   inputs reach |x| ~ 50 on Austen text (measured over 3 x 1k-token prompts), 650x inside it.


def _stacked_horner(v, coeffs: torch.Tensor):
    """Row i of the result is sum_k coeffs[i, k] v[i]^k: several independent polynomials (lower-degree rows padded
    with zero top coefficients) share each Horner step's multiplication, so their rounds overlap: deg - 1 rounds
    for all of them. ``v``: (P, ...) shares or a float tensor; ``coeffs``: (P, deg + 1) float64, ascending."""
    shape = (int(coeffs.shape[0]), *([1] * (v.dim() - 1)))

    def col(k):
        c = coeffs[:, k].reshape(shape)
        return c if isinstance(v, torch.Tensor) and v.dtype == torch.float64 else c.float()

    y = v * col(-1)
    for k in range(int(coeffs.shape[1]) - 2, 0, -1):
        y = (y + col(k)) * v
    return y + col(0)


def _padded(*rows) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([list(r) + [0.0] * (n - len(r)) for r in rows], dtype=torch.float64)


def _silu_pieces(x, x2):
    """[low cubic, x/2 + even poly, high cubic, x]: the three polynomials in one stacked Horner chain in
    (u_low, t = x^2/16, u_high)."""
    mid_t = [c * POLY_T ** k for k, c in enumerate(SILU_MID)]
    v = _stack([(x + 6.0) * 0.5, x2 * (1.0 / POLY_T), (x - 6.0) * 0.5])
    p = _stacked_horner(v, _padded(SILU_LOW, mid_t, SILU_HIGH))
    return [p[0], x * 0.5 + p[1], p[2], x]


def _stack(xs):
    if isinstance(xs[0], torch.Tensor):
        return torch.stack(xs)
    import crypten

    return crypten.stack(xs)


def _square(x):
    return x * x if isinstance(x, torch.Tensor) else x.square()


def _telescope(z, pieces):
    """sum_i z_i (p_i - p_(i-1)) with p_(-1) = 0 as ONE stacked product (a telescoping mux). Exact in the ring, so
    a piece that is garbage (overflowed) far outside its interval cancels exactly wherever it is not selected."""
    diffs = _stack([pieces[0]] + [pieces[i] - pieces[i - 1] for i in range(1, len(pieces))])
    return (z * diffs).sum(0)


def silu(x, lean: bool | None = None):
    """SiLU by the piecewise polynomial above: the 4 breakpoints in one comparison layer, x^2 (a square), the three
    polynomials in one stacked Horner chain (4 rounds), the mux in one stacked product.
    Rounds: cmp + 1 + 4 + 1 (cmp = 7 lean / 8).  Bytes: 4 comparisons + ~15 products per element.
    ``lean`` (default ACT_LEAN): breakpoints in 32-bit lanes, exact for |x| < 32760.  Leaks: shapes only."""
    lean = ACT_LEAN if lean is None else lean
    shape = (4, *([1] * x.dim()))
    c = _ltz(_stack([x + 8, x + 4, -x + 4, -x + 8]), lean)        # [x<-8], [x<-4], [x>4], [x>8]
    z = c * torch.tensor([-1.0, -1.0, 1.0, 1.0]).reshape(shape) + torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(shape)
    return _telescope(z, _silu_pieces(x, _square(x)))


def silu_reference(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    z = torch.stack([(x >= -8).double(), (x >= -4).double(), (x > 4).double(), (x > 8).double()])
    return _telescope(z, _silu_pieces(x, x * x))


def gelu(x, lean: bool | None = None):
    """GeLU (tanh form) by the piecewise polynomial above: x/2 + even polynomial of x^2 (a square + 5 rounds),
    2 breakpoints in one comparison layer, both muxes in one stacked product.
    Rounds: cmp + 1 + 5 + 1.  ``lean`` as in silu.  Leaks: shapes only."""
    lean = ACT_LEAN if lean is None else lean
    mid = x * 0.5 + _even_poly(_square(x), GELU_MID)
    z = 1 - _ltz(_stack([x + 4, -x + 4]), lean)                   # [x >= -4], [x <= 4]
    one_minus = z * torch.tensor([1.0, -1.0]).reshape(2, *([1] * x.dim())) + \
        torch.tensor([0.0, 1.0]).reshape(2, *([1] * x.dim()))    # [x >= -4], [x > 4]
    return (one_minus * _stack([mid, x - mid])).sum(0)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    mid = 0.5 * x + _even_poly(x * x, GELU_MID)
    return (x >= -4).double() * mid + (x > 4).double() * (x - mid)


# ---- v / sqrt(sum v^2 + c): the normalisation of RMSNorm and LayerNorm ------------------------------------------
NORM_RANGE = (-10, 30)   # sum of squares (+ D*eps) in [2^-10, 2^31); SmolLM2 reaches ~6e8 ~ 2^29.2 (massive activations)
NORM_STEPS = 2           # thresholds per octave of the step guess: z = s Y^2 within [2^-1/4, 2^1/4] (until Y is tiny)
NORM_ITERS = 3           # Goldschmidt steps for z^-1/2 (float model: <= 1e-7 relative for z in [0.84, 1.19])
NORM_LEAN = True         # comparisons in 32-bit lanes: the fine sum (< 2^12 when used) and the coarse sum / 2^16
SUMSQ_SPLIT_LOG2 = 12    # sums >= 2^12 are taken from the coarse sum of (x / 2^8)^2, smaller ones from the fine sum
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
        y = (a * b) ** -0.25 * 2 ** 16
        cands = {max(1, math.floor(y)), max(1, math.ceil(y))}
        ys.append(min(cands, key=lambda c: max(abs(math.log(a * (c / 2 ** 16) ** 2)),
                                               abs(math.log(b * (c / 2 ** 16) ** 2)))))
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


def norm_scale(v, add: float = 0.0, lean: bool | None = None):
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
    Rounds: 1 + cmp + 1 + 1 + 1 + (2 NORM_ITERS - 1) + 1 = 17 with the lean cmp (7).  Bytes per row:
    2 D squares + (hi-lo+1) NORM_STEPS + 1 comparisons + ~10 products.  Leaks: shapes only.
    """
    import crypten

    lean = NORM_LEAN if lean is None else lean
    ts, ys = _norm_table(*NORM_RANGE, NORM_STEPS)
    split = 2.0 ** SUMSQ_SPLIT_LOG2
    n_small = sum(t < split for t in ts)
    sq = crypten.stack([v, v * (1.0 / 2 ** SUMSQ_SHIFT)]).square().sum(-1, keepdim=True)     # (2, ..., 1)
    fine, coarse = sq[0] + add, sq[1] + add / 2 ** (2 * SUMSQ_SHIFT)
    d = crypten.cat([_minus_publics(fine, ts[:n_small]),
                     _minus_publics(coarse, [t / 2 ** (2 * SUMSQ_SHIFT) for t in ts[n_small:]])])
    bits = 1 - _ltz(d, lean)                                                                # (T, ..., 1) [s >= t]
    u = bits[n_small]
    coarse_full = _mul_public_int(coarse, torch.tensor(2 ** (2 * SUMSQ_SHIFT)))
    w = _from_shares(torch.cat([(1 - bits[:n_small]).share, (coarse_full - fine).share.unsqueeze(0)]), precision=0)
    prod = u * w                                                                            # exact ring products
    small = bits[:n_small] + _from_shares(prod.share[:n_small], precision=0)
    s = fine + _from_shares(prod.share[n_small], precision=fine.encoder._precision_bits)
    thermo = torch.cat([small.share, bits.share[n_small:]])
    dy = torch.tensor([b - a for a, b in zip(ys, ys[1:])], dtype=torch.long).reshape(-1, *([1] * (thermo.dim() - 1)))
    y = s.clone()
    y.share = (thermo * dy.to(thermo.device)).sum(0)
    y = y + ys[0] / s.encoder.scale
    sv = crypten.cat([s, v], dim=-1) * y
    z = sv[..., :1] * y
    h = _goldschmidt_rsqrt(z, NORM_ITERS, crypten.stack)
    return sv[..., 1:] * (h + h)


def norm_scale_reference(v: torch.Tensor, add: float = 0.0) -> torch.Tensor:
    v = v.double()
    s = (v * v).sum(-1, keepdim=True) + add
    ts, ys = _norm_table(*NORM_RANGE, NORM_STEPS)
    count = sum((s >= t).long() for t in ts)
    y = torch.tensor(ys, dtype=torch.float64)[count] / 2 ** 16
    z = s * y * y
    h = _goldschmidt_rsqrt(z, NORM_ITERS, torch.stack)
    return v * y * (h + h)


# ---- argmax and top-k as one-hot rows ------------------------------------------------------------------------
ARGMAX_LEAN = True      # 32-bit-lane comparisons (_ltz_lean) in argmax_onehot: inputs must satisfy |x| < 16384
ARGMAX_RADIX = "auto"   # the max tree's schedule (max_schedule; was radix 2: 16 layers for SmolLM2's 49152 logits)


def argmax_onehot(x, lean: bool | None = None):
    """One-hot (..., m) of the first maximum along the last dim.

    The tree max is exact (a mux of ring elements), so ``[x >= max]`` marks exactly the maxima; ties are broken
    to the lowest index with a local prefix sum and one more comparison. ``lean`` (default ``ARGMAX_LEAN``):
    every comparison in 32-bit lanes (7 rounds, 96 B instead of 8, 216 B; exact while |x| < 16384 — logits are
    O(10–100); the prefix sums are small integers).
    Rounds: the max tree's (ARGMAX_RADIX: max_schedule's layers, each cmp + ceil(log2 r) mul) + 2 cmp + 1 mul.
    Leaks: shapes only.
    """
    lean = ARGMAX_LEAN if lean is None else lean
    mx = tree_max(x, dim=-1, keepdim=True, radix=ARGMAX_RADIX, lean=lean)
    eq = 1 - _ltz(x - mx, lean)
    first_or_later = (eq.cumsum(-1) - 2)                      # >= 0 exactly at the 2nd, 3rd, ... maxima
    return eq - eq * (1 - _ltz(first_or_later, lean))


def argmax_onehot_reference(x: torch.Tensor) -> torch.Tensor:
    idx = x.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(x, dtype=torch.float64).scatter_(-1, idx, 1.0)


def _mul_public_int(x, t: torch.Tensor):
    """x * t for a public integer tensor t, exactly: shares are multiplied in the ring (linear, no truncation)."""
    out = x.clone()
    out.share = out.share * t.to(out.share.device)
    return out


def _pairwise_rank(s):
    """rank_i = #{j : s_j > s_i, or s_j == s_i and j < i}: the position of item i in a stable descending sort.

    One comparison layer over all m*m pairs: for j < i the bit is [s_j - s_i >= 0], for j > i it is
    1 - [s_i - s_j >= 0]; both come from one ``_ltz`` of w_ij = (s_j - s_i) * sign_ij (sign public).
    """
    m = s.shape[-1]
    diff = s.unsqueeze(-2) - s.unsqueeze(-1)                  # [..., i, j] = s_j - s_i
    lower = torch.tril(torch.ones(m, m), diagonal=-1)         # j < i
    upper = torch.triu(torch.ones(m, m), diagonal=1)          # j > i
    neg = _mul_public_int(diff, (lower - upper).long())._ltz()   # [w_ij < 0]
    # j < i: [s_j >= s_i] = 1 - neg ; j > i: [s_j > s_i] = 1 - [s_i - s_j >= 0] = neg ; diagonal: 0
    bits = (1 - neg) * lower + neg * upper
    return bits.sum(-1)                                       # (..., m), integer-valued (scale 1)


def _onehot_of_small_int(v, k: int):
    """(..., k, m) with row r = [v == r] for integer-valued shares v (..., m), via [v >= r] - [v >= r+1]."""
    ge = 1 - _minus_publics(v, [float(r) for r in range(k + 1)])._ltz()       # (k+1, ..., m)
    oh = ge[:k] - ge[1:]                                                       # (k, ..., m)
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
    keep = (rank - float(k))._ltz()                                             # [rank < k]
    slot = keep.cumsum(-1) - keep + (1 - keep) * float(2 * k)
    return _onehot_of_small_int(slot, k)


# ---- stratified top-k: one winner per public stratum, O(m) comparisons -----------------------------------------
def strata_layout(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The public strata of ``strata_top1_onehot``: stratum r = candidates [floor(r m / k), floor((r+1) m / k)).

    Returns ``idx`` (k, g) long, g = ceil(m / k), the candidate index of each slot (short strata repeat their
    first index in the padding slot) and ``valid`` (k, g) bool. Strata sizes differ by at most one.
    """
    if not 0 < k <= m:
        raise ValueError(f"top-k needs 0 < k <= {m}, got k={k}")
    starts = [r * m // k for r in range(k + 1)]
    g = max(starts[r + 1] - starts[r] for r in range(k))
    idx = torch.empty(k, g, dtype=torch.long)
    valid = torch.zeros(k, g, dtype=torch.bool)
    for r in range(k):
        size = starts[r + 1] - starts[r]
        idx[r, :size] = torch.arange(starts[r], starts[r + 1])
        idx[r, size:] = starts[r]
        valid[r, :size] = True
    return idx, valid


STRATA_PAD = -(2.0 ** 20)    # the score of a padding slot (below any real score; never wins)
STRATA_PAD_LEAN = -12288.0   # the same with lean comparisons (scores must then satisfy |s| < 12288)
SELECT_LEAN = True           # default of strata_top1_onehot's ``lean``
STRATA_RADIX = "auto"        # survivors per group at each tournament level: "auto" = strata_schedule (LAN
#                              latency; was 4 at every level), an int (every level; 2 = the pairwise tournament)
#                              or a sequence of level radices


def _onehot_radix_level(v, oh, r: int, lean: bool):
    """One level of the one-hot tournament: survivors (..., n) with one-hots (..., n, w) -> (..., ceil(n/r)) and
    (..., ceil(n/r), r·w) (``oh=None``: values only, w = 0 — a radix-r max layer). Groups of r consecutive survivors (the last padded by repeating the last survivor: a
    duplicate ties it and loses to the lower index) compare all r(r-1)/2 pairs in one comparison layer; member
    i's indicator is the product of its r - 1 "beats" bits, multiplied into [v_i, oh_i] in the same product tree
    (ceil(log2 r) rounds, ring integers: exact). The group's value is the sum of the products; its one-hot is
    their concatenation, so the original slot order is kept (padding only ever adds trailing zero slots)."""
    return _onehot_radix_levels([(v, oh, r)], lean)[0]


def _onehot_radix_levels(tasks, lean: bool) -> list:
    """Independent levels ``[(v, oh, r)]`` of :func:`_onehot_radix_level` in lockstep: ONE comparison layer for
    all their pairs (their differences concatenated) and one batched product per product-tree round, so the
    rounds are those of the deepest tree alone (cmp + ceil(log2 max r)) and the bytes the sum. Exact, as alone."""
    preps, diffs = [], []
    for v, oh, r in tasks:
        n, w = int(v.shape[-1]), 0 if oh is None else int(oh.shape[-1])
        lead = tuple(int(d) for d in v.shape[:-1])
        G = -(-n // r)
        idx = torch.tensor(list(range(n)) + [n - 1] * (G * r - n))
        sv = v.share.index_select(v.dim() - 1, idx.to(v.share.device)).reshape(*lead, G, r)
        iu, ju = torch.triu_indices(r, r, offset=1)
        diffs.append(sv[..., iu] - sv[..., ju])                            # v_i - v_j for i < j
        preps.append((v, oh, r, w, lead, G, idx, sv, iu, ju))
    d = _from_shares(torch.cat([x.reshape(-1) for x in diffs]), precision=None)
    d.encoder = tasks[0][0].encoder
    b_all = 1 - _ltz(d, lean)                                              # [v_i >= v_j]: i beats j
    nb_all = (1 - b_all).share
    trees, at = [], 0
    for (v, oh, r, w, lead, G, idx, sv, iu, ju), x in zip(preps, diffs):
        b, nb = b_all.share[at:at + x.numel()].reshape(x.shape), nb_all[at:at + x.numel()].reshape(x.shape)
        at += x.numel()
        pair = {(int(i), int(j)): t for t, (i, j) in enumerate(zip(iu, ju))}
        opponents = [[j for j in range(r) if j != i] for i in range(r)]
        factors = []
        for t in range(r - 1):                                             # member i's t-th opponent
            cols = [b[..., pair[(i, j)]] if i < j else nb[..., pair[(j, i)]]
                    for i, j in ((i, opponents[i][t]) for i in range(r))]
            factors.append(torch.stack(cols, dim=-1).unsqueeze(-1))       # (..., G, r, 1)
        vec = sv.unsqueeze(-1)                                             # (..., G, r, 1 + w)
        if oh is not None:
            so = oh.share.index_select(oh.dim() - 2, idx.to(oh.share.device)).reshape(*lead, G, r, w)
            vec = torch.cat([vec, so], dim=-1)
        factors.append(vec)
        trees.append(factors)
    while any(len(f) > 1 for f in trees):                                  # one batched product per round
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
        prod = (_from_shares(torch.cat(left_flat), precision=0) * _from_shares(torch.cat(right_flat), precision=0)).share
        at = 0
        for ti, plan in enumerate(plans):
            if plan is None:
                continue
            left, shape = plan
            p = prod[at:at + shape.numel()].reshape(shape)
            at += shape.numel()
            out, col = [], 0
            for x in left:
                out.append(p[..., col:col + x.shape[-1]])
                col += x.shape[-1]
            trees[ti] = out + trees[ti][2 * len(left):]
    results = []
    for (v, oh, r, w, lead, G, *_), factors in zip(preps, trees):
        f = factors[0]                                                     # (..., G, r, 1 + w): indicator x [v_i, oh_i]
        top = _from_shares(f[..., 0].sum(-1), precision=None)
        top.encoder = v.encoder
        if oh is None:
            results.append((top, None))
            continue
        new_oh = _from_shares(f[..., 1:].reshape(*lead, G, r * w), precision=None)
        new_oh.encoder = oh.encoder
        results.append((top, new_oh))
    return results


def strata_top1_onehot(scores, k: int, lean: bool | None = None, radix=None):
    """Compact one-hot rows (..., k, g), ring 0/1 at scale 1 (so products with it need no truncation): row r marks
    the first maximum of stratum r (see :func:`strata_layout`).

    A tournament per stratum that carries each survivor's one-hot. At each level (radices: ``radix``, default
    ``STRATA_RADIX``) groups of r survivors (:func:`_onehot_radix_level`; r = 2: adjacent pairs) compare all
    their pairs in one comparison layer for all strata and leading dims, and ceil(log2 r) product rounds give
    both the winner's value and its one-hot; r = 4 needs ~half the levels of the pairwise tree at ~3x its first
    level's comparisons. Ties go to the lower index. Unlike the exact top-k
    (:func:`topk_onehot`, m^2 comparisons), this costs O(m) comparisons: the budget is spread evenly over the
    position range (exactly one winner per stratum).
    ``lean`` (default ``SELECT_LEAN``): comparisons in 32-bit lanes (7 rounds / 96 B instead of 8 / 216 B in 2PC),
    exact while |score| < 12288 (MPCache's scores are attention logits, q·rep / sqrt(d): O(10)).
    Rounds: per level cmp + ceil(log2 r) (radix 4 and g = 10: 2 x 9 = 18, pairwise 4 x 8 = 32).
    Bytes/party: per level r(r-1)/2 comparisons per group of r survivors + the products.
    Leaks: shapes only (the strata are public functions of m and k).
    """
    return strata_select(scores, k, lean=lean, radix=radix)[0]


def strata_select(scores, k: int, *, heads: bool = False, also=(), lean: bool | None = None, radix=None):
    """:func:`strata_top1_onehot` with two fusions that save whole comparison layers. Returns (one-hot, maxima).

    ``heads=True``: ``scores`` is (..., G, m), one score per query head of a group, and a candidate's score is
    its max over the G heads: a first radix-G max layer (values only: folding the heads into the tournament's
    entries instead makes every level carry G times wider one-hots, which measured more bytes and no fewer
    rounds at SmolLM2's G = 3). ``also``: tensors (..., a) whose max along the last dim is wanted too (MPCache:
    the anchored softmax's offset, new clusters' summaries); their tournaments run in lockstep with the head max
    and the strata levels, in the same comparison layers and product rounds (:func:`_onehot_radix_levels`), with
    level radices from :func:`lockstep_schedule` (no added round beside a strata level; what is left after them
    adds its own). Every level, radix 2 included, is a radix level.
    Rounds: per level index, cmp + ceil(log2 of the largest radix in use). Bytes: the sum. Exact.
    Leaks: shapes only.
    """
    lean = SELECT_LEAN if lean is None else lean
    radix = STRATA_RADIX if radix is None else radix
    pad = STRATA_PAD_LEAN if lean else STRATA_PAD
    m = int(scores.shape[-1])
    idx, valid = strata_layout(m, k)
    g = int(idx.shape[1])
    rows = int(torch.Size(scores.shape[:-2 if heads else -1]).numel()) * k
    G = int(scores.shape[-2]) if heads else 1
    caps = ((G,) if G > 1 else ()) + tuple(strata_schedule(rows, g, lean, radix))   # the levels, in order
    extra = list(also)
    plans = [lockstep_schedule(int(t.shape[-1]), int(torch.Size(t.shape[:-1]).numel()), caps, lean) for t in also]
    step = 0

    def level(tasks):               # one lockstep level: the given tasks plus this level of every extra max
        nonlocal step
        live = [i for i, pl in enumerate(plans) if step < len(pl) and pl[step] > 1]
        outs = _onehot_radix_levels(tasks + [(extra[i], None, plans[i][step]) for i in live], lean)
        for i, (top, _) in zip(live, outs[len(tasks):]):
            extra[i] = top
        step += 1
        return outs[:len(tasks)]

    if G > 1:                       # the max over the G heads: a radix-G max layer, no one-hots to carry
        xh = scores.transpose(-1, -2)                                       # (..., m, G)
        scores = level([(xh, None, G)])[0][0].squeeze(-1)
    elif heads:
        scores = scores.squeeze(-2)
    x = scores.index_select(scores.dim() - 1, idx.reshape(-1))
    x = x.reshape(*scores.shape[:-1], k, g)                                 # (..., k, g)
    if not bool(valid.all()):
        x = _mul_public_int(x, valid.long()) + (~valid).float() * pad
    v = x
    oh = _ring_ones(x).unsqueeze(-1)        # (..., k, n, w): each survivor's one-hot, ring 0/1 at scale 1 (exact)
    for r in caps[1 if G > 1 else 0:]:
        v, oh = level([(v, oh, r)])[0]
    while any(step < len(pl) for pl in plans):
        level([])
    oh = oh[..., 0, :g]
    return oh, [t.squeeze(-1) for t in extra]


def _ring_ones(x):
    """Shares of ones shaped like ``x`` at scale 1 (party 0 holds 1, the others 0: a public constant)."""
    import crypten.communicator as comm

    one = torch.zeros_like(x.share)
    if comm.get().get_rank() == 0:
        one += 1
    return _from_shares(one, precision=0)


def strata_top1_onehot_reference(scores: torch.Tensor, k: int, heads: bool = False) -> torch.Tensor:
    if heads:
        scores = scores.amax(dim=-2)
    idx, valid = strata_layout(int(scores.shape[-1]), k)
    x = scores.double()[..., idx].masked_fill(~valid, STRATA_PAD)
    best = x.argmax(dim=-1, keepdim=True)                             # first maximum
    return torch.zeros_like(x).scatter_(-1, best, 1.0)
