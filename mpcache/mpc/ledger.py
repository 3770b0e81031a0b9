"""Cost ledger: bytes and rounds counted at the communicator, per party, attributed to nested scopes.

Why one file (~520 lines): the ledger, the counting communicator that feeds it (every transfer, the openings'
one exchange and the dealer's pipelined traffic) and the per-round profile read from it are one accounting; split,
each part would import the others' private counters.

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
  With the pipelined dealer (:mod:`mpcache.mpc.dealer`, ``--provider ttp``) party 0 records each tuple request as
  ``dealer`` bytes sent (pickle + 4-byte size header) and its answer as ``dealer`` bytes received (8 per element),
  in the scope that draws the tuple, with **no round**: the request is a non-blocking send posted when the tuple is
  drawn, the answer a receive posted at the same moment, and party 0 waits for it only after the next opening's
  exchange (:meth:`CountingCommunicator._after_exchange`), which every tuple's answer waits for anyway (a tuple's
  c is used only after the opening it masks). The dealer's round trip overlaps that opening: it is off the
  critical path, so it adds no sequential exchange (its CPU time, where the dealer shares a core, is in the
  measured seconds; waiting for a late answer is profiled as ``wait``).

Scopes nest (``with ledger.scope("decode/3"), ledger.scope("L2"), ledger.scope("softmax"):``); each record
goes to the full path of the innermost scope. Wall time is recorded per scope, inclusive, beside the counts.

**Per-round profile** (issue 18): each scope's wall seconds are split, inclusively like the seconds, into

* ``wait``: blocked on the peer -- the MPI ``Testall`` loop or gloo ``wait`` of an opening's exchange, and every
  other transfer the communicator passes on to CrypTen (send/recv, broadcast, gather, ...: all blocking);
* ``copy``: serialisation and copies of an opening's exchange -- ``contiguous``/``cat`` of the shares, the
  receive buffers (``empty_like``), numpy views and posting the non-blocking send/receive, the local add/xor of
  the received shares and the views of the result;
* ``compute``: the rest (scope wall time minus the two): the protocol's local work.

The cost is a few ``perf_counter`` calls per transfer (two running totals, read again when a scope closes).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from collections import defaultdict

import torch

_clock = time.perf_counter
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
        self.wait_seconds: dict[str, float] = defaultdict(float)  # inclusive, like seconds
        self.copy_seconds: dict[str, float] = defaultdict(float)
        self._wait = 0.0  # running totals since the ledger was made (scopes keep their differences)
        self._copy = 0.0
        self._stack: list[str] = []
        self._irecv_run = False

    def clear(self) -> None:
        """Forget every count and time so far (the next prompt of ``parties generate --prompts``); the scope stack
        and the running wait/copy totals go on."""
        for d in (self.counts, self.seconds, self.wait_seconds, self.copy_seconds):
            d.clear()

    # ---- scopes ------------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return "/".join(self._stack) or "setup"

    @contextlib.contextmanager
    def scope(self, name: str):
        self._stack.append(name)
        path = self.path
        w0, c0 = self._wait, self._copy
        t0 = _clock()
        try:
            yield self
        finally:
            self.seconds[path] += _clock() - t0
            self.wait_seconds[path] += self._wait - w0
            self.copy_seconds[path] += self._copy - c0
            self._stack.pop()

    def profile_of(self, path: str) -> dict[str, float]:
        """Scope ``path``'s inclusive wall seconds split into compute / wait / copy (see the module docstring)."""
        return _split(self.seconds.get(path, 0.0), self.wait_seconds.get(path, 0.0), self.copy_seconds.get(path, 0.0))

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
            # the per-round profile (inclusive, like seconds): seconds = compute + wait + copy per scope
            "wait_seconds": {p: self.wait_seconds.get(p, 0.0) for p in sorted(self.seconds)},
            "copy_seconds": {p: self.copy_seconds.get(p, 0.0) for p in sorted(self.seconds)},
            "compute_seconds": {p: self.profile_of(p)["compute"] for p in sorted(self.seconds)},
        }

    def write(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)


