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

**Costs (2PC).** Online: 8 B per element per opened slot, the rounds of the openings; no other traffic. Offline
(the dealer, party 0 only): the answer, 8 B per element per product of masks, off the critical path (pooled like
the other tuples, :mod:`mpcache.mpc.dealer`). TFP (the benchmark mode): party 0 draws the masks and their products
and shares them by PRZS (no traffic).

**Security.** Each ``B_i`` is fresh and uniform over Z_2^64 and masks one value once, so every opened ``D_i`` is
uniform and independent of the secrets and of the other openings; the products of masks reach the parties only as
shares (uniform given one share). The dealer sees the plan (slot count, monomials, sizes: public functions of the
code and shapes), nothing else. **Leakage: shapes only.** Never open a slot twice (two openings ``v - B``, ``v' - B``
would reveal ``v - v'``): :meth:`Plan.open` refuses it.

Where it runs: 2 parties with a dealer (``ttp``) or TFP (``MpcConfig.masked_acts``); 3PC and the ablation keep the
Beaver forms (:mod:`mpcache.mpc.activations`).
"""

from __future__ import annotations

import functools
import itertools

import torch

FRAC = 16  # the fixed-point fraction bits the plan's outputs carry (CrypTen's default precision)


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


def dealer_products(masks: list[torch.Tensor], subsets) -> torch.Tensor:
    """The products of masks, stacked on dim -2 (masks: each ``(..., N)``): what the dealer (or TFP's party 0)
    shares."""
    return torch.stack([functools.reduce(torch.mul, [masks[i] for i in s]) for s in subsets], dim=-2)


def _comm():
    import crypten.communicator as comm

    return comm.get()


def _draw(numel: int, n: int, subsets, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This party's shares of the n masks (each ``(numel,)``) and of their products (``(len(subsets), numel)``)."""
    import crypten

    from .lean_tfp import share_from_party0

    size, out = (numel,), (len(subsets), numel)
    name = crypten.mpc.get_default_provider().NAME
    if name == "TTP":
        from .dealer import client, pooled_device

        cl = client()
        args = (numel, n, subsets)
        if pooled_device(device):
            parts = cl.pooled("masks", device, args, [size] * n, out)
            return parts[:n], parts[n]
        from crypten.common.rng import generate_random_ring_element

        gen = cl.generator(device)
        masks = [generate_random_ring_element(torch.Size(size), generator=gen, device=device) for _ in range(n)]
        if cl.rank == 0:
            prods = cl.request("masks", device, args, out)
        else:
            prods = generate_random_ring_element(torch.Size(out), generator=gen, device=device)
        return masks, prods
    if name != "TFP":
        raise NotImplementedError(f"mask plans need the TFP or TTP provider, not {name!r}")
    from crypten.common.rng import generate_random_ring_element

    both = None
    if _comm().get_rank() == 0:
        b = generate_random_ring_element(torch.Size((n, numel)), device=device)
        both = torch.cat([b, dealer_products(list(b), subsets)]) if subsets else b
    s = share_from_party0(both, (n + len(subsets), numel), device)
    return list(s[:n]), s[n:]


class Plan:
    """The masks of one protocol call: ``n`` slots shaped like ``like`` and the products its monomials need.

    :meth:`open` opens slots (one exchange), :meth:`mono` evaluates a monomial of opened slots (local),
    :meth:`lin` a linear combination of monomials (local, one truncation). Every slot is opened at most once."""

    def __init__(self, like, n: int, monomials):
        self.shape, self.device = like.size(), like.device
        self.numel = int(torch.Size(self.shape).numel())
        self.subsets = closure(monomials)
        self._at = {s: k for k, s in enumerate(self.subsets)}
        self.masks, self.prods = _draw(self.numel, n, self.subsets, self.device)
        self.d: list = [None] * n
        self.scale: list = [None] * n
        self.rank = _comm().get_rank()

    def open(self, items) -> None:
        """Open ``v - B_i`` for each ``(slot, v)`` (v an MPCTensor shaped like the plan): ONE exchange, 8 B per
        element and slot per party (2PC). Leaks nothing: each ``B_i`` is fresh, uniform and used once."""
        for i, _ in items:
            if self.d[i] is not None:
                raise RuntimeError(f"mask plan: slot {i} is already open (a mask masks one value once)")
        flat = torch.cat([v.share.reshape(-1) - self.masks[i] for i, v in items])
        flat = _comm().all_reduce(flat)
        for k, (i, v) in enumerate(items):
            self.d[i] = flat[k * self.numel : (k + 1) * self.numel]
            self.scale[i] = int(v.encoder.scale)

    def _share_of(self, sub: tuple) -> torch.Tensor | None:
        if not sub:
            return None  # the public 1: party 0 adds it
        if len(sub) == 1:
            return self.masks[sub[0]]
        return self.prods[self._at[sub]]

    def mono_raw(self, slots) -> torch.Tensor:
        """This party's share of prod v_i at scale 2^FRAC (a ring tensor, flat): exact, then one local truncation
        where two fixed-point factors meet (a bit factor adds no scale)."""
        slots = tuple(sorted(slots))
        k = len(slots)
        z = None
        for take in itertools.product((False, True), repeat=k):  # True: the mask's share, False: the public D
            sub = tuple(s for s, t in zip(slots, take) if t)
            share = self._share_of(sub)
            pub = [self.d[s] for s, t in zip(slots, take) if not t]
            if share is None:
                if self.rank != 0:
                    continue
                term = functools.reduce(torch.mul, pub)
            else:
                term = functools.reduce(torch.mul, pub, share) if pub else share
            z = term if z is None else z + term
        if z is None:
            z = torch.zeros_like(self.masks[0])
        bits = sum(self.scale[s].bit_length() - 1 for s in slots) - FRAC
        if bits > 0:
            z = z.div(1 << bits, rounding_mode="trunc")  # CrypTen's 2PC truncation, on this party's share
        elif bits < 0:
            z = z * (1 << -bits)
        return z

    def lin(self, terms: dict, const: float = 0.0):
        """``const + sum c * monomial`` (terms: slot tuple -> float) as a fixed-point MPCTensor shaped like the
        plan: each monomial at scale 2^16, the public coefficients at 2^16, one truncation of the sum. Error: <= 1
        ulp per monomial with two fixed-point factors times |c|, plus 1."""
        from .compare import _from_shares

        acc = None
        for slots, c in terms.items():
            t = self.mono_raw(slots) * round(c * (1 << FRAC))
            acc = t if acc is None else acc + t
        if self.rank == 0 and const:
            acc = acc + round(const * (1 << FRAC)) * (1 << FRAC)
        acc = acc.div(1 << FRAC, rounding_mode="trunc")
        return _from_shares(acc.reshape(self.shape), precision=FRAC)


def mono_reference(values: list[torch.Tensor]) -> torch.Tensor:
    """The float model of a monomial: the plain product (the masks cancel exactly in the ring)."""
    return functools.reduce(torch.mul, [v.double() for v in values])


__all__ = ["Plan", "closure", "dealer_products", "mono_reference", "usable"]
