"""Every party of a session on this host, without mpirun: ``run_parties(n, fn)`` runs ``fn(session)`` as each party.

What it is: the multi-party harness of protocol unit tests (and of quick experiments). Each compute party (and,
with ``provider="ttp"``, the dealer) is a process forked from the caller, so ``fn`` may be any callable, a closure
or a lambda (nothing is pickled on the way in). A party is built as :func:`mpcache.mpc.session.open_session`
builds one -- CrypTen through the compatibility layer, ``crypten.cfg`` protocol/provider, ``crypten.init`` over
torch.distributed (gloo on loopback, file rendezvous), the lean TFP provider, the ledger attached to CrypTen's
live communicator -- so ``fn`` runs the protocols' real code over a real transport and every byte and round is
counted by the same :class:`~mpcache.mpc.ledger.CostLedger` rules as in a measured run. What differs from
mpirun: no MPI (no handshake, ``session.comm`` is None, openings go over gloo, which the ledger counts exactly
as over MPI) and no per-party interpreter start (~3 s each under mpirun; a fork is ~50 ms).

Why processes and not CrypTen's ``init_thread``: CrypTen keeps its generators and ``cfg`` in module globals
(threads would share them) and its thread communicator is not the ``DistributedCommunicator`` the ledger counts.

Settings: 2PC ``arithmetic``/``tfp`` and ``arithmetic``/``ttp`` (a dealer process serving
:func:`mpcache.mpc.session.serve_dealer`), 3PC ``replicated``/``tfp`` -- the settings of the mpirun jobs.

Failure is loud and bounded: a party that raises (any rank), exits without a result, or is not done within
``timeout`` seconds makes :func:`run_parties` raise :class:`PartyFailure` (an ``AssertionError``, so a test fails
rather than errors) naming the rank and carrying its traceback; every other party is then killed (a peer blocked
on the failed one would otherwise wait for gloo's own timeout).
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
from typing import Any

import torch

from .config import MpcConfig
from .ledger import CostLedger
from .session import PROTOCOLS, PROVIDERS, Session


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


def _party(rank: int, cfg: MpcConfig, rendezvous: str, timeout: float, fn, conn) -> None:
    """One forked party: build the session, run ``fn``, send ("returned",) then ("ok", value, ledger) -- or
    ("error", text) -- back."""
    try:
        torch.set_num_threads(1)
        from torch.distributed import distributed_c10d

        from . import compat, lean_tfp
        from .ledger import attach

        crypten = compat.crypten()
        n = cfg.n_parties
        distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), RENDEZVOUS=rendezvous, DISTRIBUTED_BACKEND="gloo",
                          GLOO_SOCKET_IFNAME="lo")
        crypten.cfg.mpc.protocol = PROTOCOLS[cfg.protocol]
        crypten.cfg.mpc.provider = PROVIDERS[cfg.provider]
        crypten.cfg.encoder.precision_bits = cfg.precision_bits
        ledger = CostLedger(rank, n)
        sess = Session(rank=rank, world_size=n + (cfg.provider == "ttp"), n_parties=n, protocol=cfg.protocol,
                       provider=cfg.provider, device="cpu", ledger=ledger, comm=None, crypten=crypten,
                       network={"openings": "gloo", "transport": "local_parties"}, cfg=cfg)
        if sess.is_dealer:
            from .session import serve_dealer

            serve_dealer(sess)
            _send(conn, ("returned",))
            _send(conn, ("ok", None, None))
            os._exit(0)
        crypten.init()
        if cfg.provider == "tfp" and cfg.lean_tfp:
            lean_tfp.install()
        attach(ledger, None, timeout, one_exchange=cfg.one_exchange)
        value = fn(sess)
        _send(conn, ("returned",))
        import torch.distributed as dist
        from crypten import communicator as cmod

        dist.barrier(group=cmod.get().main_group)       # as Session.close: no party leaves while a peer reads
        _send(conn, ("ok", value, _ledger_copy(ledger)))
        crypten.uninit()                                # rank 0 tells the dealer (if any) to stop
    except BaseException as e:                          # noqa: BLE001 - everything goes back to the caller
        with contextlib.suppress(Exception):            # the pipe itself failed: the exit code says it
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


def run_parties(n: int, fn: Callable[[Session], Any], *, protocol: str = "arithmetic", provider: str = "tfp",
                mpc: MpcConfig | None = None, timeout: float = 120.0) -> list[PartyResult]:
    """Run ``fn(session)`` as each of ``n`` compute parties (plus a dealer if ``provider="ttp"``), each in a
    process forked from this one; return every compute party's :class:`PartyResult`, by rank.

    ``mpc``: the session's protocol knobs (default :class:`MpcConfig`'s; its protocol, provider and parties are
    replaced by the arguments), as ``session.cfg``. ``fn``'s return value comes back pickled (tensors, numbers,
    dicts). Raises :class:`PartyFailure` when any party raises or dies (the first failure, with its traceback; its
    consequences on the peers, e.g. a closed connection, are listed after it) or when not every party is done
    within ``timeout`` seconds (naming the parties still inside ``fn`` and those waiting for them)."""
    import multiprocessing as mp

    if protocol not in PROTOCOLS or provider not in PROVIDERS:
        raise ValueError(f"protocol {protocol!r} / provider {provider!r}: use one of {sorted(PROTOCOLS)} / "
                         f"{sorted(PROVIDERS)}")
    if protocol == "replicated" and n != 3:
        raise ValueError(f"the replicated protocol needs 3 compute parties, got {n}")
    cfg = dataclasses.replace(mpc or MpcConfig(), protocol=protocol, provider=provider, n_parties=n)
    _warm()
    ctx = mp.get_context("fork")
    tmp = tempfile.mkdtemp(prefix="mpcache-parties-")
    world = n + (provider == "ttp")
    procs, conns = [], {}
    try:
        for rank in range(world):
            recv_end, send_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_party, name=f"party-{rank}", daemon=True,
                            args=(rank, cfg, f"file://{tmp}/rendezvous", timeout, fn, send_end))
            p.start()
            send_end.close()
            procs.append(p)
            conns[recv_end] = rank
        return _collect(procs, conns, n, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
        for c in conns:
            c.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _collect(procs, conns: dict, n: int, timeout: float) -> list[PartyResult]:
    deadline = time.monotonic() + timeout
    returned: set[int] = set()
    results: dict[int, tuple] = {}
    errors: list[tuple[int, str]] = []
    pending = dict(conns)
    while pending:
        left = deadline - time.monotonic()
        if errors:                       # a short grace for the failure's consequences on the peers, then report
            left = min(left, 0.5)
        if left <= 0:
            break
        for c in connection.wait(list(pending), timeout=left):
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
    if errors:
        (rank, first), rest = errors[0], errors[1:]
        more = "".join(f"\n-- then party {r} {m.splitlines()[0]}" for r, m in rest)
        raise PartyFailure(f"party {rank} {first}{more}")
    if pending:
        inside = sorted(r for r in pending.values() if r not in returned)
        raise PartyFailure(f"not done within {timeout:g} s: parties {inside} still inside fn (hung?); "
                           f"returned: {sorted(returned)}, done: {sorted(results)}")
    return [PartyResult(r, results[r][0], _ledger_from(results[r][1])) for r in range(n)]
