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

import dataclasses
import datetime
import functools
import hashlib
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MpcConfig
from .ledger import CostLedger, attach

PROTOCOLS = {"arithmetic": "beaver", "replicated": "replicated"}
PROVIDERS = {"tfp": "TFP", "ttp": "TTP", "none": "R3"}  # "none": dealer-free 3PC (mpcache/mpc/dealer_free.py)
SERVER, CLIENT = 0, 1


class SessionError(RuntimeError):
    """A configuration or peer problem, with a message that says how to fix it."""


def resolve_provider(protocol: str, provider: str | None) -> str:
    """The ``--provider`` a command line means: none given -> dealer-free for ``replicated`` (3PC), the dealer
    (``ttp``: 2 compute parties + a dealer rank that sees no data) for ``arithmetic`` -- a secure configuration
    either way; TFP (party 0 makes the tuples) only when asked for. 3PC takes no dealer, so
    ``--protocol replicated --provider tfp|ttp`` is refused, as is ``--provider none`` with 2PC."""
    if provider is None:
        return "none" if protocol == "replicated" else "ttp"
    if provider not in PROVIDERS:
        raise SessionError(f"unknown --provider {provider!r}: use one of {sorted(PROVIDERS)}")
    if protocol == "replicated" and provider != "none":
        raise SessionError(
            f"--protocol replicated is dealer-free 3PC: its tuples come from the three parties' pairwise seeds, "
            f"with no dealer; drop --provider {provider} (a 2PC run with a dealer is --protocol arithmetic "
            f"--provider {provider})."
        )
    if protocol != "replicated" and provider == "none":
        raise SessionError(
            "--provider none (dealer-free) needs --protocol replicated (3 parties: `mpirun -n 3`); "
            "2PC takes --provider tfp or ttp."
        )
    return provider


@dataclass
class Session:
    rank: int
    world_size: int  # MPI world (compute parties + dealer)
    n_parties: int  # compute parties
    protocol: str
    provider: str
    device: str
    ledger: CostLedger
    comm: object = None  # MPI communicator of the compute parties (None on the dealer)
    crypten: object = None
    digests: list = field(default_factory=list)
    network: dict = field(default_factory=dict)  # where the parties met (rank 0's address as this party sees it)
    cfg: MpcConfig = field(default_factory=MpcConfig)  # every protocol knob (in the handshake)

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


def local_addresses() -> dict[str, str]:
    """This host's IPv4 address per network interface (Linux ``SIOCGIFADDR``; loopback included)."""
    import fcntl
    import struct

    out = {}
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            out[name] = socket.inet_ntoa(res[20:24])
    return out