def _split(wall: float, wait: float, copy: float) -> dict[str, float]:
    # wait and copy are measured inside the scope's interval on the same clock, so compute >= 0 up to rounding
    return {"wall": wall, "compute": max(wall - wait - copy, 0.0), "wait": wait, "copy": copy}


class _EndsRun:
    """A posted irecv's request: waiting on it ends the run of irecvs that share one round."""

    def __init__(self, work, ledger, after=None):
        self._work, self._ledger, self._after = work, ledger, after

    def wait(self, *args, **kwargs):
        self._ledger._irecv_run = False
        if self._work is None:
            return None
        t0 = _clock()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._ledger._wait += _clock() - t0
            if self._after is not None:
                self._after()

    def is_completed(self):
        return self._work.is_completed()


EXCHANGE_TAG = 7301  # MPI tag of the openings' exchange (when the session hands the communicator an MPI comm)
#: an MPI exchange polls (MPICH's progress engine needs it); on a host with fewer cores than processes (2PC + the
#: dealer on 2 cores) a party that has polled this long for its peer yields its core between polls
#: (``sched_yield``), so the dealer, computing the answers party 0 waits for, is not starved by a spinning party.
#: Measured on 2 shared cores (SmolLM2 decode, 3 runs each): yielding 3.6-4.0 s/token, napping (``sleep``) between
#: polls 4.3-7.8 s (the nap's wake-up latency lands on every round).
MPI_SPIN_S = 50e-6


