"""Costs by running the protocols themselves: each party's real code on shape-only shares, counted by the ledger.

A protocol's cost model is the protocol. To predict what a private run costs, every compute party's code is run
in this one process, party after party, on CrypTen shares whose tensors live on torch's ``meta`` device (shapes
and dtypes, no data, no arithmetic), over a :class:`DryCommunicator` that moves nothing: a receive hands back an
empty buffer of the right shape, a collective returns its input. The counting communicator of a real session
(:mod:`mpcache.mpc.ledger`) is layered on top unchanged, so every message is counted by the same code, with the
same rules, as in a measured run: bytes, rounds, kind (online / dealer), per scope. With ``provider="ttp"`` party 0
runs the pipelined dealer client's own code (:mod:`mpcache.mpc.dealer`: the same pickled requests, counted by the
same ledger call) and each request is answered by the dealer's own handlers on ``meta`` (:func:`_dry_dealer`), whose
answer shape must equal the one party 0 allocated for it (a dry run checks the dealer's shapes too).

Why this is exact: every size that crosses the wire is a public function of public shapes (the project's rule,
tested by running two secret inputs through the same code and comparing ledgers). A dry run follows the same code
path as a real one; the only values it cannot know are revealed ones, and the only revealed value the code
branches on is a generated token, which the dry backend reveals as token 0 (a public-size opening: same bytes).

What a dry party is: a :class:`DrySession` (rank, parties, ledger, scopes, ``device="meta"``) that the real job
code takes in place of a :class:`mpcache.mpc.session.Session`. Use :func:`dry_parties` to run a function once per
party and collect the ledgers; :func:`predict_generation` does it for a whole private generation.

Leakage: none (nothing secret exists here).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from .config import MpcConfig
from .ledger import CostLedger, _counting_communicator_class
from .schedules import Setting

META = torch.device("meta")


class _Done:
    """A completed request (isend/irecv of a dry party)."""

    def wait(self, *args, **kwargs):
        return None

    def is_completed(self) -> bool:
        return True


def _dry_communicator_class():
    from crypten.communicator.distributed_communicator import DistributedCommunicator

    class DryCommunicator(DistributedCommunicator):
        """One party's communicator that moves nothing (see the module docstring)."""

        instance = None

        def __init__(self, rank: int, n: int, dealer=None):
            self.rank, self.world_size = rank, n
            self.main_group, self.ttp_group, self.ttp_comm_group = "main", "ttp", "ttp-comm"
            self.ttp_initialized = dealer is not None
            self._name = f"rank{rank}"
            self.dealer = dealer  # the dealer's request handlers (TTP), or None

        @classmethod
        def is_initialized(cls) -> bool:
            return cls.instance is not None

        @classmethod
        def get(cls):
            return cls.instance

        def get_rank(self) -> int:
            return self.rank

        def get_world_size(self) -> int:
            return self.world_size

        def get_ttp_rank(self) -> int:
            return self.world_size

        def _n(self, group=None) -> int:  # overrides the counting class's torch.distributed lookup
            return {None: self.world_size, "main": self.world_size, "ttp": self.world_size + 1, "ttp-comm": 2}[group]

        def send(self, tensor, dst):
            return None

        def recv(self, tensor, src=None):
            return tensor

        def isend(self, tensor, dst):
            return _Done()

        def irecv(self, tensor, src=None):
            return _Done()

        def all_reduce(self, input, op=None, batched=False):
            return [x.clone() for x in input] if batched else input.clone()

        def reduce(self, input, dst, op=None, batched=False):
            return [x.clone() for x in input] if batched else input.clone()

        def gather(self, tensor, dst):
            return [tensor.clone() for _ in range(self.world_size)]

        def all_gather(self, tensor):
            return [tensor.clone() for _ in range(self.world_size)]

        def broadcast(self, input, src, group=None, batched=False):
            return input

        def scatter(self, scatter_list, src, size=None, device=None):
            if scatter_list:
                return scatter_list[self.rank].clone()
            return torch.empty(size, dtype=torch.long, device=device if device is not None else META)

        def send_obj(self, obj, dst, group=None):
            return None  # (TTP requests go through the dealer client, mpcache.mpc.dealer: see _ttp_client)

        def recv_obj(self, src, group=None):
            raise RuntimeError("dry run: a party waits for an object nobody sent")

        def broadcast_obj(self, obj, src, group=None):
            return obj

    return DryCommunicator


def _dry_dealer(n: int = 2):
    """The dealer's request handlers (:func:`mpcache.mpc.dealer.handlers_class`: CrypTen's TTPServer + the
    fixed-operand and gather requests) without its serve loop, drawing shape-only ``meta`` tensors: answers of the
    right size, no data."""
    from .dealer import handlers_class

    class DryDealer(handlers_class()):
        def _get_additive_PRSS(self, size, remove_rank=False):
            return torch.empty(torch.Size(size), dtype=torch.long, device=META)

        def _get_binary_PRSS(self, size, bitlength=None, remove_rank=None):
            return torch.empty(torch.Size(size), dtype=torch.long, device=META)

    server = DryDealer(device=META)
    server.generators = [torch.Generator() for _ in range(n)]
    server.generators_cuda = [None] * n
    return server


