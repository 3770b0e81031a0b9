"""Dealer-free 3PC (provider ``"none"``, CrypTen name ``"R3"``): every tuple CrypTen's replicated protocol asks for,
made by the three compute parties themselves from the pairwise seeds ``crypten.init()`` sets up, and the
re-randomisations that make CrypTen's replicated products secure. Semi-honest, honest majority (ABY3-style).

Replicated randomness. Party i shares ``generators["prev"]`` with party i-1 and ``generators["next"]`` with party
i+1 (party i's next is party i+1's prev). A random ring value x = x_0 + x_1 + x_2 has component x_j drawn from the
generator of parties j-1 and j: party i draws x_i from its prev and x_{i+1} from its next, so it holds
(x_i, x_{i+1}) with no communication and never sees x_{i+2}: x is uniform to it. Its additive share is x_i. Every
generator is used by exactly its two parties, in the same order and with the same sizes (every draw depends on
public shapes only), so the streams stay in lockstep. A pseudo-random zero sharing (PRZS) is
``z_i = draw(next) - draw(prev)`` (XOR for binary shares): the draws telescope to 0.

Tuples (rounds / bytes per element and party / leakage):

* **Beaver triple** ``generate_additive_triple`` (any CrypTen ``op``: mul, matmul, conv...): a, b replicated,
  ``c_i = op(a_i, b_i + b_{i+1}) + op(a_{i+1}, b_i) + z_i`` (the 9 cross terms a_j b_k once each, summed over i).
  0 rounds, 0 bytes. **square** ``(r, r^2)``: ``r2_i = r_i^2 + 2 r_i r_{i+1} + z_i``; 0 / 0.
  **binary triple**: the same with XOR for + and AND for x; 0 / 0.
* **B2A_rng** (a random bit r with arithmetic and XOR shares): three pair-known bits t_A (parties 0, 1), t_B
  (1, 2), t_C (2, 0) drawn from the pair generators; r = t_A ^ t_B ^ t_C. XOR shares: party 0 t_A, party 1 t_B,
  party 2 t_C, each XOR a 64-bit PRZS (so a share looks like a TFP share: uniform). Arithmetic shares: party 1
  knows s = t_A ^ t_B; it splits s = u + v with u drawn from its seed with party 0 and sends v = s - u to party 2
  (v is uniform to party 2: u is unknown to it). Then r = s + t_C - 2 s t_C = (u + v)(1 - 2 t_C) + t_C, and each
  product term is local: party 0 holds u and t_C, party 2 holds v and t_C: ``rA_0 = u(1 - 2 t_C) + t_C``,
  ``rA_1 = 0``, ``rA_2 = v(1 - 2 t_C)``, plus an arithmetic PRZS. Cost of the tuple alone: 1 round (party 2
  receives), 8 bytes per element sent by party 1 and received by party 2, 0 for party 0 (+1 round over TFP, whose
  tuples are free). r is a product of degree 3 in pair-known bits, so some communication is unavoidable.
* **B2A_single_bit** (what comparisons call; :func:`b2a_single_bit`, installed in place of CrypTen's): v is data
  independent, so it rides in the same exchange as the opening of ``x ^ r``: every party sends its share of
  ``x ^ r`` to both peers (the opening TFP makes too) and party 1 appends v to its message to party 2. Cost:
  1 round (as TFP), bytes as TFP's opening (2 x 8 B sent and received per element and party) plus 8 B per element
  from party 1 to party 2. Then ``[x] = [r](1 - 2 z) + z`` locally.
* ``wrap_rng``: not used by the replicated protocol (its truncation is CrypTen's ``replicated.truncate``); raises.

Re-randomisation (:func:`install` patches CrypTen's ``replicated`` module). CrypTen's replicated products return
``z_i = x_i y_i + x_i y_{i-1} + x_{i-1} y_i`` with no zero sharing, and its truncation has party 2 send its share
to party 1. Party 1 holds x_0, x_1, y_0, y_1, so party 2's unmasked share ``z_2 = (x - x_0)(y - y_0) - x_1 y_1``
hands it a product of the secrets (for a square, (x - x_0)^2: x itself, up to sign); a product output re-sent to
the next party by a later product leaks ``x_i y + x y_i`` the same way, and a value both truncated (party 2 ->
party 1) and multiplied (party 0 -> party 1) gives party 1 all three shares. ABY3 adds a PRZS to every product
output; we do that (every replicated product: mul, matmul, conv, square; the fixed-operand product calls
:func:`rerandomize`) and add one to a truncation's input before party 2 sends its share. Zero bytes, zero rounds:
two PRG draws per output element.

Security argument (one semi-honest corruption, parties not colluding). Every share a party receives is masked by a
draw from the generator of the two OTHER parties: a PRZS share z_k = n_k - p_k contains n_k (parties k, k+1) and
p_k (parties k-1, k); the third party knows one of them, never both. Binary Beaver openings ``x ^ a``: party j
learns a_{j+1}, hence x_{j+1} — party j+1's share, which is masked by that party's fresh PRZS draw (every binary
sharing is a CrypTen PRZS input sharing, a triple's output with its z, or a linear map of those), and x_{j+2}
stays masked by a_{j+2}: the view is that of replicated sharing. B2A: r is uniform to each party (each misses one
of t_A, t_B, t_C), v is uniform to party 2, the opened ``x ^ r`` shares carry the XOR PRZS and the output's
arithmetic shares the arithmetic PRZS (without it, party 1's share would be 0 and party 0's would reveal t_C to
party 1). Leakage: shapes only. As everywhere in CrypTen, the PRG is torch's Mersenne Twister (a deployment
would use AES-CTR) and the seeds are exchanged in the clear at ``crypten.init`` (a deployment would agree them
over authenticated channels).
"""

