"""Comparisons on arithmetic shares: the sign bit [x < 0] as a 0/1 share, CrypTen's 64-bit circuit or our
bit-sliced one (any width; 2PC's first round from the parties' private bits; a packed B2A), and the small local
helpers every protocol shares (public thresholds, public integer products, ring constants). Each protocol states
its rounds, bytes and leakage; leakage: shapes only.
"""

from __future__ import annotations

import functools
import itertools

import torch


def _cat(xs, dim):
    import crypten

    return crypten.cat(xs, dim=dim)


# ---- a lean comparison: 32-bit lanes, two elements per 64-bit word ----------------------------------------------


def _from_shares(share: torch.Tensor, precision: int | None):
    from crypten.mpc import MPCTensor

    return MPCTensor.from_shares(share, precision=precision)


def _ltz_lean(x):
    """[x < 0] as an arithmetic 0/1 share at scale 1 (what CrypTen's ``_ltz`` returns), for |x| < 2^31 ring units:
    :func:`_ltz_lanes` with ``width=32, shift=0`` (bit 31 of x mod 2^32 is the sign there). Exact (no
    approximation) inside the bound; outside it the result is the sign of x mod 2^32.

    CrypTen's ``_ltz`` converts the additive shares to XOR shares and adds them with a 64-bit Sklansky adder
    (1 AND round for the generate bits + 6 prefix rounds), then turns the sign bit into an arithmetic share
    (1 opening): 8 rounds, 216 bytes/element (2PC). This one: 6 rounds and ~25 B/element in 2PC (5 and ~53 B for small calls), one round more in 3PC.
    Leaks: shapes only."""
    return _ltz_lanes(x, 32, 0)


_BITS64 = None


def _bit_weights(device) -> torch.Tensor:
    global _BITS64
    if _BITS64 is None or _BITS64.device != torch.device(device):
        _BITS64 = torch.ones(64, dtype=torch.long, device=device) << torch.arange(64, device=device)
    return _BITS64


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., N) 0/1 int64 -> (..., ceil(N/64)) int64 words: element e at bit e % 64 of word e // 64 (zero padded).
    The bits are distinct powers of two, so the sum has no carries (bit 63 is the sign: no overflow)."""
    N = bits.shape[-1]
    W = -(-N // 64)
    if W * 64 > N:
        bits = torch.nn.functional.pad(bits, (0, W * 64 - N))
    return (bits.reshape(*bits.shape[:-1], W, 64) * _bit_weights(bits.device)).sum(-1)


def unpack_bits(words: torch.Tensor, N: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: (..., W) words -> (..., N) 0/1 int64."""
    bits = (words.unsqueeze(-1) >> torch.arange(64, device=words.device)) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :N]


_PLANE_CHUNK = 1 << 18  # elements per packing step: bounds the (width, chunk) temporaries (prefill's large N)


def bit_planes(v: torch.Tensor, width: int) -> torch.Tensor:
    """Bit-sliced layout of (N,) int64 values: (width, ceil(N/64)) words, plane j holding bit j of every element
    (:func:`pack_bits`). Local; memory bounded by chunks of :data:`_PLANE_CHUNK` elements."""
    N = v.numel()
    shifts = torch.arange(width, device=v.device).unsqueeze(1)
    if N <= _PLANE_CHUNK:
        return pack_bits((v.unsqueeze(0) >> shifts) & 1)
    parts = [pack_bits((v[i : i + _PLANE_CHUNK].unsqueeze(0) >> shifts) & 1) for i in range(0, N, _PLANE_CHUNK)]
    return torch.cat(parts, dim=1)  # _PLANE_CHUNK is a multiple of 64: the chunks' words abut