def _elementwise_table() -> dict:
    """Binary elementwise torch functions whose result on ``meta`` is just a broadcast shape and a promoted dtype
    (torch's own meta path for them runs Python reference decompositions: ~0.3 ms a call, most of a dry run)."""
    T = torch.Tensor
    out = {}
    for name in ("add", "sub", "mul", "and", "or", "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge"):
        for attr in (f"__{name}__", f"__r{name}__", name, f"bitwise_{name}"):
            if hasattr(T, attr):
                out[getattr(T, attr)] = "out"
        for attr in (f"__i{name}__", f"{name}_", f"bitwise_{name}_"):
            if hasattr(T, attr):
                out[getattr(T, attr)] = "inplace"
    for fn in (
        torch.add,
        torch.sub,
        torch.mul,
        torch.bitwise_and,
        torch.bitwise_or,
        torch.bitwise_xor,
        torch.bitwise_left_shift,
        torch.bitwise_right_shift,
    ):
        out[fn] = "out"
    return out


def _meta_pair(args) -> bool:
    a, b = args
    if not isinstance(a, torch.Tensor) or a.device.type != "meta":
        return False
    return (isinstance(b, torch.Tensor) and b.device.type == "meta") or isinstance(b, (int, bool))


_ELEMENTWISE = _elementwise_table()


class _OnMeta(torch.overrides.TorchFunctionMode):
    """Public tensors (RoPE tables, masks, encoded constants: made on the CPU) meet shape-only shares: any torch
    call with a ``meta`` tensor among its arguments gets its CPU tensors moved to ``meta`` (shapes kept)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fast = _ELEMENTWISE.get(func)
        if fast is not None and not kwargs and len(args) == 2 and _meta_pair(args):
            a, b = args
            if fast == "inplace":
                return a
            shape = torch.broadcast_shapes(a.shape, b.shape if isinstance(b, torch.Tensor) else ())
            return torch.empty(shape, dtype=torch.result_type(a, b), device=META)
        flat = [*args, *kwargs.values()]
        flat += [t for a in flat if isinstance(a, (list, tuple)) for t in a]
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in flat):

            def move(a):
                if isinstance(a, torch.Tensor) and a.device.type == "cpu":
                    return a.to(META)
                if isinstance(a, (list, tuple)):
                    return type(a)(move(t) for t in a)
                return a

            args, kwargs = move(args), {k: move(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _DryMPI:
    """What the job code asks of the compute parties' MPI communicator, in a dry run: public values only."""

    def __init__(self, public: dict):
        self.public = public

    def bcast(self, obj, root=0):
        return obj if obj is not None else self.public["bcast"]

    def Barrier(self):
        return None


@dataclass
class DrySession:
    """A compute party of a dry run: what the job code reads of a :class:`mpcache.mpc.session.Session`."""

    rank: int
    setting: Setting
    ledger: CostLedger
    comm: _DryMPI = field(default_factory=lambda: _DryMPI({}))
    device: str = "meta"
    is_dealer: bool = False
    cfg: MpcConfig | None = None

    def __post_init__(self):
        s = self.setting
        if self.cfg is None:
            self.cfg = MpcConfig(protocol=s.protocol, provider=s.provider, n_parties=s.n)

    @property
    def n_parties(self) -> int:
        return self.setting.n

    @property
    def world_size(self) -> int:
        return self.setting.n + (self.setting.provider == "ttp")

    @property
    def protocol(self) -> str:
        return self.setting.protocol

    @property
    def provider(self) -> str:
        return self.setting.provider

    def scope(self, name: str):
        return self.ledger.scope(name)


@functools.cache
def _counting_dry_class():
    from . import compat

    compat.crypten()
    dry = _dry_communicator_class()
    counting = _counting_communicator_class(dry)
    # the counting layer asks torch.distributed for a group's size; a dry party answers itself
    return type("DryCountingCommunicator", (counting,), {"_n": dry._n})