def _bind_port(port: int) -> socket.socket:
    """A listening socket on every interface at ``port`` (0 = any free port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("0.0.0.0", port))
    except OSError as e:
        s.close()
        raise SessionError(
            f"rank 0 ({socket.gethostname()}) cannot listen on TCP port {port}: {e.strerror}; "
            f"pass a free --port, or --port 0 to let rank 0 pick one."
        ) from None
    s.listen(16)
    return s


@dataclass(frozen=True)
class Rendezvous:
    """Where this party meets rank 0 for torch.distributed: rank 0's address as THIS party reaches it, the
    rendezvous port, and the local interface gloo should bind (the one this party reaches rank 0 through)."""

    master: str
    port: int
    iface: str
    local: bool  # every compute party reached rank 0 on loopback: one host, one network namespace


def find_rendezvous(
    world,
    rank: int,
    master_addr: str | None = None,
    iface: str | None = None,
    port: int = 0,
    probe_timeout_s: float = 5.0,
) -> Rendezvous:
    """Rank 0's address as its peers reach it, found over MPI (no environment variables, no loopback default).

    Rank 0 lists its interfaces' IPv4 addresses (loopback first), listens on a probe port and broadcasts
    (candidates, probe port, rendezvous port, a random token) over MPI. Each other rank connects to the
    candidates in order and takes the first that answers with the token (a loopback answer from some other
    program on the same port never carries it); the local end of that connection names the interface its gloo
    device binds. ``master_addr`` (the ``--master-addr`` flag) replaces the candidates; ``iface`` (``--iface``)
    forces the interface on every party (it must exist on each host). ``port`` (``--port``): the rendezvous port
    (0 = a free one picked by rank 0). Every failure names the host and the fix.
    """
    import secrets
    import threading

    here = socket.gethostname()
    addrs = local_addresses()
    if iface is not None and iface not in addrs:
        raise SessionError(
            f"--iface {iface!r} is not an IPv4 interface on host {here} (rank {rank}); "
            f"its interfaces are {sorted(addrs)}: pass one of them, or leave --iface out."
        )
    if rank == 0:
        store = _bind_port(port)  # checked now (a taken port fails here, clearly), freed below
        rdv_port = store.getsockname()[1]
        probe = _bind_port(0)
        token = secrets.token_hex(16)
        cands = [master_addr] if master_addr else sorted(addrs.values(), key=lambda a: not a.startswith("127."))

        def answer():
            while True:
                try:
                    c, _ = probe.accept()
                except OSError:
                    return  # closed: every peer has found us
                with c:
                    c.sendall(token.encode())

        threading.Thread(target=answer, daemon=True).start()
        offer = {"host": here, "candidates": cands, "probe": probe.getsockname()[1], "port": rdv_port, "token": token}
    else:
        offer = None
    offer = world.bcast(offer, root=0)
    found = None
    if rank != 0:
        tried = []
        for a in offer["candidates"]:
            try:
                with socket.create_connection((a, offer["probe"]), timeout=probe_timeout_s) as c:
                    c.settimeout(probe_timeout_s)
                    got = b""
                    while len(got) < len(offer["token"]):
                        chunk = c.recv(64)
                        if not chunk:
                            break
                        got += chunk
                    if got.decode(errors="replace") == offer["token"]:
                        found = (a, c.getsockname()[0])
                        break
                    tried.append(f"{a} (another program answered)")
            except OSError as e:
                tried.append(f"{a} ({e.strerror or e})")
        if found is None:
            raise SessionError(
                f"rank {rank} on host {here} cannot reach rank 0 on host {offer['host']}: tried "
                f"{'; '.join(tried)}. Make rank 0's host reachable over TCP from {here} (firewall, "
                f"routing) or pass --master-addr with an address of {offer['host']} that {here} "
                f"reaches."
            )
    reports = world.allgather(found)
    if rank == 0:
        probe.close()
        store.close()
    peers = [r for r in reports[1:] if r is not None]
    local = all(a.startswith("127.") for a, _ in peers)
    if rank == 0:
        mine = "127.0.0.1" if local else peers[0][0]  # the address the first peer reached us at
        master = mine
    else:
        master, mine = found
    if iface is None:
        names = [n for n, a in addrs.items() if a == mine]
        iface = names[0] if names else None
        if iface is None:
            raise SessionError(f"rank {rank} on host {here}: no interface holds {mine}; pass --iface.")
    return Rendezvous(master, offer["port"], iface, local)


HINTS = {
    "mpc": "the parties were started with different protocol knobs (MpcConfig): pass the same --mpc KEY=VALUE "
    "settings (and --fixed-weights/--fixed-kv) to every party",
    "code": "the installed mpcache code differs between the parties' hosts: check out the same commit on every "
    "host (`git rev-parse HEAD`) and reinstall",
    "tokenizer": "the parties' tokenizer files differ: install the same model files on every host",
    "model": "the parties load different model configs: pass the same --model (and model files) on every host",
    "weight_shapes": "the parties' checkpoints have different shapes: use the same --model on every host",
}


@functools.cache
def code_digest() -> str:
    """A digest of this installation's source (every .py of mpcache, parties and kernels): two parties built from
    different code would agree at startup and diverge mid-protocol, so the handshake compares it."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("mpcache", "parties", "kernels"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def handshake_digest(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_handshake(infos: list[dict]) -> None:
    """Raise SessionError naming every field on which some party disagrees with rank 0."""
    ref = infos[0]
    bad, hints = [], []
    for r, info in enumerate(infos[1:], start=1):
        for key in sorted((set(ref) | set(info)) - {"host"}):
            if ref.get(key) != info.get(key):
                bad.append(
                    f"  {key}: rank 0 ({ref.get('host', '?')}) has {str(ref.get(key))[:80]!r}, "
                    f"rank {r} ({info.get('host', '?')}) has {str(info.get(key))[:80]!r}"
                )
                hint = HINTS.get("mpc" if key.startswith("mpc.") else key)
                if hint and hint not in hints:
                    hints.append(hint)
    if bad:
        raise SessionError(
            "handshake failed: the parties disagree on the public setup:\n"
            + "\n".join(bad)
            + "\n"
            + (
                "; ".join(hints)
                if hints
                else "run every party with the same model config, policy, protocol and mpcache version."
            )
        )