def _and(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """XOR shares of left & right (a binary Beaver AND of two XOR-shared word tensors: 1 round, each party opens
    its shares of both masked operands: 2 x 8 B per word in 2PC)."""
    from crypten.mpc.primitives import BinarySharedTensor as BST

    return (BST.from_shares(left) & BST.from_shares(right)).share


@functools.lru_cache(maxsize=64)
def _block_layout(m: int, k: int):
    """The cross ANDs of :func:`_blocks_2pc` over the blocks of k positions of [0, m) (the last may be shorter), as
    index tensors into a party's planes extended by an all-ones plane (index m): the left (party 0's) and right
    (party 1's) monomials of each cross AND (T, k); per block, its G terms and P terms (rows of indices into the T
    products, padded with T: a zero row); per block, the local monomial of P (the whole block)."""
    blocks = [list(range(s, min(s + k, m))) for s in range(0, m, k)]
    left, right, gterms, pterms, plocal = [], [], [], [], []

    def mono(idx):
        return sorted(idx) + [m] * (k - len(idx))

    def cross(a, b, into):
        into.append(len(left))
        left.append(mono(a))
        right.append(mono(b))

    for bi, pos in enumerate(blocks):
        g, p = [], []
        for i, top in enumerate(pos):  # G_i prod_(j > i) P_j, each P_j = a_j ^ b_j split between the sides
            higher = pos[i + 1 :]
            for r in range(len(higher) + 1):
                for S in itertools.combinations(higher, r):
                    cross([top, *S], [top, *(j for j in higher if j not in S)], g)
        if bi > 0:  # prod_j P_j; block 0's P is never used
            for r in range(1, len(pos)):
                for S in itertools.combinations(pos, r):
                    cross(list(S), [j for j in pos if j not in S], p)
        gterms.append(g)
        pterms.append(p)
        plocal.append(mono(pos))
    T = len(left)

    def padded(rows):
        width = max(1, *(len(r) for r in rows))
        return torch.tensor([r + [T] * (width - len(r)) for r in rows], dtype=torch.long)

    as_t = functools.partial(torch.tensor, dtype=torch.long)
    return as_t(left), as_t(right), padded(gterms), padded(pterms), as_t(plocal), len(blocks)


def _monomials(ext: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row i: the AND of the planes ext[idx[i, j]] over j."""
    out = ext[idx[:, 0]]
    for j in range(1, idx.shape[1]):
        out = out & ext[idx[:, j]]
    return out


def _xor_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = rows[idx[:, 0]]
    for j in range(1, idx.shape[1]):
        out = out ^ rows[idx[:, j]]
    return out


def _blocks_2pc(own: torch.Tensor, m: int, rank: int, k: int):
    """Two summands private to parties 0 and 1 (a: party 0's planes, b: party 1's; 3PC after
    :func:`_two_summands`, party 2's planes zero): the generate/propagate bits (G, P) of
    the blocks of k positions of [0, m) in ONE AND round. Per block, G = xor_i G_i prod_(j > i) P_j and
    P = prod_j P_j with G_i = a_i b_i, P_j = a_j ^ b_j; expanding each P_j into its two sides, every term is a
    monomial of party 0's bits times one of party 1's: a cross AND, except P's two one-sided terms (a_all, b_all:
    local). Cross ANDs per block of k: 2^k - 1 (G) + 2^k - 2 (P; none for block 0, whose P is never used): k = 2:
    3 + 2, k = 4: 15 + 14 -- where the bit-level tree spends an AND round on G and log2(k) levels. Returns (G, P),
    (ceil(m / k), W) each (P[0] unused). Leaks: shapes only."""
    from crypten.mpc.primitives import BinarySharedTensor as BST

    left, right, gterms, pterms, plocal, _ = _block_layout(m, k)
    dev = own.device
    ext = torch.cat([own[:m], torch.full_like(own[:1], -1)])  # plane m: all ones (the empty factor)
    mine = _monomials(ext, (left if rank == 0 else right).to(dev))
    prods = _and(BST(mine, src=0).share, BST(mine, src=1).share)  # input sharings: PRZS-masked, no traffic
    prods = torch.cat([prods, torch.zeros_like(prods[:1])])  # row T: the padding's zero
    G = _xor_rows(prods, gterms.to(dev))
    P = _monomials(ext, plocal.to(dev)) ^ _xor_rows(prods, pterms.to(dev))
    return G, P


def _two_summands(flat: torch.Tensor) -> torch.Tensor:
    """3 parties: a fresh sharing of the same x (a PRZS added), then party 2 hands its share to party 0, so
    x = y + x_1 with y = x_0 + x_2 held by party 0 alone and x_1 by party 1 (party 2 holds 0). 1 round, 8 B per element
    from party 2 to party 0. Party 0 then holds two of the three fresh shares, as replicated sharing gives it (and in
    the same direction as CrypTen's replicated products, party i -> i + 1): x_1 stays uniform to it. Leaks: shapes
    only."""
    import crypten.communicator as comm

    from .dealer_free import zero_share

    c, rank = comm.get(), comm.get().get_rank()
    share = (flat + zero_share(flat.size(), flat.device)).contiguous()
    if rank == 2:
        c.isend(share, dst=0).wait()
        return torch.zeros_like(share)
    if rank == 0:
        buf = torch.empty_like(share)
        c.irecv(buf, src=2).wait()
        return share + buf
    return share


def _level_ands(k: int) -> list[int]:
    """AND planes per level of :func:`_carry_levels` over k groups."""
    out = []
    while k > 1:
        out.append(2 * (k // 2) - 1)
        k = (k + 1) // 2
    return out


#: the first round's block of positions (2PC): 4 (one round less at widths 16 and 32, ~2x the AND planes) where the
#: extra bytes of a call stay under BLOCK4_EXTRA_BYTES per party (a round costs more on any network profile:
#: 0.3 ms RTT ~ 110 KB at 3 Gb/s), else 2. A public function of the public size.
BLOCK4_EXTRA_BYTES = 1 << 16


def and_planes_2pc(width: int, k: int) -> list[int]:
    """AND planes per round of the 2PC comparison at ``width`` with blocks of k: the blocks' cross ANDs, then the
    levels."""
    left, _, _, _, _, n_blocks = _block_layout(width - 1, k)
    return [int(left.shape[0]), *_level_ands(n_blocks)]


def block_size(width: int, N: int) -> int:
    """The first round's block (2 or 4) for N elements at ``width`` (:data:`BLOCK4_EXTRA_BYTES`)."""
    words = -(-N // 64)
    extra = 16 * words * (sum(and_planes_2pc(width, 4)) - sum(and_planes_2pc(width, 2)))
    return 4 if extra <= BLOCK4_EXTRA_BYTES else 2


def _carry_levels(G: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The carry out of groups 0..k-1 (low to high; group 0's P unused) by a tree: each level pairs groups,
    G' = G_h ^ P_h G_l and P' = P_h P_l (not for the pair holding group 0), in one AND round; an odd top group
    moves up as it is. ceil(log2 k) rounds, 2 floor(k/2) - 1 AND words per word of elements each."""
    while G.shape[0] > 1:
        k = G.shape[0]
        p = k // 2
        prods = _and(torch.cat([P[1 : 2 * p : 2], P[3 : 2 * p : 2]]), torch.cat([G[0 : 2 * p : 2], P[2 : 2 * p : 2]]))
        Gn = G[1 : 2 * p : 2] ^ prods[:p]
        Pn = torch.cat([torch.zeros_like(Gn[:1]), prods[p:]])
        if k % 2:
            Gn, Pn = torch.cat([Gn, G[-1:]]), torch.cat([Pn, P[-1:]])
        G, P = Gn, Pn
    return G[0]


def b2a_plane(s: torch.Tensor, N: int):
    """XOR shares of N bits packed in words (s: (W,), :func:`pack_bits`) -> arithmetic 0/1 shares at scale 1, (N,).
    CrypTen's B2A_single_bit with the opening packed: r a random bit per element from the provider's B2A tuple
    (drawn for all W x 64 bits, so the opened words are uniform), open the W words of s ^ r (1 round, 8 B per 64
    elements in 2PC instead of 8 B per element), then [x] = [r] (1 - 2 z) + z locally. Dealer-free 3PC: its
    B2A (:func:`mpcache.mpc.dealer_free.b2a_plane`, v rides in the same exchange). Leaks: shapes only."""
    import crypten.communicator as comm
    from crypten.mpc.primitives import BinarySharedTensor as BST

    from . import dealer_free

    if dealer_free.is_active() and comm.get().get_world_size() == 3:
        return dealer_free.b2a_plane(s, N)
    import crypten

    W = s.numel()
    rA, rB = crypten.mpc.get_default_provider().B2A_rng(torch.Size([W * 64]), device=s.device)
    z = BST.from_shares(s ^ pack_bits(rB.share & 1)).reveal()
    zb = unpack_bits(z, N)
    return rA[:N] * (1 - 2 * zb) + zb


def _ltz_lanes(x, width: int = 16, shift: int = 12, block: int | None = None, b2a=None):
    """[x < 0] for a coarse comparison: the sign of ``floor(x / 2^shift)`` as a ``width``-bit integer. Each party
    takes bits ``[shift, shift + width)`` of its own share (no communication: the sum of the parties'
    ``floor(x_i / 2^shift) mod 2^width`` is ``floor(x / 2^shift) - c mod 2^width``, where c counts the carries out
    of the dropped low bits, c in {0, 1} for the two summands (3PC: after :func:`_two_summands`; the bound below
    keeps the general n - 1): an exact identity, no probabilistic truncation); the sign is bit
    width-1 of the sum, i.e. ``P_(w-1) ^ carry into bit w-1``.

    Exactness (x in ring units, n parties): the result is exactly [x < 0] whenever x < 0, or x >= (n - 1) 2^shift,
    as long as |x| < 2^(shift + width - 1) - n 2^shift. Only non-negative x below (n - 1) 2^shift (one ulp of the
    coarse scale in 2PC) may read as negative: a one-sided error at the threshold. With CrypTen's 16 fractional bits,
    ``width=16, shift=12`` compares at 1/16 resolution (errs only for 0 <= x < (n - 1)/16) over |x| < 2048 - n/16.

    Circuit, bit-sliced: every bit position is a plane of words holding that bit of 64 elements
    (:func:`bit_planes`), so each AND layer of the carry tree touches only the live bits -- (G, P) halve per level
    -- instead of whole words of lanes at every level, and any width up to 64 - shift costs what its bits need.
    2PC: the blocks of ``block`` positions (None: :func:`block_size`, 4 for calls small enough that the extra AND
    planes stay under :data:`BLOCK4_EXTRA_BYTES`, else 2) in ONE AND round from the parties' private bits
    (:func:`_blocks_2pc`), then ceil(log2(blocks)) levels (:func:`_carry_levels`), then the packed B2A
    (:func:`b2a_plane`). 3 parties: party 2 first hands a fresh share to party 0 (:func:`_two_summands`: 1 round),
    then the same circuit between parties 0 and 1, its shares re-randomised (a binary PRZS) before the levels.

    Cost per element (2PC), words of 64 elements, an AND word opens 2 x 8 B, + 1/8 B for the B2A word
    (:func:`and_planes_2pc`): blocks of 2: width 32: 6 rounds, 100 AND planes ~ 25 B; width 16: 5 rounds, 45 planes
    ~ 11.4 B; width 8: 4 rounds, 18 planes ~ 4.6 B. Blocks of 4: width 32: 5 rounds, 213 planes ~ 53 B; width 16:
    4 rounds, 90 planes ~ 22.6 B. CrypTen's 64-bit circuit: 8 rounds, 216 B. 3 parties: one round more than 2PC
    (the hand-over), each AND opened to both peers, + 8 B per element from party 2 to party 0 (session 11's
    carry-save circuit: 8 rounds at width 32, 7 at 16). Leaks: shapes only (the block size is a function of the public size).
    ``b2a`` (2PC): the last step through a mask plan's bit slots instead (:meth:`mpcache.mpc.masked.Plan.b2a`: the
    same opening, and the bits' products with the plan's opened values are then local). Float model:
    :func:`ltz_lanes_reference`."""
    import crypten.communicator as comm

    if not 2 <= width <= 64 - shift:
        raise ValueError(f"the comparison's width must be in [2, 64 - shift], got width {width}, shift {shift}")
    n = comm.get().get_world_size()
    if n not in (2, 3):
        raise ValueError(f"the bit-sliced comparison runs 2 or 3 parties, got {n}")
    shape, flat = x.share.shape, x.share.reshape(-1)
    N = flat.numel()
    if n == 3:
        flat = _two_summands(flat)
    own = bit_planes(flat >> shift if shift else flat, width)  # (width, W): this party's coarse share, bit-sliced
    m = width - 1  # positions below the sign bit: the carry into it
    from .dealer_free import zero_share

    G, P = _blocks_2pc(own, m, comm.get().get_rank(), block or block_size(width, N))
    top = own[m]  # P of the sign position: a ^ b (party 0 holds a, party 1 b)
    if n == 3:  # every share a fresh XOR sharing before the levels' openings (3PC's openings show a peer's share)
        G, P, top = (t ^ zero_share(t.size(), t.device, binary=True) for t in (G, P, top))
    sign = top ^ _carry_levels(G, P)
    if b2a is not None:
        return _from_shares(b2a(sign, N).reshape(shape), precision=0)
    return _from_shares(b2a_plane(sign, N).share.reshape(shape), precision=0)


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

    Rounds: cmp + 1 (7 with the lean comparison in 2PC, 9 with CrypTen's).  Bytes per element (2PC): 2 comparisons
    (2 x ~25 B lean, 2 x 216 B full) + 2 products (2 x 16 B).  Exact (no approximation; fixed-point inputs give
    fixed-point outputs bit for bit).  ``lean``: comparisons in 32-bit lanes, valid while |x - lo|, |x - hi| < 2^15.
    Leaks: shapes only.  Float model: :func:`clamp_reference`."""
    import crypten

    if not lo < hi:
        raise ValueError(f"clamp needs lo < hi, got lo={lo}, hi={hi}")
    bits = _ltz(crypten.stack([x - lo, -x + hi]), lean)  # [x < lo], [x > hi]: one layer
    return x + (bits * crypten.stack([lo - x, hi - x])).sum(0)


def clamp_reference(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return x.double().clamp(lo, hi)
