"""Open-once masks: each value of a protocol opened ONCE as ``D = v - B``, every later product of them local.

Beaver's product opens both operands' masked values for every product, so a value used in k products is opened k
times (``x - a_1``, ..., ``x - a_k``). Here (the preprocessing model of ABY2.0, Patra et al., USENIX Security 2021,
in additive 2PC form) a protocol declares up front its *slots* (the values it will open, one fresh uniform mask
``B_i`` each) and the *monomials* it will evaluate (products of slots, e.g. ``x * g``, ``s * x * g``), and the
dealer hands the parties shares of every ``B_i`` and of every product of masks those monomials need (each
sub-product of two or more, :func:`closure`). Opening slot i sends ``v_i - B_i`` (8 B per element per party in
2PC, 1 round; several slots of one round in ONE exchange), after which ``D_i`` is public and

    v_1 ... v_k = prod (D_i + B_i) = sum over subsets S of the factors:  prod_(i not in S) D_i  x  [prod_(i in S) B_i]

is a local sum (party 0 adds the all-``D`` term). So a value costs one opening however many products it enters,
and a product of two or three opened values costs nothing online. Exact in the ring; a monomial of two fixed-point
factors is then truncated once (locally, as CrypTen's 2PC products: <= 1 ulp), a bit factor (scale 1) adds no
scale. Monomials carry at most two fixed-point factors (a third would put 2^48-scale values through the local
truncation, whose failure probability grows with |value| / 2^64).

**Exact zeros.** A monomial's shares are a sharing of exactly ``prod v_i mod 2^64``; with a 0/1 factor equal to 0
they are a sharing of 0, and the local truncation of a sharing of 0 is exactly 0 (party 1's share is minus party 0's,
truncation toward zero is odd). So ``o * y`` is exactly 0 where the bit o is 0, whatever garbage ``y`` holds there
(a polynomial evaluated far outside its interval overflows the ring): the activations use this for their muxes.

**Bit slots.** A comparison's B2A can open into a plan (:meth:`Plan.b2a`, the ``b2a=`` hook of
:func:`mpcache.mpc.compare._ltz_lanes`): it opens ``sign ^ r`` packed (as the plain B2A; r the slot's random bits,
the padding bits random too), so the bit is ``c + (1 - 2c) r`` with c public: a public affine function of a mask,
whose products with opened values are local like any slot's (8 B per 64 elements, the comparison's last round).
**Derived slots** (``Plan(..., derived={"o": (1, {"gt": -1, "lt": -1})})``) are public affine combinations of slots
of one scale, used as ONE factor (its expansion takes any one of their masks), so exact zeros hold for them too.

**Costs (2PC).** Online: 8 B per element per opened slot, the rounds of the openings; no other traffic. Offline
(the dealer, party 0 only): the answer, 8 B per element per product of masks, off the critical path (pooled like
the other tuples, :mod:`mpcache.mpc.dealer`). TFP (the benchmark mode): party 0 draws the masks and their products
and shares them by PRZS (no traffic).

**Security.** Each ``B_i`` is fresh and uniform over Z_2^64 and masks one value once, so every opened ``D_i`` is
uniform and independent of the secrets and of the other openings; the products of masks reach the parties only as
shares (uniform given one share). The dealer sees the plan (slot count, monomials, sizes: public functions of the
code and shapes), nothing else. **Leakage: shapes only.** Never open a slot twice (two openings ``v - B``, ``v' - B``
would reveal ``v - v'``): :meth:`Plan.open` refuses it.

Where it runs: 2 parties with a dealer (``ttp``) or TFP (``MpcConfig.masked_acts``): SiLU/GeLU
(:mod:`mpcache.mpc.activations`), the norms' branch select (:mod:`mpcache.mpc.norms`), the reciprocal's d0
(:mod:`mpcache.mpc.approx`), ``tree_max``'s layers of radix <= 8 and the levels of the stratified tournament,
its one-hots included (:func:`mpcache.mpc.tournament._masked_levels`). 3PC and the
ablation keep the Beaver forms.
"""

from __future__ import annotations

import functools
import itertools

import torch

