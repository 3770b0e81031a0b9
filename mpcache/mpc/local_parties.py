"""Every party of a session on this host, without mpirun: ``run_parties(n, fn)`` runs ``fn(session)`` as each party.

Why one file: the forked parties, their pipe transport and their failure handling are one harness.

What it is: the multi-party harness of protocol unit tests (and of quick experiments). Each compute party (and,
with ``provider="ttp"``, the dealer) is a process forked from the caller. A party is built as
:func:`mpcache.mpc.session.open_session` builds one -- CrypTen through the compatibility layer, ``crypten.cfg``
protocol/provider/precision from the :class:`~mpcache.mpc.config.MpcConfig`, ``crypten.init`` over
torch.distributed (gloo on loopback, file rendezvous), the lean TFP provider, the ledger attached to CrypTen's
live communicator -- so ``fn`` runs the protocols' real code over a real transport and every byte and round is
counted by the same :class:`~mpcache.mpc.ledger.CostLedger` rules as in a measured run. What differs from
mpirun: no MPI (no handshake, ``session.comm`` is None), point-to-point messages (openings, resharing) over OS
pipes between the forked parties instead of MPI's shared memory (:class:`_Pipes`; ``p2p="gloo"`` keeps CrypTen's
gloo pairs; the ledger counts above the transport, so the counts are the same), and no interpreter start per
party (~3 s under mpirun; a fork is ~50 ms).

Two ways to run:

* :func:`run_parties` forks the parties for one call: ``fn`` may be any callable, a closure or a lambda (the
  forks inherit it; nothing is pickled on the way in).
* :class:`Parties` keeps them running between calls (``parties.run(fn, *args)``): one ``crypten.init`` for many
  calls, and each party's first-use work (schedule searches, coefficient fits: cached per process) is done once,
  as in one mpirun job. ``fn`` and ``args`` are pickled to the parties after the first call, so ``fn`` must be a
  module-level function (or a ``functools.partial`` of one). Each call gets a fresh ledger.

Why processes and not CrypTen's ``init_thread``: CrypTen keeps its generators and ``cfg`` in module globals
(threads would share them) and its thread communicator is not the ``DistributedCommunicator`` the ledger counts.

Settings: 2PC ``arithmetic``/``tfp`` and ``arithmetic``/``ttp`` (a dealer process serving
:func:`mpcache.mpc.session.serve_dealer`), 3PC ``replicated``/``none`` (dealer-free, the default for replicated) --
the settings of the mpirun jobs -- and 3PC ``replicated``/``tfp`` (an insecure baseline, only if asked for).

Failure is loud and bounded: a party that raises (any rank), exits (the dealer included), or is not done within
``timeout`` seconds makes the call raise :class:`PartyFailure` (an ``AssertionError``, so a test fails rather than
errors) naming the rank and carrying its traceback; every party is then killed (a peer blocked on the failed one
would otherwise wait for gloo's own timeout) and a :class:`Parties` starts afresh on its next call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pickle
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection
from typing import Any, Self

import torch

from .config import MpcConfig
from .ledger import CostLedger
from .session import PROTOCOLS, PROVIDERS, Session, resolve_provider


class PartyFailure(AssertionError):
    """A party raised, died or hung; the message names it and carries its traceback."""


@dataclass
class PartyResult:
    """What one compute party's ``fn`` returned, and its ledger (every transfer it made, per scope)."""

    rank: int
    value: Any
    ledger: CostLedger


def _ledger_copy(led: CostLedger) -> dict:
    return {"rank": led.rank, "world_size": led.world_size, "counts": dict(led.counts), "seconds": dict(led.seconds)}


def _ledger_from(d: dict) -> CostLedger:
    led = CostLedger(d["rank"], d["world_size"])
    led.counts.update(d["counts"])
    led.seconds.update(d["seconds"])
    return led


def _send(conn, msg) -> None:
    """Plain pickle (tensors by value): torch's multiprocessing pickler would pass a tensor's storage as a file
    descriptor that the receiver fetches from the sender, which has exited by then."""
    conn.send_bytes(pickle.dumps(msg))