def _counting_communicator_class(base):
    """A subclass of CrypTen's DistributedCommunicator whose every transfer is recorded in ``self.ledger``."""

    class CountingCommunicator(base):
        counting = True
        ledger: CostLedger
        one_exchange: bool = True
        mpi_nap: bool = False
        dealer_settle = None  # the pipelined dealer client's completion (mpcache.mpc.dealer), if any

        def _kind(self, group) -> str:
            return "online" if group is None or group is self.main_group else "dealer"

        def _after_exchange(self, final: bool = False):
            """After every exchange of the compute parties: complete the pending dealer answers (their tuples'
            openings have happened or are this one; see the module docstring). Time spent: ``wait``. ``final``:
            the session's end (before CrypTen's "terminate" to the dealer): also end the dealer link."""
            settle = self.dealer_settle
            if settle is not None:
                t0 = _clock()
                try:
                    settle(final=True) if final else settle()
                finally:
                    self.ledger._wait += _clock() - t0

        def dealer_traffic(self, sent: int = 0, recv: int = 0):
            """One pipelined dealer request (``sent``) and its answer (``recv``): dealer bytes, no round."""
            self.ledger.record(sent=sent, recv=recv, kind="dealer")

        def _n(self, group=None) -> int:
            import torch.distributed as dist

            return dist.get_world_size(group if group is not None else self.main_group)

        def _blocked(self, fn, *args, **kwargs):
            """A transfer handed to CrypTen's communicator: its whole time counts as waiting for the peer."""
            t0 = _clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ledger._wait += _clock() - t0

        def _recv_round(self, is_irecv: bool = False) -> int:
            r = 0 if (is_irecv and self.ledger._irecv_run) else 1
            self.ledger._irecv_run = is_irecv
            return r

        def send(self, tensor, dst):
            self.ledger._irecv_run = False
            self.ledger.record(sent=_nbytes(tensor))
            return self._blocked(super().send, tensor, dst)

        def recv(self, tensor, src=None):
            self.ledger.record(recv=_nbytes(tensor), rounds=self._recv_round())
            out = self._blocked(super().recv, tensor, src)
            self._after_exchange()
            return out

        def isend(self, tensor, dst):
            self.ledger.record(sent=_nbytes(tensor))  # does not end a run of posted irecvs
            return self._blocked(super().isend, tensor, dst)

        def irecv(self, tensor, src=None):
            self.ledger.record(recv=_nbytes(tensor), rounds=self._recv_round(is_irecv=True))
            return _EndsRun(self._blocked(super().irecv, tensor, src), self.ledger, self._after_exchange)

        def all_reduce(self, input, op=None, batched=False):
            import torch.distributed as dist

            from .lockstep import current_branch

            branch = current_branch()
            if branch is not None:  # a lockstep branch: parked, sent with the others' (merged_all_reduce)
                return branch.park((input, op, batched))
            n, b = self._n(), _nbytes(input)
            self.ledger.record(sent=(n - 1) * b, recv=(n - 1) * b, rounds=self._recv_round())
            xs = input if batched else [input]
            if (
                self.one_exchange
                and op in (None, dist.ReduceOp.SUM, dist.ReduceOp.BXOR)
                and all(x.data.device.type == "cpu" for x in xs)
            ):
                out = self._exchange_reduce(xs, op == dist.ReduceOp.BXOR, batched)
            else:
                out = (
                    self._blocked(super().all_reduce, input, batched=batched)
                    if op is None
                    else self._blocked(super().all_reduce, input, op=op, batched=batched)
                )
            self._after_exchange()
            return out

        def merged_all_reduce(self, requests):
            """The parked openings of lockstep branches (``(input, op, batched)`` each, as ``all_reduce`` takes
            them) as ONE exchange: one round in the ledger, the bytes of all; sums and xors side by side in one
            message per peer (:mod:`mpcache.mpc.lockstep`). Returns each request's result."""
            import torch.distributed as dist

            xs, xor, spans = [], [], []
            for input, op, batched in requests:
                part = list(input) if batched else [input]
                spans.append((len(xs), len(part), batched))
                xs += part
                xor += [op == dist.ReduceOp.BXOR] * len(part)
            n, b = self._n(), sum(_nbytes(x) for x in xs)
            self.ledger.record(sent=(n - 1) * b, recv=(n - 1) * b, rounds=self._recv_round())
            if (
                self.one_exchange
                and all(op in (None, dist.ReduceOp.SUM, dist.ReduceOp.BXOR) for _, op, _ in requests)
                and all(x.data.device.type == "cpu" for x in xs)
            ):
                outs = self._exchange_reduce(xs, xor, True)
            else:  # a dry run (meta tensors), CUDA or gloo's all-reduce: one call each (counted as above)
                outs = []
                for input, op, batched in requests:
                    kw = {} if op is None else {"op": op}
                    r = self._blocked(super().all_reduce, input, batched=batched, **kw)
                    outs += list(r) if batched else [r]
            self._after_exchange()
            return [outs[at : at + k] if batched else outs[at] for at, k, batched in spans]

        def _exchange_reduce(self, xs, xor, batched: bool):
            """The all-reduce of an opening as ONE exchange: every party sends its share to every other and
            receives theirs (posted together), then adds (or xors) locally — the bytes and the single round the
            ledger records. gloo's own all_reduce takes ~2 round trips for the same data (measured under
            emulated WAN, scripts/netem), so this halves the latency of every opening. Same result, bit for bit.
            ``xor``: one flag for all, or one per tensor (a merged exchange of sums and xors)."""
            led = self.ledger
            t0 = _clock()  # profile: copies until the transfers are posted ...
            me = self.get_rank()
            peers = [j for j in range(self._n()) if j != me]
            data = [x.data.contiguous() for x in xs]
            mpi = getattr(self, "mpi_comm", None)
            # one message per peer: a batched opening (e.g. a Beaver product's x - a and y - b) is sent as one
            # flat buffer, not one isend/irecv pair per tensor (each gloo call costs ~0.1 ms of CPU here)
            one = len(data) > 1 and all(d.dtype == data[0].dtype and d.device == data[0].device for d in data)
            msgs = [torch.cat([d.reshape(-1) for d in data])] if one else data
            bufs = [[torch.empty_like(m) for _ in peers] for m in msgs]  # every element is overwritten
            if mpi is not None:  # MPI point-to-point (shared memory on one host: ~5 us vs gloo's ~0.4 ms per
                from mpi4py import MPI  # exchange over loopback TCP)

                reqs = []
                for m, bl in zip(msgs, bufs):
                    for j, buf in zip(peers, bl):
                        reqs += [
                            mpi.Isend(m.numpy(), dest=j, tag=EXCHANGE_TAG),
                            mpi.Irecv(buf.numpy(), source=j, tag=EXCHANGE_TAG),
                        ]
                t1 = _clock()  # ... waiting for the peer while the requests are open ...
                if not MPI.Request.Testall(reqs):  # a dead peer ends the job (mpiexec); a hung one must not
                    # with a dealer, party 0 may wait on it (up to mpi_timeout) while a peer, ahead, waits on party
                    # 0's opening: the peer waits longer, so the party that knows the cause (the dealer) reports
                    limit = self.mpi_timeout * (1.5 if getattr(self, "ttp_initialized", False) else 1.0)
                    deadline = time.monotonic() + limit
                    nap_after = t1 + MPI_SPIN_S if self.mpi_nap else None
                    while not MPI.Request.Testall(reqs):
                        if nap_after is not None and _clock() > nap_after:
                            os.sched_yield()  # the dealer (if runnable here) computes meanwhile (MPI_SPIN_S)
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"party {me}: no opening from parties {peers} for {limit:.0f} s; a peer "
                                "died or hangs (see its output); raise --timeout if the peers are merely slow"
                            )
            else:
                reqs = []
                for m, bl in zip(msgs, bufs):
                    for j, buf in zip(peers, bl):  # CrypTen's own (uncounted) point-to-point calls
                        reqs.append(base.isend(self, m, j))
                        reqs.append(base.irecv(self, buf, j))
                t1 = _clock()
                for r in reqs:
                    if r is not None:
                        r.wait()
            t2 = _clock()  # ... then the local add/xor and the result's views: copies
            flags = list(xor) if isinstance(xor, (list, tuple)) else [xor] * len(data)

            def combine(y, bl, x):  # new tensors: the caller's input is never modified
                for buf in bl:
                    y = torch.bitwise_xor(y, buf) if x else y + buf
                return y

            if not one:
                out = [combine(m, bl, x) for m, bl, x in zip(msgs, bufs, flags)]
            elif all(x == flags[0] for x in flags):
                flat, out, at = combine(msgs[0], bufs[0], flags[0]), [], 0
                for d in data:
                    out.append(flat[at : at + d.numel()].view(d.shape))
                    at += d.numel()
            else:
                out, at = [], 0
                for d, x in zip(data, flags):
                    k = d.numel()
                    out.append(combine(msgs[0][at : at + k], [bl[at : at + k] for bl in bufs[0]], x).view(d.shape))
                    at += k
            led._wait += t2 - t1
            led._copy += (t1 - t0) + (_clock() - t2)
            return out if batched else out[0]

        def reduce(self, input, dst, op=None, batched=False):
            n, b = self._n(), _nbytes(input)
            me = self.get_rank() == dst
            self.ledger.record(
                sent=0 if me else b, recv=(n - 1) * b if me else 0, rounds=self._recv_round() if me else 0
            )
            out = (
                self._blocked(super().reduce, input, dst, batched=batched)
                if op is None
                else self._blocked(super().reduce, input, dst, op=op, batched=batched)
            )
            self._after_exchange()
            return out

        def gather(self, tensor, dst):
            n, b = self._n(), _nbytes(tensor)
            me = self.get_rank() == dst
            self.ledger.record(
                sent=0 if me else b, recv=(n - 1) * b if me else 0, rounds=self._recv_round() if me else 0
            )
            out = self._blocked(super().gather, tensor, dst)
            self._after_exchange()
            return out

        def all_gather(self, tensor):
            n, b = self._n(), _nbytes(tensor)
            self.ledger.record(sent=(n - 1) * b, recv=(n - 1) * b, rounds=self._recv_round())
            out = self._blocked(super().all_gather, tensor)
            self._after_exchange()
            return out

        def broadcast(self, input, src, group=None, batched=False):
            n, b = self._n(group), _nbytes(input)
            me = self.get_rank() == src
            self.ledger._irecv_run = False
            self.ledger.record(
                sent=(n - 1) * b if me else 0, recv=0 if me else b, rounds=0 if me else 1, kind=self._kind(group)
            )
            out = self._blocked(super().broadcast, input, src, group=group, batched=batched)
            self._after_exchange()
            return out

        def scatter(self, scatter_list, src, size=None, device=None):
            me = self.get_rank() == src
            b = _nbytes(scatter_list[0]) if scatter_list else 0
            if not me and size is not None:
                b = int(torch.Size(size).numel()) * 8
            self.ledger._irecv_run = False
            self.ledger.record(sent=(self._n() - 1) * b if me else 0, recv=0 if me else b, rounds=0 if me else 1)
            out = self._blocked(super().scatter, scatter_list, src, size=size, device=device)
            self._after_exchange()
            return out

        def send_obj(self, obj, dst, group=None):
            if self._kind(group) == "dealer":  # CrypTen's "terminate": every pending answer first, then the link ends
                self._after_exchange(final=isinstance(obj, str) and obj == "terminate")
            self.ledger._irecv_run = False
            self.ledger.record(sent=len(pickle.dumps(obj)) + 4, kind=self._kind(group))
            return self._blocked(super().send_obj, obj, dst, group=group)

        def recv_obj(self, src, group=None):
            obj = self._blocked(super().recv_obj, src, group=group)
            self.ledger._irecv_run = False
            self.ledger.record(recv=len(pickle.dumps(obj)) + 4, rounds=1, kind=self._kind(group))
            return obj

        def broadcast_obj(self, obj, src, group=None):
            me = self.get_rank() == src
            out = self._blocked(super().broadcast_obj, obj, src, group=group)
            b = len(pickle.dumps(out)) + 4
            self.ledger._irecv_run = False
            self.ledger.record(
                sent=(self._n(group) - 1) * b if me else 0,
                recv=0 if me else b,
                rounds=0 if me else 1,
                kind=self._kind(group),
            )
            return out

    return CountingCommunicator