def open_session(
    protocol: str = "arithmetic",
    provider: str | None = None,
    device: str = "cpu",
    public_info: dict | None = None,
    timeout_s: float = 120.0,
    mpi_comm=None,
    master_addr: str | None = None,
    iface: str | None = None,
    port: int = 0,
    mpc: MpcConfig | list[str] | None = None,
) -> Session:
    """Create the session for this process. ``public_info`` (model config, weight shapes, policy ...) is compared
    across parties before any secret is shared. ``master_addr``/``iface``/``port``: see :func:`find_rendezvous`
    (default: found over MPI, so the same command runs on one host or on several from an mpirun hostfile).
    ``mpc``: the protocol knobs (an :class:`MpcConfig`, or ``--mpc KEY=VALUE`` items over the defaults); its
    protocol, provider and parties are this session's. Every field is compared in the handshake. ``provider`` None:
    :func:`resolve_provider`'s default (dealer-free for replicated, TFP for arithmetic); an explicit TFP with the
    replicated protocol stays possible here (an insecure 3PC benchmark baseline), not from the command line."""
    from mpi4py import MPI

    world = mpi_comm or MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(1)
    if protocol not in PROTOCOLS:
        raise SessionError(f"unknown --protocol {protocol!r}: use one of {sorted(PROTOCOLS)}")
    if provider is None:
        provider = resolve_provider(protocol, None)
    if provider not in PROVIDERS:
        raise SessionError(f"unknown --provider {provider!r}: use one of {sorted(PROVIDERS)}")
    if provider == "none" and protocol != "replicated":
        resolve_provider(protocol, provider)  # raises, naming the fix
    n_parties = size - (1 if provider == "ttp" else 0)
    if n_parties < 2:
        raise SessionError(
            f"{size} MPI process(es) give {n_parties} compute part{'y' if n_parties == 1 else 'ies'}; "
            f"launch with `mpirun -n {2 + (provider == 'ttp')} python -m parties ...` "
            f"(2 compute parties{' + 1 dealer' if provider == 'ttp' else ''})"
            + (
                "; or `mpirun -n 3 ... --protocol replicated` (dealer-free 3PC), or, as an insecure benchmark, "
                "`mpirun -n 2 ... --provider tfp` (party 0 makes every triple)."
                if provider == "ttp"
                else "."
            )
        )
    if protocol == "replicated" and n_parties != 3:
        raise SessionError(
            f"--protocol replicated needs exactly 3 compute parties, got {n_parties}: "
            f"use `mpirun -n {3 + (provider == 'ttp')}`."
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SessionError("--device cuda was requested but no CUDA GPU is visible; use --device cpu.")

    from .. import __version__

    base = {"protocol": protocol, "provider": provider, "n_parties": n_parties}
    try:
        cfg = dataclasses.replace(mpc, **base) if isinstance(mpc, MpcConfig) else MpcConfig.parse(mpc, **base)
    except (ValueError, TypeError) as e:
        raise SessionError(f"bad --mpc setting: {e}") from None
    info = dict(
        public_info or {},
        protocol=protocol,
        provider=provider,
        world_size=size,
        mpcache=__version__,
        code=code_digest(),
        host=socket.gethostname(),
        **{f"mpc.{k}": v for k, v in cfg.public().items()},
    )
    infos = world.allgather(info)
    check_handshake(infos)

    rdv = find_rendezvous(world, rank, master_addr, iface, port)
    comm = world.Split(0 if rank < n_parties else MPI.UNDEFINED, rank)
    if comm == MPI.COMM_NULL:
        comm = None

    from . import compat, dealer_free, lean_tfp

    crypten = compat.crypten()
    # The default process-group timeout (30 min) would turn a dead peer into a half-hour hang.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(n_parties),
        RENDEZVOUS=f"tcp://{rdv.master}:{rdv.port}",
        GLOO_SOCKET_IFNAME=rdv.iface,
        DISTRIBUTED_BACKEND="nccl" if device.startswith("cuda") else "gloo",
    )
    crypten.cfg.mpc.protocol = PROTOCOLS[protocol]
    crypten.cfg.mpc.provider = PROVIDERS[provider]
    crypten.cfg.encoder.precision_bits = cfg.precision_bits
    ledger = CostLedger(rank, n_parties)
    sess = Session(rank, size, n_parties, protocol, provider, device, ledger, comm, crypten, infos, cfg=cfg)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank % torch.cuda.device_count())
    over_mpi = _mpi_exchange(cfg.mpi_exchange, device, n_parties, rdv.local)
    sess.network = {
        "rank0_address": rdv.master,
        "port": rdv.port,
        "iface": rdv.iface,
        "hosts": [i.get("host") for i in infos],
        "openings": "MPI" if over_mpi else "gloo",
    }
    if sess.is_dealer:
        return sess
    crypten.init()
    if provider == "tfp" and cfg.lean_tfp:
        lean_tfp.install()  # same tuples' distribution and trust model, fewer PRG draws
    if provider == "ttp":
        from . import dealer

        dealer.install()  # CrypTen's TTP tuples, requested without waiting (mpcache/mpc/dealer.py)
    if provider == "none":
        dealer_free.install()  # the tuples from the parties' pairwise seeds, re-randomised replicated products
    attach(ledger, comm if over_mpi else None, timeout_s, one_exchange=cfg.one_exchange)
    return sess