FRAC = 16  # the fixed-point fraction bits the plan's outputs carry (CrypTen's default precision)
RING, BIT = "ring", "bit"  # slot kinds: a uniform ring mask, or a random bit (a comparison's B2A, below)


def usable(cfg) -> bool:
    """Whether the session's setting serves mask plans: 2 additive parties with TFP or the dealer."""
    return (
        bool(cfg.masked_acts) and cfg.n_parties == 2 and cfg.protocol == "arithmetic" and cfg.provider in ("tfp", "ttp")
    )


def closure(monomials) -> tuple[tuple[int, ...], ...]:
    """Every product of two or more masks the monomials need (sorted slot tuples, repeats kept), sorted: the dealer's
    answer, in this order."""
    out = set()
    for m in monomials:
        m = tuple(sorted(m))
        for k in range(2, len(m) + 1):
            out.update(itertools.combinations(m, k))
    return tuple(sorted(out, key=lambda s: (len(s), s)))


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def _bshape(shapes) -> tuple:
    return _broadcast(tuple(tuple(s) for s in shapes))


@functools.lru_cache(maxsize=4096)
def _broadcast(shapes: tuple) -> tuple:
    """numpy's broadcasting of public shapes (torch.broadcast_shapes goes through symbolic-shape guards: ~60 us a
    call, ~9,000 calls a decode token in the plans' expansions)."""
    n = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(-n, 0):
        dims = {s[i] for s in shapes if len(s) >= -i} - {1}
        if len(dims) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def own_sizes(spec) -> list[tuple]:
    """Each party's own draws per slot: a ring mask's share (the slot's shape), or a bit slot's XOR share packed 64
    elements to a word (:func:`mpcache.mpc.compare.pack_bits`)."""
    return [(_numel(sh),) if kind == RING else (-(-_numel(sh) // 64),) for sh, kind in spec]


def answer_numel(spec, subsets) -> int:
    """The dealer's answer (party 0's shares): every bit slot's arithmetic share, then every product of masks."""
    bits = sum(_numel(sh) for sh, kind in spec if kind == BIT)
    return bits + sum(_numel(_bshape([spec[i][0] for i in sub])) for sub in subsets)


def dealer_answer(values: list[torch.Tensor], spec, subsets) -> torch.Tensor:
    """(count, answer_numel) from the masks' values, each (count, *shape) (bit slots: 0/1): the bit slots' values,
    then the products of masks (broadcast), flattened. What the dealer (or TFP's party 0) shares."""
    count = values[0].shape[0]
    rank = max(len(sh) for sh, _ in spec)
    values = [v.reshape(count, *((1,) * (rank - len(sh))), *sh) for v, (sh, _) in zip(values, spec)]  # right-aligned
    parts = [values[i].reshape(count, -1) for i, (_, kind) in enumerate(spec) if kind == BIT]
    for sub in subsets:
        parts.append(functools.reduce(torch.mul, [values[i] for i in sub]).reshape(count, -1))
    return torch.cat(parts, dim=1)


def mask_values(parts, spec, total) -> list[torch.Tensor]:
    """The masks' values from every party's own draws (``parts[party][slot]``, each ``(count, *own size)``): a ring
    mask is the sum of the shares, a bit slot's bits the XOR of the packed shares, unpacked. The dealer's side."""
    from .compare import unpack_bits

    out = []
    for i, (sh, kind) in enumerate(spec):
        if kind == RING:
            v = total([q[i] for q in parts])
        else:
            v = unpack_bits(total([q[i] for q in parts], torch.bitwise_xor), _numel(sh))
        out.append(v.reshape(v.shape[0], *sh))
    return out


def _pad_random(words: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``words`` (packed bits, zero padded past ``n_bits``) with random bits in the padding of the last word, so
    an opened ``sign ^ r`` word is uniform there too (the sign's padding is zero; nobody reads those bits)."""
    if n_bits % 64 == 0:
        return words
    from crypten.common.rng import generate_kbit_random_tensor

    pad = generate_kbit_random_tensor(torch.Size([1]), device=words.device) & ~((1 << (n_bits % 64)) - 1)
    return torch.cat([words[:-1], words[-1:] ^ pad])


def _comm():
    import crypten.communicator as comm

    return comm.get()


@functools.lru_cache(maxsize=1024)
def _layout(spec: tuple, names: tuple, bases: tuple, monomials: tuple):
    """A plan's public structure, the same at every call with the same slots and monomials (every layer, every
    token): the closure's products of masks and each product's (broadcast shape, size) in the answer."""
    index = {n: i for i, n in enumerate(names)}
    subsets = closure(c for m in monomials for c in Plan._choices(m, dict(bases), index))
    shapes = []
    for sub in subsets:
        bs = _bshape([spec[i][0] for i in sub])
        shapes.append((bs, _numel(bs)))
    return subsets, tuple(shapes)


def _draw(spec, subsets, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This party's own draws (per slot: its ring mask share, or its packed XOR share of the bit mask) and its flat
    share of the dealer's answer (:func:`answer_numel`)."""
    import crypten

    from .lean_tfp import share_from_party0

    own, ans = own_sizes(spec), (answer_numel(spec, subsets),)
    name = crypten.mpc.get_default_provider().NAME
    args = (tuple((tuple(sh), kind) for sh, kind in spec), subsets)
    if name == "TTP":
        from crypten.common.rng import generate_random_ring_element

        from .dealer import client, pooled_device

        cl = client()
        if pooled_device(device):
            parts = cl.pooled("masks", device, args, own, ans)
            return parts[: len(own)], parts[len(own)]
        gen = cl.generator(device)
        draws = [generate_random_ring_element(torch.Size(z), generator=gen, device=device) for z in own]
        if cl.rank == 0:
            answer = cl.request("masks", device, args, ans)
        else:
            answer = generate_random_ring_element(torch.Size(ans), generator=gen, device=device)
        return draws, answer
    if name != "TFP":
        raise NotImplementedError(f"mask plans need the TFP or TTP provider, not {name!r}")
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element

    from .compare import pack_bits

    rank = _comm().get_rank()
    draws = []
    values = []
    for (sh, kind), z in zip(spec, own):
        if kind == RING:
            v = generate_random_ring_element(torch.Size(sh), device=device) if rank == 0 else None
            draws.append(share_from_party0(None if v is None else v.reshape(-1), z, device))
        else:
            v = generate_kbit_random_tensor(torch.Size(sh), bitlength=1, device=device) if rank == 0 else None
            w = None if v is None else _pad_random(pack_bits(v.reshape(-1)), _numel(sh))
            draws.append(share_from_party0(w, z, device, binary=True))
        values.append(None if v is None else v.unsqueeze(0))
    answer = dealer_answer(values, spec, subsets).reshape(-1) if rank == 0 else None
    return draws, share_from_party0(answer, ans, device)


class Plan:
    """The masks of one protocol call: named slots ``{name: (shape, kind)}``, optional *derived* slots
    ``{name: (const, {slot: coef})}`` (a public affine combination of slots of one scale, e.g. o = 1 - b_gt - b_lt
    of two bit slots: one factor of a monomial, so o y is exactly 0 where o is 0), and the monomials (tuples of
    names) it will evaluate; the dealer's tuple is drawn at once (no traffic online).

    :meth:`open` opens ring slots (one exchange), :meth:`b2a` turns a comparison's XOR-shared bits into bit slots
    (its B2A opening), :meth:`lin` evaluates a linear combination of monomials (local, one truncation). Every slot
    is opened at most once. Monomials broadcast their slots' shapes."""

    def __init__(self, slots: dict, monomials, derived: dict | None = None, device=None):
        self.names = list(slots)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.spec = [(tuple(int(d) for d in slots[n][0]), slots[n][1]) for n in self.names]
        self.derived = dict(derived or {})
        self.device = device
        bases = tuple((n, tuple(self._bases(n))) for n in self.derived)
        self.subsets, shapes = _layout(tuple(self.spec), tuple(self.names), bases, tuple(map(tuple, monomials)))
        self.draws, answer = _draw(self.spec, self.subsets, device)
        self.rank = _comm().get_rank()
        self.share: list = [None] * len(self.spec)  # per slot: this party's share of its mask (bits: arithmetic)
        at = 0
        for i, (sh, kind) in enumerate(self.spec):
            if kind == RING:
                self.share[i] = self.draws[i].reshape(sh)
            else:
                self.share[i] = answer[at : at + _numel(sh)].reshape(sh)
                at += _numel(sh)
        self.prods = {}
        for sub, (bs, k) in zip(self.subsets, shapes):
            self.prods[sub] = answer[at : at + k].reshape(bs)
            at += k
        self.alpha: list = [None] * len(self.spec)  # the public part: D (ring slots) or the bit's affine offset
        self.beta: list = [None] * len(self.spec)  # the mask's public factor (None: 1)
        self.scale: list = [1] * len(self.spec)

    @staticmethod
    def _choices(monomial, bases: dict, index: dict):
        """Every multiset of masks the monomial's expansion multiplies (one mask or none per factor): the closure's
        input (a derived factor contributes any one of its slots' masks)."""
        out = []
        for pick in itertools.product(*[[None, *(bases[n] if n in bases else (index[n],))] for n in monomial]):
            out.append(tuple(i for i in pick if i is not None))
        return out

    def _bases(self, name: str) -> list[int]:
        if name in self.derived:
            return [self.index[b] for b in self.derived[name][1]]
        return [self.index[name]]

    def _fresh(self, name: str, kind: str) -> int:
        i = self.index[name]
        if self.spec[i][1] != kind:
            raise ValueError(f"mask plan: slot {name!r} is a {self.spec[i][1]} slot")
        if self.alpha[i] is not None:
            raise RuntimeError(f"mask plan: slot {name!r} is already open (a mask masks one value once)")
        return i

    def open(self, items) -> None:
        """Open ``v - B`` for each ``(name, v)`` (v an MPCTensor shaped like its ring slot): ONE exchange, 8 B per
        element per party (2PC). Leaks nothing: each ``B`` is fresh, uniform and used once."""
        idx = [self._fresh(n, RING) for n, _ in items]
        flat = torch.cat([v.share.reshape(-1) - self.draws[i] for i, (_, v) in zip(idx, items)])
        flat = _comm().all_reduce(flat)
        at = 0
        for i, (_, v) in zip(idx, items):
            k = self.draws[i].numel()
            self.alpha[i] = flat[at : at + k].reshape(self.spec[i][0])
            self.scale[i] = int(v.encoder.scale)
            at += k

    def b2a(self, *names: str, complement: bool = False):
        """A B2A for :func:`mpcache.mpc.compare._ltz_lanes` (``b2a=``) through bit slots ``names`` (the comparison's
        elements in their order, slot after slot): it opens the packed ``sign ^ r`` (r the slots' random bits: 8 B
        per 64 elements, 1 round, as :func:`mpcache.mpc.compare.b2a_plane`) and returns the arithmetic share of the
        signs, c + (1 - 2c) [r]; each slot then stands for its sign (``complement``: for 1 - sign), a public affine
        function of its mask r, so its products with opened slots are local (:meth:`lin`). Leaks nothing: r is
        uniform per bit."""
        idx = [self._fresh(n, BIT) for n in names]
        sizes = [_numel(self.spec[i][0]) for i in idx]

        def run(s_words: torch.Tensor, N: int) -> torch.Tensor:
            from crypten.mpc.primitives import BinarySharedTensor as BST

            from .compare import pack_bits, unpack_bits

            if N != sum(sizes):
                raise ValueError(f"mask plan: bit slots {names} hold {sum(sizes)} bits, the comparison {N}")
            if len(idx) == 1:
                r = self.draws[idx[0]]
            else:
                r = _pad_random(pack_bits(torch.cat([unpack_bits(self.draws[i], k) for i, k in zip(idx, sizes)])), N)
            c_all = unpack_bits(BST.from_shares(s_words ^ r).reveal(), N)
            signs, at = [], 0
            for i, k in zip(idx, sizes):
                c = c_all[at : at + k].reshape(self.spec[i][0])
                at += k
                signs.append((self.share[i] * (1 - 2 * c) + (c if self.rank == 0 else 0)).reshape(-1))
                self.alpha[i], self.beta[i] = (1 - c, 2 * c - 1) if complement else (c, 1 - 2 * c)
            return torch.cat(signs)

        return run

    def _factor(self, name: str):
        """(alpha, [(mask slot, public factor or None), ...]) of a slot or derived slot: its value is
        alpha + sum factor * B."""
        if name not in self.derived:
            i = self.index[name]
            if self.alpha[i] is None:
                raise RuntimeError(f"mask plan: slot {name!r} is not open yet")
            return self.alpha[i], [(i, self.beta[i])], self.scale[i]
        const, coefs = self.derived[name]
        alpha, comps, scales = const, [], set()
        for b, c in coefs.items():
            a, ((i, beta),), sc = self._factor(b)
            alpha = alpha + c * a
            comps.append((i, c if beta is None else c * beta))
            scales.add(sc)
        if len(scales) != 1:
            raise ValueError(f"mask plan: derived slot {name!r} mixes scales {sorted(scales)}")
        return alpha, comps, scales.pop()

    def raw(self, names) -> torch.Tensor:
        """This party's share of prod v_i, exact (a sharing of the product mod 2^64, broadcast), at the product of
        the factors' scales (bits: 1)."""
        return self._raw([self._factor(n) for n in names])

    def mono_raw(self, names) -> torch.Tensor:
        """This party's share of prod v_i at scale 2^FRAC (a ring tensor, broadcast): exact (:meth:`raw`), then one
        local truncation where two fixed-point factors meet (a bit adds no scale)."""
        factors = [self._factor(n) for n in names]
        z = self._raw(factors)
        bits = sum(f[2].bit_length() - 1 for f in factors) - FRAC
        if bits > 0:
            z = z.div(1 << bits, rounding_mode="trunc")  # CrypTen's 2PC truncation, on this party's share
        elif bits < 0:
            z = z * (1 << -bits)
        return z

    def _raw(self, factors) -> torch.Tensor:
        z = None
        for pick in itertools.product(*[[None, *comps] for _, comps, _ in factors]):
            sub = tuple(sorted(c[0] for c in pick if c is not None))
            if not sub and self.rank != 0:
                continue  # the all-public term: party 0 adds it
            pub = [f[0] for f, c in zip(factors, pick) if c is None]
            pub += [c[1] for c in pick if c is not None and c[1] is not None]
            share = None if not sub else self.share[sub[0]] if len(sub) == 1 else self.prods[sub]
            if share is None:
                term = functools.reduce(torch.mul, pub)
            else:
                term = functools.reduce(torch.mul, pub, share) if pub else share
            z = term if z is None else z + term
        if z is None:  # party 1 of an all-public product (no such monomial in use)
            z = torch.zeros((), dtype=torch.long, device=self.device)
        return z

    def lin(self, terms: dict, const: float = 0.0):
        """``const + sum c * monomial`` (terms: tuple of slot names -> float) as a fixed-point MPCTensor (the
        monomials' shapes broadcast): each monomial at scale 2^16, the public coefficients at 2^16, one truncation of
        the sum. Error: <= 1 ulp per monomial with two fixed-point factors times |c|, plus 1."""
        from .compare import _from_shares

        acc = None
        for names, c in terms.items():
            t = self.mono_raw(names) * round(c * (1 << FRAC))
            acc = t if acc is None else acc + t
        if self.rank == 0 and const:
            acc = acc + round(const * (1 << FRAC)) * (1 << FRAC)
        acc = acc.div(1 << FRAC, rounding_mode="trunc")
        return _from_shares(acc, precision=FRAC)


def mono_reference(values: list[torch.Tensor]) -> torch.Tensor:
    """The float model of a monomial: the plain product (the masks cancel exactly in the ring)."""
    return functools.reduce(torch.mul, [v.double() for v in values])


__all__ = [
    "BIT",
    "RING",
    "Plan",
    "answer_numel",
    "closure",
    "dealer_answer",
    "mask_values",
    "mono_reference",
    "own_sizes",
    "usable",
]
