"""Fixed-operand Beaver triples: open ``W - B`` once, then every product ``x @ W`` opens only ``x - a``.

Stock CrypTen multiplies two shared matrices with a fresh triple ``(a, B, c = a @ B)`` and opens both ``x - a``
and ``W - B``, so each decode token re-sends every weight matrix (~1.4 GB per party per token for SmolLM2-135M).
When ``W`` is reused (weights; later cached K/V rows), its mask ``B`` can be drawn once and ``D = W - B`` opened
once and kept by every party (offline, counted under the caller's ledger scope, e.g. ``offline/weights``). Each
later product draws only a fresh mask ``a`` for the moving operand and ``c = a @ B`` from the dealer:

    x @ W = (x - a) @ D + (x - a) @ [B] + [a] @ D + [c]            (the public-public term added by party 0)
          = eps @ [W] + [a] @ D + [c]         with eps = x - a     (since D + [B] = [W], D added by party 0)

We use the second line (identical value, one local matmul fewer, and no share of ``B`` needs to be kept), then the
usual truncation by the fixed-point scale. Cost per use (2PC, 64-bit ring, ``|x|`` = elements of ``x``):

* **rounds**: 1 (the opening of ``eps``); truncation is local in 2PC (a wraps protocol with > 2 parties).
* **bytes/party**: ``|x| * 8`` sent and received — vs ``(|x| + |W|) * 8`` for the stock Beaver matmul.
* **offline, once per W**: 1 round and ``|W| * 8`` bytes/party (opening ``D``); the dealer keeps ``B``.
  ``n`` parties: multiply the bytes by ``n - 1`` (each party sends its share to every other).

Security (semi-honest, same trust model as the stock provider). ``D = W - B`` is uniform over Z_2^64 and
independent of ``W`` because ``B`` is uniform and masks ``W`` only: **never use one ``B`` with another operand**
(two openings ``W - B``, ``W' - B`` would reveal ``W - W'``). The transposed view (tied LM head, ``x @ W.T``) reuses
the same ``B`` and ``D`` transposed: it masks the *same* values, so nothing new is opened. Each ``a`` is fresh and
uniform, so ``x - a`` is uniform and independent of ``x``; ``c`` is a fresh sharing. Hence the view of a party is
simulatable exactly as in the stock protocol, which opens the same ``x - a`` and a (fresh) ``W - B`` per use.
**Leakage: shapes only.** Providers: ``TFP`` — party 0 draws ``B`` (it knows ``B``: with TFP, party 0 is trusted
for triples, as in stock CrypTen; here party 0 is also the model owner), shares it by pseudo-random zero sharing
(no traffic: the other parties' shares come from shared seeds, party 0's share is the difference), and per use
draws ``a`` and computes ``c = a @ B`` locally. ``TTP`` — every party draws its share of ``B`` (and of each ``a``,
``c``) from the seed it shares with the dealer; the dealer (:class:`FixedOperandTTPServer`) sums the shares of ``B``
once, keeps ``B`` per fixed operand, and per use sends party 0 its share of ``c = a @ B`` (dealer traffic: ``|x @ W|``
elements to party 0, as for a stock triple). ``replicated`` (3PC): products need no triples, but CrypTen keeps
shares additive at rest and its replicated matmul first sends each party's share of *both* operands to the next
party — the same share of ``W`` at every use. Here :meth:`FixedOperand.fix` replicates ``W``'s share once
(offline: ``|W|`` elements to the next party, 1 round) and each use replicates only ``x`` (``|x|`` elements), then
the stock local product ``x1 W1 + x1 W2 + x2 W1`` and the stock replicated truncation (party 2 sends ``|x @ W|``
elements to party 1). Nothing new is sent: stock re-sent an identical tensor. ``path == "fixed-replicated"``.
"""
from __future__ import annotations

import itertools

import torch

PATH_TFP = "fixed-tfp"
PATH_TTP = "fixed-ttp"
PATH_REPLICATED = "fixed-replicated"
NOTES = {
    PATH_TFP: "fixed-operand triples (TFP): W - B opened once, x - a per use",
    PATH_TTP: "fixed-operand triples (TTP dealer keeps B): W - B opened once, x - a per use",
    PATH_REPLICATED: "replicated 3PC, no triples: W's share replicated once, only x's share per use",
}
_KEYS = itertools.count()      # party 0 names each fixed operand for the TTP dealer; other parties never need it


def _comm():
    import crypten.communicator as comm

    return comm.get()


def _path() -> str:
    """Which realisation the current CrypTen setup gets (read once, when an operand is fixed)."""
    import crypten

    if crypten.cfg.mpc.protocol == "replicated":
        return PATH_REPLICATED
    name = crypten.mpc.get_default_provider().NAME
    if name == "TFP":
        return PATH_TFP
    if name == "TTP":
        return PATH_TTP
    raise NotImplementedError(f"fixed-operand triples support the TFP and TTP providers, not {name!r}")