from __future__ import annotations

import functools

import torch

NAME = "R3"  # the CrypTen provider name (``crypten.cfg.mpc.provider``)


def _comm():
    import crypten.communicator as comm

    return comm.get()


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return torch.device(device) if isinstance(device, str) else device


def _gens(device):
    from crypten import generators

    dev = _device(device)
    return generators["prev"][dev], generators["next"][dev]


def _ring(size, gen, device):
    from crypten.common import rng  # looked up now: the compatibility layer's fast draws apply

    return rng.generate_random_ring_element(torch.Size(size), generator=gen, device=_device(device))


def _bits(size, gen, device, bitlength=None):
    from crypten.common import rng

    return rng.generate_kbit_random_tensor(torch.Size(size), bitlength=bitlength, generator=gen, device=_device(device))


def replicated_random(size, device=None, binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """This party's two components (x_i, x_{i+1}) of a random replicated ring (or 64-bit XOR) value. No traffic."""
    prev, nxt = _gens(device)
    draw = _bits if binary else _ring
    return draw(size, prev, device), draw(size, nxt, device)


def zero_share(size, device=None, binary: bool = False) -> torch.Tensor:
    """This party's share of a pseudo-random zero sharing (sum, or XOR, over the parties = 0). No traffic."""
    prev, nxt = _gens(device)
    draw = _bits if binary else _ring
    a, b = draw(size, nxt, device), draw(size, prev, device)
    return a ^ b if binary else a - b


def rerandomize(share: torch.Tensor) -> torch.Tensor:
    """``share`` plus this party's PRZS share (a fresh additive sharing of the same value). Every party must call
    it, in the same order, with the same shape. 0 rounds, 0 bytes; leaks nothing."""
    return share + zero_share(share.size(), share.device)


# ---- B2A ------------------------------------------------------------------------------------------------------
def _b2a_parts(size, device):
    """This party's XOR share of r, its partial arithmetic share (party 2: None until v arrives), v (party 1), the
    multiplier (1 - 2 t_C) (parties 0 and 2). No traffic."""
    rank = _comm().get_rank()
    prev, nxt = _gens(device)
    t_prev = _bits(size, prev, device, bitlength=1)  # t of the pair (i-1, i)
    t_next = _bits(size, nxt, device, bitlength=1)  # t of the pair (i, i+1): t_A, t_B, t_C for party 0, 1, 2
    rB = t_next ^ zero_share(size, device, binary=True)
    v = part = mult = None
    if rank == 0:  # knows t_A (next) and t_C (prev); u comes from its seed with party 1
        u = _ring(size, nxt, device)
        mult = 1 - 2 * t_prev
        part = u * mult + t_prev
    elif rank == 1:  # knows t_A (prev) and t_B (next): s = t_A ^ t_B; u from its seed with party 0
        u = _ring(size, prev, device)
        v = (t_prev ^ t_next) - u
        part = torch.zeros_like(u)
    else:  # knows t_B (prev) and t_C (next)
        mult = 1 - 2 * t_next
    zA = zero_share(size, device)
    return rB, part, v, mult, zA


def _b2a_rng(size, device=None):
    """(rA, rB) shares of a random bit: 1 round (party 2 receives v), 8 B/element from party 1 to party 2."""
    from crypten.mpc.primitives import ArithmeticSharedTensor as AST
    from crypten.mpc.primitives import BinarySharedTensor as BST

    c = _comm()
    rank = c.get_rank()
    rB, part, v, mult, zA = _b2a_parts(size, device)
    if rank == 1:
        c.isend(v.contiguous(), dst=2).wait()
    elif rank == 2:
        v = torch.empty(torch.Size(size), dtype=torch.long, device=_device(device))
        c.irecv(v, src=1).wait()
        part = v * mult
    return AST.from_shares(part + zA, precision=0), BST.from_shares(rB)


def _b2a_exchange(mine: torch.Tensor, v, n_v: int):
    """The B2A's one exchange: every party sends ``mine`` (its share of the masked bits, flat) to both peers, party 1
    appends v (``n_v`` ring elements) to its message to party 2. Returns (the opened XOR, v at party 2 or None)."""
    c = _comm()
    rank = c.get_rank()
    peers = [j for j in range(3) if j != rank]
    n = mine.numel()
    sends = []
    for j in peers:
        msg = torch.cat([mine, v.reshape(-1)]) if (rank == 1 and j == 2) else mine
        sends.append(c.isend(msg, dst=j))
    bufs, recvs = {}, []
    for j in peers:
        bufs[j] = torch.empty(n + n_v if (rank == 2 and j == 1) else n, dtype=torch.long, device=mine.device)
        recvs.append(c.irecv(bufs[j], src=j))
    for r in (*recvs, *sends):
        if r is not None:
            r.wait()
    z = mine
    for j in peers:
        z = z ^ bufs[j][:n]
    return z, (bufs[1][n:] if rank == 2 else None)


def _b2a_finish(z, part, v_recv, mult, zA):
    """[x] = [r](1 - 2 z) + z from the opened z (this party's parts of the B2A tuple)."""
    from crypten.mpc.primitives import ArithmeticSharedTensor as AST

    rank = _comm().get_rank()
    if rank == 2:
        part = v_recv.reshape(z.shape) * mult
    out = part * (1 - 2 * z) + zA
    if rank == 0:
        out = out + z
    return AST.from_shares(out, precision=0)


def b2a_single_bit(xB):
    """CrypTen's ``B2A_single_bit`` (a 0/1 BinarySharedTensor to an ArithmeticSharedTensor at scale 1) with the
    dealer-free B2A tuple, its one message (party 1 -> party 2) riding in the opening's exchange.

    Rounds: 1 (as TFP). Bytes per element: every party sends its share of ``x ^ r`` to both peers and receives
    theirs (2 x 8 sent, 2 x 8 received: TFP's opening), and party 1 sends 8 more to party 2. Leaks: shapes only."""
    size, dev = xB.size(), xB.device
    rB, part, v, mult, zA = _b2a_parts(size, dev)
    z, v_recv = _b2a_exchange((xB.share ^ rB).contiguous().reshape(-1), v, rB.numel())
    return _b2a_finish(z.reshape(size), part, v_recv, mult, zA)


def b2a_plane(s: torch.Tensor, N: int):
    """:func:`b2a_single_bit` for N bits packed in words (``s``: (W,), :func:`mpcache.mpc.compare.pack_bits`): the
    tuple's r drawn for all W x 64 bits (every opened word uniform), the opened ``s ^ r`` packed (8 B per 64
    elements to each peer), v for the N elements only (party 1 -> party 2, 8 B per element, same exchange).
    1 round. Leaks: shapes only."""
    from .compare import pack_bits, unpack_bits

    W = s.numel()
    rB, part, v, mult, zA = _b2a_parts(torch.Size([W * 64]), s.device)
    z, v_recv = _b2a_exchange(s ^ pack_bits(rB & 1), None if v is None else v[:N], N)
    cut = lambda t: None if t is None else t[:N]
    return _b2a_finish(unpack_bits(z, N), cut(part), v_recv, cut(mult), zA[:N])


# ---- the provider -----------------------------------------------------------------------------------------------
@functools.cache
def provider_class():
    """The provider class (built lazily: CrypTen is imported after the compatibility patches)."""
    from crypten.mpc.primitives import ArithmeticSharedTensor as AST
    from crypten.mpc.primitives import BinarySharedTensor as BST
    from crypten.mpc.provider.provider import TupleProvider

    class DealerFree3PC(TupleProvider):
        """Tuples from the three parties' pairwise seeds (module docstring: costs, leakage, security)."""

        NAME = NAME

        @staticmethod
        def _check():
            n = _comm().get_world_size()
            if n != 3:
                raise RuntimeError(
                    f"the dealer-free provider (provider 'none') runs exactly 3 compute parties, got {n}: "
                    "use --protocol replicated with `mpirun -n 3`, or a dealer (--provider tfp|ttp) for 2PC"
                )

        def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
            """Beaver triple for ``op``: 0 rounds, 0 bytes."""
            self._check()
            a0, a1 = replicated_random(size0, device)
            b0, b1 = replicated_random(size1, device)
            f = getattr(torch, op)
            c = f(a0, b0 + b1, *args, **kwargs) + f(a1, b0, *args, **kwargs)
            c = c + zero_share(c.size(), device)
            return AST.from_shares(a0, precision=0), AST.from_shares(b0, precision=0), AST.from_shares(c, precision=0)

        def square(self, size, device=None):
            """(r, r^2): 0 rounds, 0 bytes."""
            self._check()
            r0, r1 = replicated_random(size, device)
            r2 = r0 * r0 + 2 * r0 * r1 + zero_share(size, device)
            return AST.from_shares(r0, precision=0), AST.from_shares(r2, precision=0)

        def generate_binary_triple(self, size0, size1, device=None):
            """XOR-shared (a, b, a & b): 0 rounds, 0 bytes."""
            self._check()
            a0, a1 = replicated_random(size0, device, binary=True)
            b0, b1 = replicated_random(size1, device, binary=True)
            c = (a0 & (b0 ^ b1)) ^ (a1 & b0)
            c = c ^ zero_share(c.size(), device, binary=True)
            return BST.from_shares(a0), BST.from_shares(b0), BST.from_shares(c)

        def wrap_rng(self, size, device=None):
            raise NotImplementedError(
                "the dealer-free 3PC provider has no wrap_rng: it serves --protocol replicated, whose truncation is "
                "CrypTen's replicated.truncate; the Beaver (arithmetic) protocol needs a dealer: use --protocol "
                "replicated (3 parties) or 2PC with --provider tfp|ttp"
            )

        def B2A_rng(self, size, device=None):
            """(rA, rB): 1 round, 8 B/element from party 1 to party 2 (see the module docstring)."""
            self._check()
            return _b2a_rng(size, device)

    return DealerFree3PC


def is_active() -> bool:
    """Whether CrypTen's current provider is this one."""
    from crypten.config import cfg

    return cfg.mpc.provider == NAME


def _patch_b2a() -> None:
    from crypten.mpc.primitives import beaver

    original = beaver.B2A_single_bit
    if getattr(original, "_mpcache_dealer_free", False):
        return

    @functools.wraps(original)
    def B2A_single_bit(xB):
        if is_active() and _comm().get_world_size() == 3:
            return b2a_single_bit(xB)
        return original(xB)

    B2A_single_bit._mpcache_dealer_free = True
    beaver.B2A_single_bit = B2A_single_bit


REPLICATED_PRODUCTS = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "square")


