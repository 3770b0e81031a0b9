"""One MPC session: MPI (mpirun) -> handshake -> torch.distributed -> CrypTen, with roles, a ledger and timeouts.

Roles (design §2): rank 0 is the model owner (server), rank 1 the prompt owner and the only receiver of the
output (client), rank 2 a third compute party (3PC) — or, with ``provider="ttp"``, the last MPI rank is CrypTen's
trusted dealer, which never sees data and is not a compute party.

Unusual process handling, and why:
* mpirun starts the processes and gives us rank/size; torch's CPU build has no MPI backend, so rank 0 picks a
  free TCP port and broadcasts it over MPI as the gloo rendezvous.
* A party that dies or never arrives must not hang the others: the gloo process group gets a finite timeout
  (``timeout_s``), a closed peer makes gloo raise at once, and :func:`run_party` turns any exception into a clear
  message and ``MPI.Abort`` so that mpirun tears the job down with a non-zero exit.
* With a dealer, MPI collectives over the whole world would hang (the dealer sits in CrypTen's serve loop), so
  the compute parties use their own sub-communicator ``self.comm``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from .ledger import CostLedger, attach

PROTOCOLS = {"arithmetic": "beaver", "replicated": "replicated"}
PROVIDERS = {"tfp": "TFP", "ttp": "TTP"}
SERVER, CLIENT = 0, 1


class SessionError(RuntimeError):
    """A configuration or peer problem, with a message that says how to fix it."""


@dataclass
class Session:
    rank: int
    world_size: int            # MPI world (compute parties + dealer)
    n_parties: int             # compute parties
    protocol: str
    provider: str
    device: str
    ledger: CostLedger
    comm: object = None        # MPI communicator of the compute parties (None on the dealer)
    crypten: object = None
    digests: list = field(default_factory=list)

    @property
    def is_dealer(self) -> bool:
        return self.rank >= self.n_parties

    @property
    def role(self) -> str:
        if self.is_dealer:
            return "dealer"
        return {SERVER: "server (model owner)", CLIENT: "client (prompt owner)"}.get(self.rank, "compute party")

    def scope(self, name: str):
        return self.ledger.scope(name)

    def close(self) -> None:
        if self.crypten is not None and not self.is_dealer:
            if self.comm is not None:
                self.comm.Barrier()
            self.crypten.uninit()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def handshake_digest(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_handshake(infos: list[dict]) -> None:
    """Raise SessionError naming every field on which some party disagrees with rank 0."""
    ref = infos[0]
    bad = []
    for r, info in enumerate(infos[1:], start=1):
        for key in sorted(set(ref) | set(info)):
            if ref.get(key) != info.get(key):
                bad.append(f"  {key}: rank 0 has {str(ref.get(key))[:80]!r}, rank {r} has {str(info.get(key))[:80]!r}")
    if bad:
        raise SessionError("handshake failed: the parties disagree on the public setup:\n" + "\n".join(bad) +
                           "\nrun every party with the same model config, policy, protocol and mpcache version.")


def open_session(protocol: str = "arithmetic", provider: str = "tfp", device: str = "cpu",
                 public_info: dict | None = None, timeout_s: float = 120.0, mpi_comm=None) -> Session:
    """Create the session for this process. ``public_info`` (model config, weight shapes, policy ...) is compared
    across parties before any secret is shared."""
    from mpi4py import MPI

    world = mpi_comm or MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(1)
    if protocol not in PROTOCOLS:
        raise SessionError(f"unknown --protocol {protocol!r}: use one of {sorted(PROTOCOLS)}")
    if provider not in PROVIDERS:
        raise SessionError(f"unknown --provider {provider!r}: use one of {sorted(PROVIDERS)}")
    n_parties = size - (1 if provider == "ttp" else 0)
    if n_parties < 2:
        raise SessionError(f"{size} MPI process(es) give {n_parties} compute part{'y' if n_parties == 1 else 'ies'}; "
                           f"launch with `mpirun -n {2 + (provider == 'ttp')} python -m parties ...` "
                           f"(2 compute parties{' + 1 dealer' if provider == 'ttp' else ''}).")
    if protocol == "replicated" and n_parties != 3:
        raise SessionError(f"--protocol replicated needs exactly 3 compute parties, got {n_parties}: "
                           f"use `mpirun -n {3 + (provider == 'ttp')}`.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SessionError("--device cuda was requested but no CUDA GPU is visible; use --device cpu.")

    from .. import __version__

    info = dict(public_info or {}, protocol=protocol, provider=provider, world_size=size, mpcache=__version__)
    infos = world.allgather(info)
    check_handshake(infos)

    port = world.bcast(_free_port() if rank == 0 else None, root=0)
    # rank 0's address; scripts/netem sets it when the parties sit in separate network namespaces
    master = os.environ.get("MPCACHE_MASTER_ADDR", "127.0.0.1")
    comm = world.Split(0 if rank < n_parties else MPI.UNDEFINED, rank)
    if comm == MPI.COMM_NULL:
        comm = None

    from . import compat, lean_tfp

    crypten = compat.crypten()
    # The default process-group timeout (30 min) would turn a dead peer into a half-hour hang.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(n_parties), RENDEZVOUS=f"tcp://{master}:{port}",
                      DISTRIBUTED_BACKEND="nccl" if device.startswith("cuda") else "gloo")
    crypten.cfg.mpc.protocol = PROTOCOLS[protocol]
    crypten.cfg.mpc.provider = PROVIDERS[provider]
    ledger = CostLedger(rank, n_parties)
    sess = Session(rank, size, n_parties, protocol, provider, device, ledger, comm, crypten, infos)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if sess.is_dealer:
        return sess
    crypten.init()
    if provider == "tfp" and lean_tfp.ENABLED:
        lean_tfp.install()                     # same tuples' distribution and trust model, fewer PRG draws
    attach(ledger, comm if _mpi_exchange(device, n_parties) else None, timeout_s)
    return sess


#: openings (the bulk of the online traffic) go over MPI point-to-point instead of gloo: "auto" = on CPU when
#: every compute party can have its own core (MPICH waits by polling, which would starve a computing party on an
#: oversubscribed host, e.g. 3 parties on 2 cores) and the parties are not behind an emulated link
#: (``MPCACHE_MASTER_ADDR``, set by scripts/netem: MPI would use shared memory and bypass the shaped link);
#: True/False force it. Same bytes, same rounds, same results.
MPI_EXCHANGE = "auto"


def _mpi_exchange(device: str, n_parties: int) -> bool:
    if MPI_EXCHANGE != "auto":
        return bool(MPI_EXCHANGE)
    if os.environ.get("MPCACHE_MASTER_ADDR"):
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return not device.startswith("cuda") and n_parties <= cores


def serve_dealer(sess: Session) -> None:
    """Run CrypTen's trusted-third-party dealer loop until the compute parties shut down."""
    # CrypTen's TTPServer plus the two fixed-operand requests (a superset: stock requests behave as before).
    from .fixed_operand import serve_dealer as serve_fixed_operand_dealer

    serve_fixed_operand_dealer()


def run_party(main, *args, **kwargs) -> int:
    """Run ``main`` and turn any failure into a clear one-line message plus an MPI abort (never a hang)."""
    try:
        main(*args, **kwargs)
        return 0
    except SessionError as e:
        msg = str(e)
    except KeyboardInterrupt:
        msg = "interrupted"
    except Exception as e:  # noqa: BLE001 - the point is to report anything and abort the whole job
        peer = any(s in str(e).lower() for s in ("connection", "closed", "timed out", "timeout", "reset by peer"))
        hint = " (a peer party died or stopped responding; check its output above)" if peer else ""
        msg = f"{type(e).__name__}: {e}{hint}"
        if os.environ.get("MPCACHE_DEBUG"):
            traceback.print_exc()
    try:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
    except Exception:  # noqa: BLE001
        rank = "?"
    sys.stderr.write(f"[mpcache rank {rank}] error: {msg}\n")
    sys.stderr.flush()
    time.sleep(0.5)   # let mpirun forward the message before the abort tears the job down
    try:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(2)
    finally:
        os._exit(2)