def open_session_from_cli(args, public_info: dict, **knobs) -> Session:
    """:func:`open_session` from a ``parties`` command line (``--protocol``, ``--provider``, ``--device``,
    ``--timeout``, ``--master-addr``, ``--iface``, ``--port``, ``--mpc``); ``knobs``: MpcConfig fields the job sets
    from its own flags (e.g. ``fixed_weights``), given to every party alike."""
    mpc = [*args.mpc, *(f"{k}={json.dumps(v)}" for k, v in knobs.items())]
    return open_session(
        args.protocol,
        resolve_provider(args.protocol, args.provider),
        args.device,
        public_info,
        timeout_s=args.timeout,
        master_addr=args.master_addr,
        iface=args.iface,
        port=args.port,
        mpc=mpc,
    )


#: ``MpcConfig.mpi_exchange``: openings (the bulk of the online traffic) go over MPI point-to-point instead of gloo:
#: "auto" = on CPU when
#: every compute party can have its own core (MPICH waits by polling, which would starve a computing party on an
#: oversubscribed host, e.g. 3 parties on 2 cores) and the parties are not behind an emulated link
#: (every party reached rank 0 on loopback; across hosts or network namespaces, e.g. scripts/netem, MPI might
#: use shared memory and bypass the network the run is meant to cross); True/False force it. Same bytes, same
#: rounds, same results.
def _mpi_exchange(setting, device: str, n_parties: int, local: bool = True) -> bool:
    if setting != "auto":
        return bool(setting)
    if not local:
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return not device.startswith("cuda") and n_parties <= cores


def serve_dealer(sess: Session) -> None:
    """Run the pipelined dealer loop (mpcache/mpc/dealer.py: CrypTen's TTP requests plus the fixed-operand and
    gather ones) until the compute parties shut down."""
    from .dealer import serve

    serve()


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
    time.sleep(0.5)  # let mpirun forward the message before the abort tears the job down
    try:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(2)
    finally:
        os._exit(2)
