"""Cost ledger: bytes and rounds counted at the communicator, per party, attributed to nested scopes.

CrypTen's own counters are misleading (its "rounds" counts communicator calls; its time is not a wall clock),
so we count every message where it is sent, with its real ``nbytes``:

* **bytes**: a point-to-point send/recv counts its tensor's bytes; a collective counts, per party, what the
  standard MPC realisation of it moves: ``all_reduce``/``all_gather`` = each party sends its share to every
  other party and receives theirs ((n-1) x nbytes each way); ``reduce``/``gather`` to ``dst`` = every other party
  sends nbytes, ``dst`` receives (n-1) x nbytes; ``broadcast``/``scatter`` from ``src`` = the mirror image.
* **rounds**: one sequential exchange = one round. A party spends a round whenever it must wait for a message:
  each blocking receive or collective counts one round for every party that receives in it (a batched
  collective over a list is one round); sends are free; a run of ``irecv`` calls posted together (only ``isend``
  in between, as in replicated sharing's resharing) is one round, which ends when one of them is waited on.
* **kind**: traffic on CrypTen's trusted-third-party groups is ``dealer`` (triple generation), the rest ``online``.

Scopes nest (``with ledger.scope("decode/3"), ledger.scope("L2"), ledger.scope("softmax"):``); each record
goes to the full path of the innermost scope. Wall time is recorded per scope, inclusive, beside the counts.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import time
from collections import defaultdict

import torch

FIELDS = ("bytes_sent", "bytes_recv", "rounds", "calls")


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    if torch.is_tensor(x):
        return x.nelement() * x.element_size()
    return 0


class CostLedger:
    """Per-party costs keyed by scope path and kind."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._irecv_run = False

    # ---- scopes ------------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return "/".join(self._stack) or "setup"

    @contextlib.contextmanager
    def scope(self, name: str):
        self._stack.append(name)
        path = self.path
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds[path] += time.perf_counter() - t0
            self._stack.pop()

    # ---- recording ---------------------------------------------------------------------------------------
    def record(self, sent: int = 0, recv: int = 0, rounds: int = 0, kind: str = "online") -> None:
        c = self.counts[(self.path, kind)]
        c["bytes_sent"] += int(sent)
        c["bytes_recv"] += int(recv)
        c["rounds"] += int(rounds)
        c["calls"] += 1

    def totals(self, prefix: str = "", kind: str | None = None) -> dict[str, int]:
        """Sum of counts over every scope path equal to ``prefix`` or below it."""
        out = dict.fromkeys(FIELDS, 0)
        for (path, k), c in self.counts.items():
            if kind is not None and k != kind:
                continue
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                continue
            for f in FIELDS:
                out[f] += c[f]
        return out

    def time_of(self, prefix: str) -> float:
        return self.seconds.get(prefix, 0.0)

    def snapshot(self) -> dict:
        return self.totals()

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "counts": [{"scope": p, "kind": k, **c} for (p, k), c in sorted(self.counts.items())],
            "seconds": dict(sorted(self.seconds.items())),
        }

    def write(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)


class _EndsRun:
    """A posted irecv's request: waiting on it ends the run of irecvs that share one round."""

    def __init__(self, work, ledger):
        self._work, self._ledger = work, ledger

    def wait(self, *args, **kwargs):
        self._ledger._irecv_run = False
        return self._work.wait(*args, **kwargs) if self._work is not None else None

    def is_completed(self):
        return self._work.is_completed()


#: Openings (all_reduce of shares) as one simultaneous exchange instead of gloo's all_reduce (see
#: ``CountingCommunicator._exchange_reduce``); False restores CrypTen's call.
ONE_EXCHANGE = True
EXCHANGE_TAG = 7301    # MPI tag of the openings' exchange (when the session hands the communicator an MPI comm)


