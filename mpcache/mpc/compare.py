"""Comparisons on arithmetic shares: the sign bit [x < 0] as a 0/1 share, CrypTen's 64-bit circuit or the lean
32-bit-lane one, and the small local helpers every protocol shares (public thresholds, public integer products,
ring constants). Each protocol states its rounds, bytes and leakage; leakage: shapes only.
"""

from __future__ import annotations

import torch


def _cat(xs, dim):
    import crypten

    return crypten.cat(xs, dim=dim)


# ---- a lean comparison: 32-bit lanes, two elements per 64-bit word ----------------------------------------------


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
    Leaks: shapes only. (:func:`_ltz_lanes` with ``width=32, shift=0``.)
    """
    return _ltz_lanes(x, 32, 0)


LANE_WIDTHS = (8, 16, 32)


def _ltz_lanes(x, width: int = 16, shift: int = 12):
    """[x < 0] for a coarse comparison: the sign of ``floor(x / 2^shift)`` in ``width``-bit lanes, 64/width elements
    a word. Each party takes bits ``[shift, shift + width)`` of its own share (no communication: the sum of the
    parties' ``floor(x_i / 2^shift) mod 2^width`` is ``floor(x / 2^shift) - c mod 2^width``, where c in [0, n - 1]
    counts the carries out of the dropped low bits: an exact identity, no probabilistic truncation), then the lean
    circuit of :func:`_ltz_lean` inside aligned ``width``-bit blocks: log2(width) prefix levels.

    Exactness (x in ring units, n parties): the result is exactly [x < 0] whenever x < 0, or x >= (n - 1) 2^shift,
    as long as |x| < 2^(shift + width - 1) - n 2^shift. Only non-negative x below (n - 1) 2^shift (one ulp of the
    coarse scale in 2PC) may read as negative: a one-sided error at the threshold. With CrypTen's 16 fractional bits,
    ``width=16, shift=12`` compares at 1/16 resolution (errs only for 0 <= x < (n - 1)/16) over |x| < 2048 - n/16.

    Cost per element (2PC): 1 AND (1/L words each opening 2 x 8 B: 16/L B) + log2(width) prefix levels (2 words each:
    32/L B) + the B2A opening (8 B), L = 64/width lanes a word: width 32: 96 B, 7 rounds; width 16: 44 B, 6 rounds;
    width 8: 24 B, 5 rounds. n > 2: + one carry-save AND layer (32/L B) per party beyond 2. Leaks: shapes only.
    Float model: :func:`ltz_lanes_reference`."""
    import crypten.communicator as comm
    from crypten.mpc.primitives import BinarySharedTensor
    from crypten.mpc.primitives.beaver import B2A_single_bit

    if width not in LANE_WIDTHS:
        raise ValueError(f"lane width must be one of {LANE_WIDTHS}, got {width}")
    n = comm.get().get_world_size()
    if n < 2:
        return x._ltz()
    lanes, lane_mask = 64 // width, (1 << width) - 1
    shape, flat = x.share.shape, x.share.reshape(-1)
    N = flat.numel()
    h = -(-N // lanes)  # words
    if h * lanes > N:
        flat = torch.cat([flat, flat.new_zeros(h * lanes - N)])
    parts = (flat >> shift if shift else flat).reshape(lanes, h)
    packed = parts[0] & lane_mask
    for j in range(1, lanes):  # each party's own (coarse) share, `lanes` lanes a word
        packed = packed | ((parts[j] & lane_mask) << (j * width))
    xs = [BinarySharedTensor(packed, src=i) for i in range(n)]  # XOR shares of each party's share: no traffic
    not_lane_carry = ~sum(1 << (j * width) for j in range(1, lanes)) if lanes > 1 else -1
    while len(xs) > 2:  # carry-save: a + b + c = (a^b^c) + 2 maj(a, b, c)
        a, b, c = xs.pop(), xs.pop(), xs.pop()
        ab = a ^ b
        prods = BinarySharedTensor.stack([a, c]) & BinarySharedTensor.stack([b, ab])
        maj = prods[0] ^ prods[1]
        xs += [ab ^ c, (maj << 1) & not_lane_carry]
    a, b = xs
    S, P = a & b, a ^ b  # generate / propagate
    SP = BinarySharedTensor.stack([S, P])
    masks, out_masks, mults = _spk_constants()
    for i in range(width.bit_length() - 1):  # Sklansky prefix inside aligned width-bit blocks
        P0 = SP[1] & int(out_masks[i])
        S1P1 = SP & int(masks[i])
        S1P1._tensor *= mults[i]
        update = P0 & S1P1
        SP[1] &= int(out_masks[i] ^ -1)
        SP ^= update
    t = P ^ (SP[0] << 1)  # bit width-1 of each lane: its sign
    bits = BinarySharedTensor.stack([(t >> (j * width + width - 1)) & 1 for j in range(lanes)])
    ar = B2A_single_bit(bits)
    return _from_shares(ar.share.reshape(-1)[:N].reshape(shape), precision=0)


def ltz_lanes_reference(x: torch.Tensor, width: int = 16, shift: int = 12, scale: int = 1 << 16, n: int = 2):
    """The float model of :func:`_ltz_lanes` at its worst case (carries c = n - 1): [floor(x 2^16 / 2^shift) - (n - 1)
    < 0], for values inside its range. The secure result equals [x < 0] or this (one-sided, at the threshold)."""
    q = torch.floor(torch.round(x.double() * scale) / 2**shift) - (n - 1)
    return (q < 0).double()


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
    masks = torch.tensor(
        [6148914691236517205, 2459565876494606882, 578721382704613384, 36029346783166592, 140737488388096, 2147483648],
        dtype=torch.long,
    )
    mults = torch.tensor([(1 << (2**i + 1)) - 2 for i in range(6)], dtype=torch.long)
    return masks, masks * mults, mults


def _ltz(x, lean: bool):
    return _ltz_lean(x) if lean else x._ltz()


def _mul_public_int(x, t: torch.Tensor):
    """x * t for a public integer tensor t, exactly: shares are multiplied in the ring (linear, no truncation)."""
    out = x.clone()
    out.share = out.share * t.to(out.share.device)
    return out


def _ring_ones(x):
    """Shares of ones shaped like ``x`` at scale 1 (party 0 holds 1, the others 0: a public constant)."""
    import crypten.communicator as comm

    one = torch.zeros_like(x.share)
    if comm.get().get_rank() == 0:
        one += 1
    return _from_shares(one, precision=0)


# ---- a protocol built on the comparison: the oblivious clamp --------------------------------------------------------
def clamp(x, lo: float, hi: float, lean: bool = True):
    """min(max(x, lo), hi) for public bounds lo < hi: both bounds' comparisons in ONE comparison layer (the stacked
    [x < lo], [x > hi]), then one stacked product of those bits with (lo - x, hi - x) — ring 0/1 bits times
    fixed-point values, no truncation — summed onto x. At most one bit is set, so the result is exactly lo, hi or x.

    Rounds: cmp + 1 (8 with the lean comparison, 9 with CrypTen's).  Bytes per element (2PC): 2 comparisons
    (2 x ~96 B lean, 2 x 216 B full) + 2 products (2 x 16 B).  Exact (no approximation; fixed-point inputs give
    fixed-point outputs bit for bit).  ``lean``: comparisons in 32-bit lanes, valid while |x - lo|, |x - hi| < 2^15.
    Leaks: shapes only.  Float model: :func:`clamp_reference`."""
    import crypten

    if not lo < hi:
        raise ValueError(f"clamp needs lo < hi, got lo={lo}, hi={hi}")
    bits = _ltz(crypten.stack([x - lo, -x + hi]), lean)  # [x < lo], [x > hi]: one layer
    return x + (bits * crypten.stack([lo - x, hi - x])).sum(0)


def clamp_reference(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return x.double().clamp(lo, hi)