def _rand(size, device, generator=None):
    from crypten.common.rng import generate_random_ring_element

    return generate_random_ring_element(size, generator=generator, device=device)


def _ttp():
    from crypten.mpc.provider.ttp_provider import TTPClient

    return TTPClient.get()


def _matmul_size(size0, size1) -> torch.Size:
    return torch.matmul(torch.empty(size0, device="meta"), torch.empty(size1, device="meta")).shape


class FixedOperand:
    """A shared operand ``W`` (..., K, N) with its mask opened once: ``D = W - B``.

    Holds ``w`` (this party's ``MPCTensor`` share of ``W``), ``d`` (the public ring tensor ``D``, the same on every
    party), ``b_plain`` (``B`` itself, TFP party 0 only) and ``path`` / ``note`` (which realisation runs, for
    reports); on the replicated path ``d`` is instead the previous party's share of ``W`` (its replica). Create it
    with :meth:`fix`; :meth:`t` / :meth:`transpose` give a view for ``x @ W.T`` that shares the same ``B`` and
    ``D`` (transposed).
    """

    def __init__(self, w, d, b_plain, path: str, key: int | None = None, transposed: bool = False):
        self.w, self.d, self.b_plain = w, d, b_plain
        self.path, self.key, self.transposed = path, key, transposed

    @property
    def note(self) -> str:
        return NOTES[self.path]

    @classmethod
    def fix(cls, w) -> FixedOperand:
        """Fix the shared ``w`` (an ``MPCTensor``): draw ``B``, open ``D = W - B`` (1 round, ``|W|`` elements per
        party; call inside an offline ledger scope). Every compute party must call it, in the same order."""
        path = _path()
        if path == PATH_REPLICATED:
            from crypten.mpc.primitives import replicated

            ((_, w_prev),) = replicated.replicate_shares([w.share])      # looked up now: the compat shim applies
            return cls(w, w_prev, None, path)
        comm, size, dev = _comm(), w.size(), w.device
        rank, key, b_plain = comm.get_rank(), None, None
        if path == PATH_TFP:
            from crypten.mpc.primitives import ArithmeticSharedTensor

            b_plain = _rand(size, dev) if rank == 0 else None
            b_share = ArithmeticSharedTensor(b_plain, size=size, precision=0, src=0, device=dev).share   # no traffic
        else:
            b_share = _rand(size, dev, _ttp().get_generator(device=dev))      # the dealer sums these shares into B
            if rank == 0:
                key = next(_KEYS)
                _ttp().ttp_request("fixed_register", dev, key, tuple(size))
        d = comm.all_reduce(w.share - b_share)
        return cls(w, d, b_plain, path, key)

    # ---- shape and the transposed view -------------------------------------------------------------------------
    def size(self, *dim):
        return self.w.size(*dim)

    @property
    def shape(self) -> torch.Size:
        return self.w.size()

    def dim(self) -> int:
        return self.w.dim()

    def transpose(self, dim0: int, dim1: int) -> FixedOperand:
        """View of ``W`` with its last two dims swapped (the only transposition a matmul operand needs)."""
        if {dim0 % self.dim(), dim1 % self.dim()} != {self.dim() - 2, self.dim() - 1}:
            raise ValueError("a FixedOperand can only swap its last two dims")

        def tr(v):
            return None if v is None else v.transpose(-2, -1)

        return FixedOperand(tr(self.w), tr(self.d), tr(self.b_plain), self.path, self.key, not self.transposed)

    def t(self) -> FixedOperand:
        assert self.dim() == 2, "t() is for 2-D operands; use transpose(-2, -1)"
        return self.transpose(0, 1)

    def __repr__(self):
        return f"FixedOperand(shape={tuple(self.shape)}, path={self.path!r}, transposed={self.transposed})"


def _triple(x, fixed: FixedOperand, out_size):
    """This party's shares of a fresh ``a`` (like ``x``) and of ``c = a @ B`` (like the product)."""
    rank, dev, size = _comm().get_rank(), x.device, x.size()
    if fixed.path == PATH_TFP:
        from crypten.mpc.primitives import ArithmeticSharedTensor

        a = _rand(size, dev) if rank == 0 else None
        c = torch.matmul(a, fixed.b_plain) if rank == 0 else None
        a = ArithmeticSharedTensor(a, size=size, precision=0, src=0, device=dev).share              # no traffic
        c = ArithmeticSharedTensor(c, size=out_size, precision=0, src=0, device=dev).share
        return a, c
    gen = _ttp().get_generator(device=dev)
    a = _rand(size, dev, gen)
    if rank == 0:
        c = _ttp().ttp_request("fixed_triple", dev, fixed.key, tuple(size), fixed.transposed)
    else:
        c = _rand(out_size, dev, gen)
    return a, c