class _Request:
    """A posted send or receive of :class:`_Pipes`; waiting on it drives every pending transfer of the party."""

    def __init__(self, pipes: _Pipes):
        self.pipes, self.done = pipes, False

    def wait(self, *args, **kwargs) -> None:
        while not self.done:
            self.pipes.progress(block=True)

    def is_completed(self) -> bool:
        if not self.done:
            self.pipes.progress(block=False)
        return self.done


class _Pipes:
    """This party's point-to-point transport: one OS pipe per ordered pair of compute parties (made before the
    fork), non-blocking, 1 MiB buffers. Messages are raw bytes in order per pair (a receive names its size, as a
    gloo receive does). A send completes when posted, like a buffered send: while the pipe is full it reads what
    the peers have sent meanwhile into per-peer stashes, so two parties sending to each other never block each
    other, and a send nobody waits on cannot stall its receiver. A receive completes when waited on (from the
    stash first, then the pipe). Why not gloo's TCP pairs: a message there crosses gloo's own thread and the
    loopback TCP stack (~1 ms of CPU per opening and party); MPI's shared memory, what mpirun runs use, is not
    available to forked parties."""

    def __init__(self, reads: dict[int, int], writes: dict[int, int]):
        import fcntl
        import io

        self.rfile = {j: io.FileIO(fd, "rb", closefd=True) for j, fd in reads.items()}
        self.wfile = {j: io.FileIO(fd, "wb", closefd=True) for j, fd in writes.items()}
        for fd in (*reads.values(), *writes.values()):
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ: most messages fit in one write
        self.stash = {j: bytearray() for j in reads}  # bytes read ahead of any posted receive, in order
        self.recvs: dict[int, list] = {j: [] for j in reads}  # per peer, in order: [view, offset, request, ...]

    @staticmethod
    def _view(t: torch.Tensor) -> memoryview:
        return memoryview(t.numpy()).cast("B")

    def _read_ahead(self) -> None:
        """Move whatever the peers have written into the stashes (a pipe that stays full would block them)."""
        for j, f in self.rfile.items():
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    if chunk is not None:
                        raise ConnectionError(f"party {j} closed its pipe (it died or left)")
                    break
                self.stash[j] += chunk

    def post_send(self, dst: int, tensor: torch.Tensor) -> _Request:
        import select

        view, off = self._view(tensor.data.contiguous()), 0
        while off < len(view):
            n = self.wfile[dst].write(view[off:])
            if n:
                off += n
                continue
            poller = select.poll()  # full: wait until it drains, reading meanwhile
            poller.register(self.wfile[dst].fileno(), select.POLLOUT)
            for f in self.rfile.values():
                poller.register(f.fileno(), select.POLLIN)
            poller.poll(1000)
            self._read_ahead()
        req = _Request(self)
        req.done = True
        return req

    def post_recv(self, src: int | None, tensor: torch.Tensor) -> _Request:
        if src is None:
            raise NotImplementedError("local_parties: a receive from any party (src=None)")
        target = tensor.data
        buf = target if target.is_contiguous() else torch.empty_like(target, memory_format=torch.contiguous_format)
        req = _Request(self)
        self.recvs[src].append([self._view(buf), 0, req, buf, target])
        return req

    def progress(self, block: bool) -> None:
        """Move the posted receives along; with ``block``, first wait (poll) until some peer has written."""
        import select

        if block and not any(q and self.stash[j] for j, q in self.recvs.items()):
            poller = select.poll()
            for j, q in self.recvs.items():
                if q:
                    poller.register(self.rfile[j].fileno(), select.POLLIN)
            poller.poll(1000)
        for j, q in self.recvs.items():
            while q:
                view, off, req, buf, target = q[0]
                st = self.stash[j]
                if st and off < len(view):  # read-ahead bytes come first
                    k = min(len(st), len(view) - off)
                    view[off : off + k] = st[:k]
                    del st[:k]
                    off += k
                if off < len(view) and not st:
                    n = self.rfile[j].readinto(view[off:])
                    if n == 0:
                        raise ConnectionError(f"party {j} closed its pipe (it died or left)")
                    off += n or 0
                q[0][1] = off
                if off < len(view):
                    break
                if buf is not target:
                    target.copy_(buf)
                req.done = True
                q.pop(0)


