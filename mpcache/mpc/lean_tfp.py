"""A leaner trusted-first-party (TFP) tuple provider: CrypTen's trust model and share distribution, fewer draws.

CrypTen's ``TrustedFirstParty`` makes each tuple value on party 0 and shares it with ``ArithmeticSharedTensor(v,
src=0)`` (or the binary twin), i.e. by a pseudo-random zero sharing (PRZS): every party draws TWO ring tensors per
value (from the generators it shares with its ring neighbours) and party 0 adds the value. A Beaver triple thus
costs party 1 six draws of the operands' sizes and party 0 eight, plus the constructor's encoder and dispatch
work. In the 2PC demo that was the largest CPU cost of a decode token after the waits (``ArithmeticSharedTensor
.__init__``: ~1.8 s of ~10 s per token and party).

Here party ``i > 0``'s share of a tuple value is ONE draw from the generator it shares with party 0 (party 1's
``prev`` = party 0's ``next``; with 3 parties, party 2's ``next`` = party 0's ``prev``), and party 0's share is
the value minus (xor, for binary tuples) those same draws: 3 draws per triple for party 1, 5 for party 0 (a, b
and the peers' shares), no zero-sharing, and the shares are wrapped with ``from_shares`` (no encoding).

Security: the same as CrypTen's TFP. Party 0 knows every tuple (the TFP convention: a benchmark setting, not
secure against party 0, which every report says). A party ``i > 0`` sees only pseudo-random draws from a seed it
shares with party 0 — uniform and independent of the tuple values, exactly what PRZS gave it; its view of the
online protocol (the openings ``x - a`` etc.) is unchanged. No communication: bytes and rounds are identical to
CrypTen's provider (a dry run, ``mpcache/mpc/dryrun.py``, counts it like any other provider). Generators advance in lockstep: for each shared
generator, both ends draw the same sizes in the same order. World sizes other than 2 and 3, and ops other than
``mul``/``matmul``, fall back to CrypTen's code.
"""

from __future__ import annotations

import torch


def _world():
    import crypten.communicator as comm

    c = comm.get()
    return c.get_rank(), c.get_world_size()


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return torch.device(device) if isinstance(device, str) else device


def _peer_generators(rank: int, n: int, dev: torch.device) -> list:
    """Party 0: its generators shared with party 1 (``next``) and, with 3 parties, party 2 (``prev``).
    Party i > 0: the one generator it shares with party 0."""
    from crypten import generators

    if rank == 0:
        return [generators["next"][dev]] if n == 2 else [generators["next"][dev], generators["prev"][dev]]
    return [generators["prev"][dev] if rank == 1 else generators["next"][dev]]


def share_from_party0(values, size, device=None, binary: bool = False) -> torch.Tensor:
    """This party's share (a raw ring tensor) of ``values``, known to party 0 only (None elsewhere)."""
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element

    rank, n = _world()
    dev = _device(device)
    draw = generate_kbit_random_tensor if binary else generate_random_ring_element
    gens = _peer_generators(rank, n, dev)
    if rank != 0:
        return draw(torch.Size(size), generator=gens[0], device=dev)
    share = values
    for g in gens:
        r = draw(torch.Size(size), generator=g, device=dev)
        share = share ^ r if binary else share - r
    return share


def _broadcast(size0, size1) -> torch.Size:
    """torch.broadcast_shapes in plain Python (torch's goes through its reference implementation: ~0.1-1 ms)."""
    a, b = tuple(size0), tuple(size1)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {size0} and {size1} do not broadcast")
        out.append(y if x == 1 else x)
    return torch.Size(out)


def _result_size(op: str, size0, size1) -> torch.Size | None:
    if op == "mul":
        return _broadcast(size0, size1)
    if op == "matmul":
        meta = [torch.empty(torch.Size(s), device="meta") for s in (size0, size1)]
        return torch.matmul(*meta).shape
    return None


def provider_class():
    """The provider class (built lazily: CrypTen is imported after the compatibility patches)."""
    from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element
    from crypten.common.util import torch_stack
    from crypten.mpc.primitives import ArithmeticSharedTensor as AST
    from crypten.mpc.primitives import BinarySharedTensor as BST
    from crypten.mpc.provider.tfp_provider import TrustedFirstParty

    class LeanTrustedFirstParty(TrustedFirstParty):
        NAME = "TFP"

        @staticmethod
        def _supported() -> bool:
            return _world()[1] in (2, 3)

        def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
            out_size = _result_size(op, size0, size1) if not (args or kwargs) else None
            if out_size is None or not self._supported():
                return super().generate_additive_triple(size0, size1, op, device, *args, **kwargs)
            a = b = c = None
            if _world()[0] == 0:
                a = generate_random_ring_element(size0, device=device)
                b = generate_random_ring_element(size1, device=device)
                c = getattr(torch, op)(a, b)
            return tuple(
                AST.from_shares(share_from_party0(v, s, device), precision=0)
                for v, s in ((a, size0), (b, size1), (c, out_size))
            )

        def square(self, size, device=None):
            if not self._supported():
                return super().square(size, device)
            both = None
            if _world()[0] == 0:
                r = generate_random_ring_element(size, device=device)
                both = torch_stack([r, r.mul(r)])  # CrypTen's stack: CUDALongTensor-aware
            s = share_from_party0(both, (2, *torch.Size(size)), device)
            return AST.from_shares(s[0], precision=0), AST.from_shares(s[1], precision=0)

        def generate_binary_triple(self, size0, size1, device=None):
            if not self._supported():
                return super().generate_binary_triple(size0, size1, device)
            a = b = c = None
            if _world()[0] == 0:
                a = generate_kbit_random_tensor(size0, device=device)
                b = generate_kbit_random_tensor(size1, device=device)
                c = a & b
            out_size = _broadcast(size0, size1)
            return tuple(
                BST.from_shares(share_from_party0(v, s, device, binary=True))
                for v, s in ((a, size0), (b, size1), (c, out_size))
            )

        def B2A_rng(self, size, device=None):
            if not self._supported():
                return super().B2A_rng(size, device)
            r = generate_kbit_random_tensor(size, bitlength=1, device=device) if _world()[0] == 0 else None
            rA = AST.from_shares(share_from_party0(r, size, device), precision=0)
            rB = BST.from_shares(share_from_party0(r, size, device, binary=True))
            return rA, rB

    return LeanTrustedFirstParty


def install() -> None:
    """Serve CrypTen's "TFP" provider name with :class:`LeanTrustedFirstParty` (idempotent)."""
    from crypten import mpc

    providers = mpc.__dict__["__SUPPORTED_PROVIDERS"]
    if type(providers["TFP"]).__name__ != "LeanTrustedFirstParty":
        providers["TFP"] = provider_class()()