ATTACH_HOOKS: list = []  # callables run on the communicator by every attach (empty unless an audit is on)


def _oversubscribed(inst) -> bool:
    """Fewer cores on this host than processes in the job (the compute parties and the dealer, if any)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return cores < inst.get_world_size() + (1 if getattr(inst, "ttp_initialized", False) else 0)


def attach(ledger: CostLedger, mpi_comm=None, mpi_timeout: float = 120.0, one_exchange: bool = True):
    """Make CrypTen's live communicator count into ``ledger``.

    NOTE: CrypTen keeps its communicator as a singleton created inside ``crypten.init``; we re-class that one
    instance to a subclass with explicit overrides (rather than wrapping methods one by one) so every transfer,
    including those CrypTen's own providers make, passes through the counting methods.
    """
    from crypten import communicator as comm

    inst = comm.get()
    base = type(inst)
    if not getattr(base, "counting", False):  # re-class once: a second counting layer would count twice
        inst.__class__ = _counting_communicator_class(base)
    inst.ledger = ledger
    inst.mpi_comm = mpi_comm  # the compute parties' MPI communicator (same ranks), or None: gloo
    inst.one_exchange = one_exchange  # MpcConfig.one_exchange: an opening's all-reduce as one exchange
    inst.mpi_timeout = mpi_timeout  # seconds an MPI exchange may wait for a peer (gloo has its own timeout)
    inst.mpi_nap = _oversubscribed(inst)  # a long MPI wait yields the core between polls (MPI_SPIN_S)
    for hook in ATTACH_HOOKS:  # e.g. the reveal audit (mpcache/mpc/audit.py) recording what this party receives
        hook(inst)
    return inst


# ---- the per-round profile of a decode token, per op (parties generate --profile, experiments/breakdown.py) ----
PROFILE_COLUMNS = ("op", "wall s", "compute s", "wait s", "copy s", "rounds", "ms/round")


def _op_of(rel: str) -> str:
    """A scope path below ``token/<t>/`` as an op name over layers: ``L2/mlp/silu`` -> ``mlp/silu``."""
    parts = [p for p in rel.split("/") if not (p[:1] == "L" and p[1:].isdigit())]
    return "/".join(parts)


def decode_profile(ledger: dict, tokens: list[int] | None = None, depth: int = 2, base: str = "") -> list[dict]:
    """Per op of a decode token (scopes ``{base}/token/<t>/...`` with the block ``L<i>`` dropped, so an op sums
    over layers; ops ``depth`` levels deep at most), the mean over ``tokens`` (default: every token but 0, which
    comes from the prefill) of wall / compute / wait / copy seconds and rounds of one party's ``to_dict()``.
    The first row, ``token``, is the whole token; ``(token itself)`` is what no op scope covers."""
    pre = f"{base}/token/" if base else "token/"
    secs = ledger.get("seconds", {})
    waits, copies = ledger.get("wait_seconds", {}), ledger.get("copy_seconds", {})
    found = sorted(
        {int(p[len(pre) :].split("/")[0]) for p in secs if p.startswith(pre) and p[len(pre) :].split("/")[0].isdigit()}
    )
    toks = [t for t in (tokens if tokens is not None else [t for t in found if t > 0]) if t in found]
    if not toks:
        return []
    acc: dict[str, dict[str, float]] = {}

    def add(op, wall=0.0, wait=0.0, copy=0.0, rounds=0):
        a = acc.setdefault(op, {"wall": 0.0, "wait": 0.0, "copy": 0.0, "rounds": 0.0})
        a["wall"] += wall / len(toks)
        a["wait"] += wait / len(toks)
        a["copy"] += copy / len(toks)
        a["rounds"] += rounds / len(toks)

    for t in toks:
        tp = f"{pre}{t}"
        for p, s in secs.items():
            if p == tp:
                add("token", s, waits.get(p, 0.0), copies.get(p, 0.0))
            elif p.startswith(tp + "/"):
                rel = p[len(tp) + 1 :]
                op = _op_of(rel)
                # an op is counted at the scope that names it (the L<i> scopes themselves are skipped)
                if op and op.count("/") < depth and op.split("/")[-1] == rel.split("/")[-1]:
                    add(op, s, waits.get(p, 0.0), copies.get(p, 0.0))
        for c in ledger.get("counts", []):
            p = c["scope"]
            if p == tp or p.startswith(tp + "/"):
                add("token", rounds=c["rounds"])
                rel = p[len(tp) + 1 :] if p != tp else ""
                op = _op_of(rel)
                for d in range(1, depth + 1):  # rounds go to every enclosing op (inclusive)
                    head = "/".join(op.split("/")[:d]) if op else ""
                    if head and head.count("/") == d - 1:
                        add(head, rounds=c["rounds"])
    tops = [op for op in acc if op != "token" and "/" not in op]
    rest = {k: max(acc["token"][k] - sum(acc[o][k] for o in tops), 0.0) for k in ("wall", "wait", "copy", "rounds")}
    rest["rounds"] = round(rest["rounds"], 6)  # a mean over tokens: float rounding, not a round
    order = ["token"]
    for op in sorted(tops, key=lambda o: -acc[o]["wall"]):
        order.append(op)
        order += sorted((o for o in acc if o.startswith(op + "/")), key=lambda o: -acc[o]["wall"])
    rows = []
    for op, a in [(o, acc[o]) for o in order] + [("(token itself)", rest)]:
        sp = _split(a["wall"], a["wait"], a["copy"])
        rows.append(
            {
                "op": op,
                "wall_s": sp["wall"],
                "compute_s": sp["compute"],
                "wait_s": sp["wait"],
                "copy_s": sp["copy"],
                "rounds": a["rounds"],
                "ms_per_round": 1e3 * sp["wall"] / a["rounds"] if a["rounds"] else float("nan"),
            }
        )
    return rows


def format_profile(rows: list[dict]) -> str:
    """``decode_profile`` rows as a fixed-width table (children of an op indented)."""
    lines = [f"{PROFILE_COLUMNS[0]:<24}" + "".join(f"{c:>11}" for c in PROFILE_COLUMNS[1:])]
    for r in rows:
        name = ("  " * r["op"].count("/")) + r["op"].rsplit("/", 1)[-1] if r["op"] != "(token itself)" else r["op"]
        mspr = f"{r['ms_per_round']:11.2f}" if r["rounds"] else f"{'-':>11}"
        lines.append(
            f"{name:<24}{r['wall_s']:11.3f}{r['compute_s']:11.3f}{r['wait_s']:11.3f}{r['copy_s']:11.3f}"
            f"{r['rounds']:11.0f}{mspr}"
        )
    return "\n".join(lines)