def _patch_replicated() -> None:
    """Every replicated product's output gets a PRZS; a truncation's input gets one before party 2 sends."""
    from crypten.mpc.primitives import replicated

    if getattr(replicated, "_mpcache_rerandomized", False):
        return
    for name in REPLICATED_PRODUCTS:
        original = getattr(replicated, name)

        @functools.wraps(original)
        def product(*args, _original=original, **kwargs):
            z = _original(*args, **kwargs)
            z.share = rerandomize(z.share)
            return z

        setattr(replicated, name, product)
    original_truncate = replicated.truncate

    @functools.wraps(original_truncate)
    def truncate(x, y):
        x.share = rerandomize(x.share)
        return original_truncate(x, y)

    replicated.truncate = truncate
    replicated._mpcache_rerandomized = True


def install() -> None:
    """Register the provider under CrypTen's name ``"R3"`` and patch CrypTen's B2A and replicated products
    (idempotent; the patches change nothing for the other providers' traffic)."""
    from crypten import mpc

    providers = mpc.__dict__["__SUPPORTED_PROVIDERS"]
    if NAME not in providers:
        providers[NAME] = provider_class()()
    _patch_b2a()
    _patch_replicated()


__all__ = ["NAME", "b2a_single_bit", "install", "is_active", "replicated_random", "rerandomize", "zero_share"]