def _pipes_class(base):
    """CrypTen's communicator with its point-to-point calls over :class:`_Pipes` (collectives stay on gloo)."""

    class PipeCommunicator(base):
        pipes: _Pipes

        def isend(self, tensor, dst):
            return self.pipes.post_send(dst, tensor)

        def irecv(self, tensor, src=None):
            return self.pipes.post_recv(src, tensor)

        def send(self, tensor, dst):
            self.pipes.post_send(dst, tensor).wait()

        def recv(self, tensor, src=None):
            result = tensor.clone()
            self.pipes.post_recv(src, result).wait()
            return result

    return PipeCommunicator


def _session(rank: int, cfg: MpcConfig, rendezvous: str, timeout: float) -> Session:
    """This process as party ``rank``: CrypTen configured and initialised as :func:`open_session` does it."""
    torch.set_num_threads(1)
    from torch.distributed import distributed_c10d

    from . import compat

    crypten = compat.crypten()
    n = cfg.n_parties
    distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(n), RENDEZVOUS=rendezvous, DISTRIBUTED_BACKEND="gloo", GLOO_SOCKET_IFNAME="lo"
    )
    crypten.cfg.mpc.protocol = PROTOCOLS[cfg.protocol]
    crypten.cfg.mpc.provider = PROVIDERS[cfg.provider]
    crypten.cfg.encoder.precision_bits = cfg.precision_bits
    return Session(
        rank=rank,
        world_size=n + (cfg.provider == "ttp"),
        n_parties=n,
        protocol=cfg.protocol,
        provider=cfg.provider,
        device="cpu",
        ledger=CostLedger(rank, n),
        comm=None,
        crypten=crypten,
        network={"openings": "gloo", "transport": "local_parties"},
        cfg=cfg,
    )


def _party(rank: int, cfg: MpcConfig, rendezvous: str, timeout: float, conn, first, pipes) -> None:
    """One forked party. The dealer serves until party 0 stops it. A compute party runs ``first`` (fn, args), then
    each task it receives, until "stop"; per task it sends ("returned",) when fn returns, then, once every party
    has returned (a barrier), ("ok", value, ledger) -- or ("error", text) and exits."""
    try:
        for (a, b), (r, w) in pipes.items():  # keep this party's ends of the point-to-point pipes (a
            if a != rank:  # writes to b): a dead peer's pipe then reads as closed
                os.close(w)
            if b != rank:
                os.close(r)
        sess = _session(rank, cfg, rendezvous, timeout)
        if sess.is_dealer:
            from .session import serve_dealer

            serve_dealer(sess)
            os._exit(0)
        import torch.distributed as dist
        from crypten import communicator as cmod

        from . import dealer_free, lean_tfp
        from .ledger import attach

        sess.crypten.init()
        if pipes:
            mine = _Pipes(
                {a: r for (a, b), (r, _) in pipes.items() if b == rank},
                {b: w for (a, b), (_, w) in pipes.items() if a == rank},
            )
            inst = cmod.get()
            inst.__class__ = _pipes_class(type(inst))
            inst.pipes = mine
        if cfg.provider == "tfp" and cfg.lean_tfp:
            lean_tfp.install()
        if cfg.provider == "ttp":
            from . import dealer

            dealer.install()  # the pipelined TTP provider, as open_session installs it
        if cfg.provider == "none":
            dealer_free.install()
        live = attach(sess.ledger, None, timeout, one_exchange=cfg.one_exchange)  # once: it re-classes CrypTen's
        task = first  # communicator each time
        while True:
            if task is None:
                task = pickle.loads(conn.recv_bytes())
            if task == "stop":
                break
            fn, args = task
            sess.ledger = live.ledger = CostLedger(rank, cfg.n_parties)  # a fresh ledger per call
            value = fn(sess, *args)
            _send(conn, ("returned",))
            dist.barrier(group=cmod.get().main_group)  # as Session.close: no party leaves while a peer reads
            _send(conn, ("ok", value, _ledger_copy(sess.ledger)))
            task = None
        sess.crypten.uninit()  # party 0 tells the dealer (if any) to stop
    except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
        with contextlib.suppress(Exception):  # the pipe itself failed: the exit code says it
            _send(conn, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))
        conn.close()
        os._exit(1)
    conn.close()
    os._exit(0)