def fixed_matmul(x, fixed: FixedOperand):
    """``x @ W`` for a shared ``x`` (MPCTensor, (..., M, K)) and a fixed ``W`` (..., K, N): opens only ``x - a``.

    Rounds: 1 (+ the truncation's, local in 2PC).  Bytes/party: ``|x| * 8`` (stock: ``(|x| + |W|) * 8``); with
    n > 2 additive parties ``(n-1)`` times that; replicated 3PC: ``|x| * 8`` to the next party (stock ``|x| + |W|``)
    plus the stock truncation.
    Fixed-point: exact in the ring before truncation; the local 2PC truncation adds at most 2 ulps (2 * 2^-16)
    per output, as in the stock matmul. Same encoder rules as CrypTen's matmul (a scale-1 ``x``, e.g. a one-hot,
    needs no truncation). Leaks: shapes only (see the module docstring for the argument).
    """
    from crypten.mpc.primitives import ArithmeticSharedTensor

    if not hasattr(x, "share"):
        raise TypeError(f"fixed_matmul needs a secret-shared x (MPCTensor), got {type(x).__name__}")
    if fixed.path == PATH_REPLICATED:
        from crypten.mpc.primitives import replicated

        ((x1, x2),) = replicated.replicate_shares([x.share])         # only x's share travels
        w1, w2 = fixed.w.share, fixed.d
        z = torch.matmul(x1, w1) + torch.matmul(x1, w2) + torch.matmul(x2, w1)
    else:
        a, c = _triple(x, fixed, _matmul_size(x.size(), fixed.shape))
        eps = _comm().all_reduce(x.share - a)                      # the only opening: x - a, uniform
        z = c + torch.matmul(eps, fixed.w.share) + torch.matmul(a, fixed.d)
    out = ArithmeticSharedTensor.from_shares(z)
    sx, sw = x.encoder.scale, fixed.w.encoder.scale
    out.encoder = x.encoder if sx > 1 or sw == 1 else fixed.w.encoder
    if sx > 1 and sw > 1:
        out = out.div_(sx)                                         # truncation, as in CrypTen's matmul
    res = x.shallow_copy()
    res._tensor = out
    return res


def fixed_matmul_reference(x: torch.Tensor, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The float model: the masks cancel exactly in the ring, so the result is the plain product (float64)."""
    w = w.double()
    return x.double() @ (w.transpose(-2, -1) if transpose else w)


def fixed_matmul_cost(x_shape, w_shape, n_parties: int = 2, replicated: bool = False) -> dict:
    """Analytic per-party costs (bytes sent, rounds) of one use, of the stock matmul, and of fixing ``W`` once,
    before truncation (local in 2PC; replicated 3PC truncation adds ``|x @ W|`` elements sent by party 2)."""
    nx, nw = int(torch.Size(x_shape).numel()), int(torch.Size(w_shape).numel())
    k = 8 * (n_parties - 1) if not replicated else 8
    return {"fixed_bytes": k * nx, "fixed_rounds": 1, "stock_bytes": k * (nx + nw), "stock_rounds": 1,
            "offline_bytes": k * nw, "offline_rounds": 1}


def _dealer_class():
    from crypten.mpc.provider.ttp_provider import TTPServer

    class FixedOperandTTPServer(TTPServer):
        """CrypTen's dealer plus two requests: ``fixed_register`` (sum the parties' seeded shares of ``B`` and keep
        ``B`` under party 0's key) and ``fixed_triple`` (a fresh ``a`` from the seeds, party 0's share of
        ``c = a @ B``). Everything else is the stock dealer. Memory: one ``B`` per fixed operand (|W| int64)."""

        def __init__(self):
            self.fixed_masks: dict[int, torch.Tensor] = {}
            super().__init__()                     # runs the serve loop until the parties terminate

        def fixed_register(self, key, size):
            self.fixed_masks[key] = self._get_additive_PRSS(size)
            return torch.zeros(1, dtype=torch.long, device=self.device)

        def fixed_triple(self, key, size0, transposed):
            b = self.fixed_masks[key]
            a = self._get_additive_PRSS(size0)
            c = torch.matmul(a, b.transpose(-2, -1) if transposed else b)
            return c - self._get_additive_PRSS(c.size(), remove_rank=True)

    return FixedOperandTTPServer


def serve_dealer() -> None:
    """Run the dealer (stock requests + fixed-operand ones) until the compute parties shut down."""
    _dealer_class()()