def _counting_communicator_class(base):
    """A subclass of CrypTen's DistributedCommunicator whose every transfer is recorded in ``self.ledger``."""

    class CountingCommunicator(base):
        ledger: CostLedger

        def _kind(self, group) -> str:
            return "online" if group is None or group is self.main_group else "dealer"

        def _n(self, group=None) -> int:
            import torch.distributed as dist

            return dist.get_world_size(group if group is not None else self.main_group)

        def _recv_round(self, is_irecv: bool = False) -> int:
            r = 0 if (is_irecv and self.ledger._irecv_run) else 1
            self.ledger._irecv_run = is_irecv
            return r

        def send(self, tensor, dst):
            self.ledger._irecv_run = False
            self.ledger.record(sent=_nbytes(tensor))
            return super().send(tensor, dst)

        def recv(self, tensor, src=None):
            self.ledger.record(recv=_nbytes(tensor), rounds=self._recv_round())
            return super().recv(tensor, src)

        def isend(self, tensor, dst):
            self.ledger.record(sent=_nbytes(tensor))      # does not end a run of posted irecvs
            return super().isend(tensor, dst)

        def irecv(self, tensor, src=None):
            self.ledger.record(recv=_nbytes(tensor), rounds=self._recv_round(is_irecv=True))
            return _EndsRun(super().irecv(tensor, src), self.ledger)

        def all_reduce(self, input, op=None, batched=False):
            import torch.distributed as dist

            n, b = self._n(), _nbytes(input)
            self.ledger.record(sent=(n - 1) * b, recv=(n - 1) * b, rounds=self._recv_round())
            xs = input if batched else [input]
            if ONE_EXCHANGE and op in (None, dist.ReduceOp.SUM, dist.ReduceOp.BXOR) and \
                    all(x.data.device.type == "cpu" for x in xs):
                return self._exchange_reduce(xs, op == dist.ReduceOp.BXOR, batched)
            return super().all_reduce(input, batched=batched) if op is None else \
                super().all_reduce(input, op=op, batched=batched)

        def _exchange_reduce(self, xs, xor: bool, batched: bool):
            """The all-reduce of an opening as ONE exchange: every party sends its share to every other and
            receives theirs (posted together), then adds (or xors) locally — the bytes and the single round the
            ledger records. gloo's own all_reduce takes ~2 round trips for the same data (measured under
            emulated WAN, scripts/netem), so this halves the latency of every opening. Same result, bit for bit."""
            me = self.get_rank()
            peers = [j for j in range(self._n()) if j != me]
            data = [x.data.contiguous() for x in xs]
            mpi = getattr(self, "mpi_comm", None)
            # one message per peer: a batched opening (e.g. a Beaver product's x - a and y - b) is sent as one
            # flat buffer, not one isend/irecv pair per tensor (each gloo call costs ~0.1 ms of CPU here)
            one = len(data) > 1 and all(d.dtype == data[0].dtype and d.device == data[0].device for d in data)
            msgs = [torch.cat([d.reshape(-1) for d in data])] if one else data
            bufs = [[torch.empty_like(m) for _ in peers] for m in msgs]      # every element is overwritten
            if mpi is not None:                    # MPI point-to-point (shared memory on one host: ~5 us vs
                from mpi4py import MPI             # gloo's ~0.4 ms per exchange over loopback TCP)

                reqs = []
                for m, bl in zip(msgs, bufs):
                    for j, buf in zip(peers, bl):
                        reqs += [mpi.Isend(m.numpy(), dest=j, tag=EXCHANGE_TAG),
                                 mpi.Irecv(buf.numpy(), source=j, tag=EXCHANGE_TAG)]
                if not MPI.Request.Testall(reqs):  # a dead peer ends the job (mpiexec); a hung one must not
                    deadline = time.monotonic() + self.mpi_timeout
                    while not MPI.Request.Testall(reqs):
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"party {me}: no opening from parties {peers} for {self.mpi_timeout:.0f} s; a peer "
                                "died or hangs (see its output); raise --timeout if the peers are merely slow")
            else:
                reqs = []
                for m, bl in zip(msgs, bufs):
                    for j, buf in zip(peers, bl):      # CrypTen's own (uncounted) point-to-point calls
                        reqs.append(base.isend(self, m, j))
                        reqs.append(base.irecv(self, buf, j))
                for r in reqs:
                    if r is not None:
                        r.wait()
            sums = []
            for m, bl in zip(msgs, bufs):
                y = m
                for buf in bl:                     # new tensors: the caller's input is never modified
                    y = torch.bitwise_xor(y, buf) if xor else y + buf
                sums.append(y)
            if one:
                out, at = [], 0
                for d in data:
                    out.append(sums[0][at:at + d.numel()].view(d.shape))
                    at += d.numel()
            else:
                out = sums
            return out if batched else out[0]

        def reduce(self, input, dst, op=None, batched=False):
            n, b = self._n(), _nbytes(input)
            me = self.get_rank() == dst
            self.ledger.record(sent=0 if me else b, recv=(n - 1) * b if me else 0, rounds=self._recv_round() if me else 0)
            return super().reduce(input, dst, batched=batched) if op is None else \
                super().reduce(input, dst, op=op, batched=batched)

        def gather(self, tensor, dst):
            n, b = self._n(), _nbytes(tensor)
            me = self.get_rank() == dst
            self.ledger.record(sent=0 if me else b, recv=(n - 1) * b if me else 0, rounds=self._recv_round() if me else 0)
            return super().gather(tensor, dst)

        def all_gather(self, tensor):
            n, b = self._n(), _nbytes(tensor)
            self.ledger.record(sent=(n - 1) * b, recv=(n - 1) * b, rounds=self._recv_round())
            return super().all_gather(tensor)

        def broadcast(self, input, src, group=None, batched=False):
            n, b = self._n(group), _nbytes(input)
            me = self.get_rank() == src
            self.ledger._irecv_run = False
            self.ledger.record(sent=(n - 1) * b if me else 0, recv=0 if me else b, rounds=0 if me else 1,
                               kind=self._kind(group))
            return super().broadcast(input, src, group=group, batched=batched)

        def scatter(self, scatter_list, src, size=None, device=None):
            me = self.get_rank() == src
            b = _nbytes(scatter_list[0]) if scatter_list else 0
            if not me and size is not None:
                b = int(torch.Size(size).numel()) * 8
            self.ledger._irecv_run = False
            self.ledger.record(sent=(self._n() - 1) * b if me else 0, recv=0 if me else b, rounds=0 if me else 1)
            return super().scatter(scatter_list, src, size=size, device=device)

        def send_obj(self, obj, dst, group=None):
            self.ledger._irecv_run = False
            self.ledger.record(sent=len(pickle.dumps(obj)) + 4, kind=self._kind(group))
            return super().send_obj(obj, dst, group=group)

        def recv_obj(self, src, group=None):
            obj = super().recv_obj(src, group=group)
            self.ledger._irecv_run = False
            self.ledger.record(recv=len(pickle.dumps(obj)) + 4, rounds=1, kind=self._kind(group))
            return obj

        def broadcast_obj(self, obj, src, group=None):
            me = self.get_rank() == src
            out = super().broadcast_obj(obj, src, group=group)
            b = len(pickle.dumps(out)) + 4
            self.ledger._irecv_run = False
            self.ledger.record(sent=(self._n(group) - 1) * b if me else 0, recv=0 if me else b,
                               rounds=0 if me else 1, kind=self._kind(group))
            return out

    return CountingCommunicator


def attach(ledger: CostLedger, mpi_comm=None, mpi_timeout: float = 120.0):
    """Make CrypTen's live communicator count into ``ledger``.

    NOTE: CrypTen keeps its communicator as a singleton created inside ``crypten.init``; we re-class that one
    instance to a subclass with explicit overrides (rather than wrapping methods one by one) so every transfer,
    including those CrypTen's own providers make, passes through the counting methods.
    """
    from crypten import communicator as comm

    inst = comm.get()
    base = type(inst)
    if not hasattr(base, "ledger"):
        inst.__class__ = _counting_communicator_class(base)
    inst.ledger = ledger
    inst.mpi_comm = mpi_comm      # the compute parties' MPI communicator (same ranks), or None: gloo
    inst.mpi_timeout = mpi_timeout  # seconds an MPI exchange may wait for a peer (gloo has its own timeout)
    return inst