def _warm() -> None:
    """What every party would otherwise load again after each fork: CrypTen (through the compatibility layer),
    and the lazy imports behind ``torch.broadcast_shapes`` (torch._refs -> sympy: ~3 s), which the schedule
    search calls on first use."""
    from . import compat

    compat.crypten()
    torch.broadcast_shapes((1,), (1,))


class Parties:
    """``n`` compute parties (plus a dealer with ``provider="ttp"``) of one session, forked from this process on
    the first :meth:`run` and kept until :meth:`close` (or a failure). ``provider`` None: dealer-free ("none") for
    the replicated protocol, "tfp" for arithmetic (:func:`~mpcache.mpc.session.resolve_provider`). ``mpc``: the
    session's protocol knobs
    (default :class:`MpcConfig`'s; protocol, provider and parties are replaced by the arguments), as
    ``session.cfg``. ``timeout``: the default bound of each call, in seconds. ``p2p``: the point-to-point
    transport (openings, resharing): "pipes" (:class:`_Pipes`) or "gloo" (CrypTen's own); collectives, the
    dealer's traffic and the setup always go over gloo. Both carry the same messages: same results, same ledger."""

    def __init__(
        self,
        n: int,
        *,
        protocol: str = "arithmetic",
        provider: str | None = None,
        mpc: MpcConfig | None = None,
        timeout: float = 120.0,
        p2p: str = "pipes",
    ):
        if provider is None and protocol in PROTOCOLS:
            provider = resolve_provider(protocol, None)
        if protocol not in PROTOCOLS or provider not in PROVIDERS:
            raise ValueError(
                f"protocol {protocol!r} / provider {provider!r}: use one of {sorted(PROTOCOLS)} / {sorted(PROVIDERS)}"
            )
        if protocol == "replicated" and n != 3:
            raise ValueError(f"the replicated protocol needs 3 compute parties, got {n}")
        if p2p not in ("pipes", "gloo"):
            raise ValueError(f"p2p {p2p!r}: use 'pipes' or 'gloo'")
        self.n, self.timeout, self.p2p = n, timeout, p2p
        self.cfg = dataclasses.replace(mpc or MpcConfig(), protocol=protocol, provider=provider, n_parties=n)
        self._procs: list = []
        self._conns: list = []
        self._tmp: str | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return bool(self._procs)

    def run(self, fn: Callable[..., Any], *args, timeout: float | None = None) -> list[PartyResult]:
        """``fn(session, *args)`` in every compute party; each party's :class:`PartyResult`, by rank. Raises
        :class:`PartyFailure` when a party raises or dies, or not every party is done within ``timeout`` s."""
        timeout = self.timeout if timeout is None else timeout
        if not self.running:
            self._start((fn, args))
        else:
            try:
                task = pickle.dumps((fn, args))
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                raise TypeError(
                    f"Parties.run: {fn!r} and its arguments go to running parties by pickle: pass a "
                    f"module-level function (or a functools.partial of one), or use run_parties for a "
                    f"closure ({e})"
                ) from None
            for c in self._conns[: self.n]:
                c.send_bytes(task)
        try:
            return _collect(self._procs, self._conns, self.n, timeout)
        except BaseException:
            self.close(kill=True)
            raise

    def _start(self, first) -> None:
        import multiprocessing as mp

        _warm()
        ctx = mp.get_context("fork")
        self._tmp = tempfile.mkdtemp(prefix="mpcache-parties-")
        pipes = (
            {(a, b): os.pipe() for a in range(self.n) for b in range(self.n) if a != b} if self.p2p == "pipes" else {}
        )
        try:
            for rank in range(self.n + (self.cfg.provider == "ttp")):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(
                    target=_party,
                    name=f"party-{rank}",
                    daemon=True,
                    args=(rank, self.cfg, f"file://{self._tmp}/rendezvous", self.timeout, theirs, first, pipes),
                )
                p.start()
                theirs.close()
                self._procs.append(p)
                self._conns.append(mine)
        finally:
            for r, w in pipes.values():
                os.close(r)
                os.close(w)

    def close(self, kill: bool = False) -> None:
        """Stop the parties (each leaves CrypTen; party 0 stops the dealer); ``kill``: at once."""
        if not kill:
            for c in self._conns[: self.n]:
                with contextlib.suppress(OSError):
                    c.send_bytes(pickle.dumps("stop"))
            deadline = time.monotonic() + 10
            for p in self._procs:
                p.join(max(deadline - time.monotonic(), 0))
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        for c in self._conns:
            c.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._procs, self._conns, self._tmp = [], [], None