@contextlib.contextmanager
def dry_party(rank: int, setting: Setting | MpcConfig, ledger: CostLedger | None = None, public: dict | None = None):
    """Within this context CrypTen runs as compute party ``rank`` of ``setting`` (or of an :class:`MpcConfig`, to
    cost its knobs) on a dry communicator counting into ``ledger`` (a new one if None); yields the
    :class:`DrySession`. The running session's communicator,
    protocol and provider (if any) are restored on exit, so a live party can dry-run a protocol (the schedule
    search does)."""
    from . import compat
    from .session import PROTOCOLS, PROVIDERS

    crypten = compat.crypten()
    knobs = setting if isinstance(setting, MpcConfig) else None
    setting = knobs.setting if knobs is not None else setting
    from crypten import communicator as cmod
    from crypten.config import cfg

    ledger = ledger if ledger is not None else CostLedger(rank, setting.n)
    cls = _counting_dry_class()
    inst = cls(rank, setting.n, _dry_dealer(setting.n) if setting.provider == "ttp" else None)
    inst.ledger, inst.mpi_comm, inst.mpi_timeout = ledger, None, 1.0
    saved = (cmod.DistributedCommunicator, cls.instance, cfg.mpc.protocol, cfg.mpc.provider)
    cls.instance = inst
    cmod.DistributedCommunicator = cls
    cfg.mpc.protocol, cfg.mpc.provider = PROTOCOLS[setting.protocol], PROVIDERS[setting.provider]
    for key in crypten.generators:
        crypten.generators[key].setdefault(META, torch.Generator())
        crypten.generators[key].setdefault(torch.device("cpu"), torch.Generator())
    if setting.provider == "none":
        from . import dealer_free

        dealer_free.install()  # the provider name "R3" and its B2A exchange (what a live party installs)
    ttp = _ttp_client(inst) if setting.provider == "ttp" else contextlib.nullcontext()
    try:
        with ttp, _OnMeta():
            yield DrySession(rank, setting, ledger, _DryMPI(public or {}), cfg=knobs)
    finally:
        cmod.DistributedCommunicator, cls.instance, cfg.mpc.protocol, cfg.mpc.provider = saved


@contextlib.contextmanager
def _ttp_client(inst):
    """This party's dealer client (:class:`mpcache.mpc.dealer.DealerClient`: party 0 posts the requests) over the
    dry communicator: the same request code and ledger records; each request is answered at once by the dry
    dealer's handlers (shapes checked against party 0's allocation), and nothing is ever pending."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    from . import dealer

    dealer.register()  # the provider a live TTP party runs (idempotent; no link in a dry run)

    class DryDealerClient(dealer.DealerClient):
        def _post(self, payload, func, args, kwargs, out, needed=True):
            if payload[:1] == dealer.POOL_FRAME:  # a pooled batch: party 0 sized its answer itself
                return
            handlers = inst.dealer
            handlers.device = META
            _, _, pargs, pkwargs = dealer.decode(payload)  # what the live dealer would unpickle
            ans = getattr(handlers, func)(*pargs, **pkwargs)
            got, want = (None if ans is None else tuple(ans.shape)), (None if out is None else tuple(out.shape))
            if got != want:
                raise AssertionError(f"dry run: dealer request {func} answers {got}, party 0 expects {want}")

    key = "_TTPClient__instance"
    saved = getattr(TTPClient, key)
    client = object.__new__(TTPClient._TTPClient__TTPClient)
    client.ttp_group, client.comm_group = inst.ttp_group, inst.ttp_comm_group
    client.generator, client.generator_cuda = torch.Generator(), None  # the seed it shares with the dealer
    setattr(TTPClient, key, client)
    inst.dealer_client = DryDealerClient(inst, client)
    inst.dealer_settle = None  # nothing is ever pending
    try:
        yield client
    finally:
        setattr(TTPClient, key, saved)


def dry_parties(fn, setting: Setting | MpcConfig, public: dict | None = None) -> list[dict]:
    """Run ``fn(session)`` once as each compute party of ``setting``; returns their ledgers (``to_dict()``)."""
    out = []
    for rank in range(setting.n_parties if isinstance(setting, MpcConfig) else setting.n):
        with dry_party(rank, setting, public=public) as sess:
            fn(sess)
        out.append(sess.ledger.to_dict())
    return out


def dry_share(shape, precision: int | None = None):
    """A shape-only arithmetic share (to run a protocol on inside :func:`dry_party`)."""
    from crypten.mpc import MPCTensor

    return MPCTensor.from_shares(
        torch.empty(tuple(int(s) for s in shape), dtype=torch.long, device=META), precision=precision
    )


def predict_generation(
    cfg,
    policy=None,
    setting: Setting | MpcConfig | None = None,
    n_prompt: int = 16,
    n_new: int = 2,
    fixed_weights: bool | None = None,
    fixed_kv: bool | None = None,
    keep_logits: bool = False,
) -> tuple[list[dict], list]:
    """The ledgers (one dict per compute party, as ``CostLedger.to_dict()``) of a private greedy generation of
    ``n_new`` tokens after an ``n_prompt``-token prompt: :func:`mpcache.generation.private_generate` itself, run dry
    as every party (no weights, no prompt, no communication). Returns (ledgers, each party's backend)."""
    from ..generation import private_generate

    setting = setting or Setting()
    backends = []

    def run(sess):
        _, _, B = private_generate(
            sess,
            cfg,
            None,
            None,
            n_new,
            policy,
            keep_logits=keep_logits,
            fixed_weights=fixed_weights,
            fixed_kv=fixed_kv,
        )
        backends.append(B)

    return dry_parties(run, setting, public={"bcast": n_prompt}), backends


__all__ = ["DrySession", "Setting", "dry_parties", "dry_party", "dry_share", "predict_generation"]