def run_parties(
    n: int,
    fn: Callable[[Session], Any],
    *,
    protocol: str = "arithmetic",
    provider: str | None = None,
    mpc: MpcConfig | None = None,
    timeout: float = 120.0,
    p2p: str = "pipes",
) -> list[PartyResult]:
    """Run ``fn(session)`` as each of ``n`` compute parties (plus a dealer if ``provider="ttp"``), each in a
    process forked from this one for this call (``fn`` may be a closure); return every compute party's
    :class:`PartyResult`, by rank.

    ``mpc``, ``p2p``: see :class:`Parties`. ``fn``'s return value comes back pickled
    (tensors, numbers, dicts). Raises :class:`PartyFailure` when any party raises or dies (the first failure, with
    its traceback; its consequences on the peers, e.g. a closed connection, are listed after it) or when not every
    party is done within ``timeout`` seconds (naming the parties still inside ``fn`` and those waiting for them)."""
    with Parties(n, protocol=protocol, provider=provider, mpc=mpc, timeout=timeout, p2p=p2p) as parties:
        return parties.run(fn, timeout=timeout)


_CONSEQUENCES = ("connection reset", "connection closed", "closed its pipe", "broken pipe", "timed out")


def _collect(procs, conns, n: int, timeout: float) -> list[PartyResult]:
    """Wait for every compute party's result of one call (watching the dealer, if any, for an early exit)."""
    deadline = time.monotonic() + timeout
    returned: set[int] = set()
    results: dict[int, tuple] = {}
    errors: list[tuple[int, str]] = []
    pending = {c: r for r, c in enumerate(conns[:n])}
    dealer = {p.sentinel: r for r, p in enumerate(procs[n:], start=n)}
    while pending:
        left = deadline - time.monotonic()
        if errors:  # a short grace for the failure's consequences on the peers, then report
            left = min(left, 0.5)
        if left <= 0:
            break
        for c in connection.wait([*pending, *dealer], timeout=left):
            if c in dealer:
                rank = dealer.pop(c)
                errors.append((rank, f"(the dealer) exited (code {procs[rank].exitcode}) during the call"))
                continue
            rank = pending[c]
            try:
                msg = pickle.loads(c.recv_bytes())
            except EOFError:
                del pending[c]
                procs[rank].join(1)
                errors.append((rank, f"exited (code {procs[rank].exitcode}) without a result"))
                continue
            if msg[0] == "returned":
                returned.add(rank)
                continue
            del pending[c]
            if msg[0] == "error":
                errors.append((rank, f"raised {msg[1]}"))
            else:
                results[rank] = msg[1:]
    if errors:  # the cause first: a peer's broken connection is a consequence
        errors.sort(key=lambda e: any(k in e[1].split("\n")[0].lower() for k in _CONSEQUENCES))
        (rank, first), rest = errors[0], errors[1:]
        more = "".join(f"\n-- then party {r} {m.splitlines()[0]}" for r, m in rest)
        raise PartyFailure(f"party {rank} {first}{more}")
    if pending:
        inside = sorted(r for r in pending.values() if r not in returned)
        raise PartyFailure(
            f"not done within {timeout:g} s: parties {inside} still inside fn (hung?); "
            f"returned: {sorted(returned)}, done: {sorted(results)}"
        )
    return [PartyResult(r, results[r][0], _ledger_from(results[r][1])) for r in range(n)]
