"""The 2PC dealer (``--provider ttp``), pipelined: party 0's tuple requests never wait for the dealer's answers.

Why one file (~830 lines): the request format, party 0's client, the provider that uses it, the link both ends
speak and the dealer's handlers and loop are one protocol (each end must read what the other writes); split, every
part would import the others.

CrypTen's TTP provider makes party 0 do a blocking round trip with the dealer for every tuple (``send_obj``,
``recv_obj`` of the answer's size, a ``broadcast`` of its share of c): three messages and two sequential waits per
tuple, ~3x the online rounds of the TFP benchmark mode. Here (same trust model, same shares, same dealer math):

* **party 0** (:class:`DealerClient`) draws its shares of a tuple (a, b, ...) from the seed it shares with the
  dealer, then at once writes the request -- op name, sizes, fixed-operand spec: public values only, checked by
  :func:`public` -- to its link with the dealer without waiting (what the socket does not take yet is kept and
  written later), and registers an empty tensor of the answer's size (which it computes itself) as the *pending*
  share of c (r^2, rA, ...) it hands back. It waits for nothing.
* **the dealer** (:func:`serve`) reads requests in order (asleep in ``select`` between them), computes each answer
  as the stock dealer does (CrypTen's ``TTPServer`` handlers, plus the fixed-operand and three-operand gather
  requests) and queues it for writing: it never waits for party 0 to read, so any number of requests may be
  outstanding (no deadlock: neither end ever blocks on a write).
* **the link**: a TCP stream between party 0 and the dealer, opened at session start (party 0 listens and sends
  its port and a random token over CrypTen's ttp group; the dealer connects to rank 0's rendezvous address).
  Requests are length-prefixed frames, answers raw int64 elements. Why not gloo point-to-point on the ttp group
  (what CrypTen uses): posting a gloo receive cost ~0.1 ms here, two per request on the dealer and one per answer
  on party 0 (~0.7 s per SmolLM2 decode token, ~3,000 tuples), against ~5 us for a socket read or write.
* **party 1** draws every share, the answers' included, from the seed it shares with the dealer: no traffic.
* **pooled tuples** (the kinds in :data:`POOLED`: Beaver products, squares, AND and B2A tuples, the fixed-operand
  triples -- all but the gathers', on CPU): the randomness of a tuple comes from a *keyed stream* per party and
  per tuple signature (the request itself: op, sizes, fixed-operand spec -- public), seeded with a secret the
  party shares with the dealer; tuple k of a signature takes the k-th stretch of each party's stream. So the
  dealer can make the next tuples of a signature before they are drawn, and many at once: party 0 keeps a pool
  of answers per signature; an empty pool asks for one (needed now), and a pool just emptied at once asks for the
  next ``min(uses so far, POOL_MAX, POOL_BYTES / answer bytes)``, which the dealer computes as one batch (a
  weight mask times 16 rows is one int64 matmul over contiguous rows, 5x cheaper per row than 16 products of
  one) while party 0 goes on. On the SmolLM2 demo this cut the requests from ~3,000 to ~400 per decode token and
  the dealer's CPU per token from ~0.9 s to ~0.4 s (measured), on a host where it shares 2 cores with the
  parties. Why per-signature streams and not one stream per party in request order: a batch made ahead of time
  would draw out of order; keyed streams make each signature's draws independent of the others' order.
* **completion**: every pending answer is waited for right after the next exchange of the compute parties
  (:meth:`DealerClient.settle`, the counting communicator's hook, :mod:`mpcache.mpc.ledger`), and before any
  message to the dealer that is not a request (CrypTen's "terminate" at session end). That is in time because a
  tuple's answer is only ever used after the opening it masks: Beaver mul/matmul (``c += eps*b + a*delta`` after
  ``reveal_batch``), square (``r2 + ...`` after the reveal), AND (``c ^= ...`` after the reveal), B2A (``rA`` used
  after ``(xB ^ rB).reveal()``), the fixed-operand product (``c + ...`` after opening ``x - a``) and the gathers
  (the dealer terms after opening ``e, E``). ``wrap_rng`` (the wraps protocol of > 2 additive parties, not used in
  2PC) completes its answer at once.

**Costs.** Online: exactly TFP's (the openings are the same; the schedule search prices dealer traffic at 0
rounds, so it picks the same radices). Dealer (kind ``dealer`` in the ledger, party 0 only): per request its frame
(``len(pickle) + 4`` bytes sent; a pooled batch ``len(pickle) + 9``) and its answer (8 bytes per element
received), no round: the dealer's round trip runs while party 0 computes and opens, so it is off the critical path
(with the dealer on its own core; on a shared core its compute competes for CPU, which the wall clock shows).
Pooling sends each pooled answer once, in batches, and may make up to one batch per signature that is never used
(the run ends, or a size that depended on the cache length changes): those bytes are counted too. Party 0's last
pending answer of an opening is waited for after that opening's exchange (the profile counts it as ``wait``); a
prefetched batch is read when it arrives.

**Leakage.** The dealer learns the request stream: op names, shapes and the fixed operands' view recipes (public
functions of the architecture, prompt length and budgets; pooled batch sizes follow from their order alone),
nothing else -- :func:`public` refuses anything but
strings, integers, floats, None and tuples/lists/dicts of them, so no tensor can reach it, and
``tests/test_dealer.py`` checks that the stream is identical for different secret inputs. The compute parties learn
nothing new: party 1's view is unchanged (seeded draws), party 0 receives fresh shares (uniform given its own).
The dealer's seeds come from ``os.urandom`` (CrypTen's ``TTPServer`` draws them from torch's default generator,
which nothing seeds in the dealer process: predictable).

**Failure.** A dealer that dies closes its link: party 0's next write or completion raises :class:`DealerError`
naming the dealer (the session then aborts every party; under mpirun the launcher also ends the job as soon as a
process exits with an error); a dealer that stops answering is given up after the session timeout. The dealer
itself waits for requests without a deadline (asleep) and stops when party 0 closes the link or the job ends (a
link closed without "terminate" -- party 0 failed -- is an error). Test hooks:
``MPCACHE_DEALER_EXIT_AFTER=N`` makes the dealer exit (code 3) after answering N requests,
``MPCACHE_DEALER_HANG_AFTER=N`` makes it stop answering (alive, silent): party 0 then gives up after the session
timeout (``--timeout``) with a :class:`DealerError`.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import time

import torch

#: what party 0 may ask the dealer (CrypTen's five tuple kinds, and ours)
REQUESTS = (
    "additive",
    "square",
    "binary",
    "wraps",
    "B2A",
    "fixed_register",
    "fixed_triple",
    "gather_scores",
    "gather_values",
    "masks",
)
#: the tuples served from pools (keyed streams, batched answers): the elementwise and fixed-operand kinds
POOLED = ("additive", "square", "binary", "B2A", "fixed_triple", "masks")
POOL_MAX = 16  # tuples per pooled batch at most ...
POOL_BYTES = 1 << 20  # ... and at most this many answer bytes (or one tuple)
POOL_FRAME = b"P"  # a pooled request's frame: b"P" + count (4 bytes) + the tuple's signature (its request)
EXIT_AFTER_ENV = "MPCACHE_DEALER_EXIT_AFTER"  # test hook: the dealer dies (exit code 3) after answering N requests
HANG_AFTER_ENV = "MPCACHE_DEALER_HANG_AFTER"  # test hook: the dealer stops answering (alive) after N requests


class DealerError(RuntimeError):
    """The dealer did not answer (it died or stopped), or was asked something it does not serve."""


# ---- requests: public values only --------------------------------------------------------------------------------
def public(x):
    """``x`` with sizes as plain tuples of ints; raises TypeError on anything that is not a public scalar (str, int,
    float, bool, None) or a tuple/list/dict of them -- a tensor, above all, never goes to the dealer."""
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, torch.Size):
        return tuple(int(s) for s in x)
    if isinstance(x, (tuple, list)):
        return tuple(public(v) for v in x)
    if isinstance(x, dict):
        return {public(k): public(v) for k, v in x.items()}
    if isinstance(x, torch.device):
        return str(x)
    raise TypeError(f"a dealer request may only carry public sizes and specs, not {type(x).__name__}")


def wire_device(device) -> str | None:
    """The device named in a request: a dry run's ``meta`` stands for the CPU party it predicts."""
    if device is None:
        return None
    d = str(device)
    return "cpu" if d == "meta" else d


def encode(func: str, device, args=(), kwargs=None) -> bytes:
    """The pickled request (what party 0 sends, and what the ledger counts: its length + a 4-byte size header).
    Pickled without memo, so its length depends on the values only (not on which equal objects are shared)."""
    import io

    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=4)
    p.fast = True  # no memo: a request is a small tree of public values (no cycles)
    p.dump((func, wire_device(device), public(tuple(args)), public(dict(kwargs or {}))))
    return buf.getvalue()


def _signature(func: str, device, args, kwargs) -> bytes:
    """:func:`encode`, memoised (a pooled tuple's signature recurs every layer and token)."""
    key = (func, device, repr(args), repr(kwargs))  # repr: 1 and True, equal as keys, pickle apart
    sig = _SIGNATURES.get(key)
    if sig is None:
        if len(_SIGNATURES) > 4096:
            _SIGNATURES.clear()
        sig = _SIGNATURES[key] = encode(func, device, args, kwargs)
    return sig


_SIGNATURES: dict = {}


def _next_batch(takes: int, answer_numel: int) -> int:
    """How many tuples party 0 asks for ahead when a pool empties after ``takes`` takes of its signature."""
    return max(1, min(takes, POOL_MAX, POOL_BYTES // max(1, answer_numel * 8)))


def pool_batches(uses: int, answer_numel: int) -> list[int]:
    """The batch sizes party 0 asks the dealer for when it takes ``uses`` tuples of one pooled signature whose
    answer has ``answer_numel`` elements (:meth:`DealerClient._take`'s policy, for cost predictions and tests)."""
    out, left = [], 0
    for takes in range(1, uses + 1):
        if not left:
            out.append(1)
            left = 1
        left -= 1
        if not left:
            left = _next_batch(takes, answer_numel)
            out.append(left)
    return out


def request_nbytes(func: str, device, *args, **kwargs) -> int:
    """Bytes party 0 sends for one unpooled request (a pooled batch's frame: 5 more)."""
    return len(encode(func, device, args, kwargs)) + 4


class _PublicOnly(pickle.Unpickler):
    """The dealer's unpickler: plain containers and scalars only (no class is ever loaded)."""

    def find_class(self, module, name):
        raise DealerError(f"dealer: a request tried to load {module}.{name}; requests carry public values only")


def decode(buf: bytes):
    import io

    return _PublicOnly(io.BytesIO(buf)).load()


def decode_frame(frame: bytes):
    """A request frame as the dealer reads it: ``(request, count)``, ``count`` the pooled batch size (None: an
    unpooled request)."""
    if frame[:1] == POOL_FRAME:
        return decode(frame[5:]), int.from_bytes(frame[1:5], "little")
    return decode(frame), None


# ---- keyed streams: the randomness of a pooled tuple --------------------------------------------------------------
def base_words(gen) -> list[int]:
    """256 bits from a party's generator shared with the dealer (its first draw: both ends take it at setup)."""
    from .compat import seed_words

    return seed_words(gen)


def keyed_stream(base: list[int], sig: bytes):
    """The stream of one party's draws for the tuples of signature ``sig`` (NumPy PCG64DXSM seeded with the
    party-dealer secret and a hash of the signature): tuple k of a signature takes the k-th stretch of it."""
    import hashlib

    import numpy as np

    h = hashlib.blake2b(sig, digest_size=32).digest()
    words = [int.from_bytes(h[i : i + 8], "little") for i in range(0, 32, 8)]
    return np.random.PCG64DXSM(np.random.SeedSequence(base + words))


def draw(stream, count: int, sizes, device=None) -> list[torch.Tensor]:
    """``count`` tuples' draws of ``sizes`` (each ``(count, *size)``; ``count`` None: one tuple, ``size``), taken
    tuple after tuple, sizes in order, from ``stream``: one draw of ``count * sum(sizes)`` ring elements.
    A ``meta`` device (a dry run) draws nothing."""
    sizes = [torch.Size(z) for z in sizes]
    lead = () if count is None else (count,)
    if device is not None and torch.device(device).type == "meta":
        return [torch.empty(lead + z, dtype=torch.long, device="meta") for z in sizes]
    import numpy as np

    ns = [z.numel() for z in sizes]
    flat = torch.from_numpy(stream.random_raw((count or 1) * sum(ns)).view(np.int64)).view(count or 1, sum(ns))
    return [p.reshape(lead + z) for p, z in zip(flat.split(ns, dim=1), sizes)]


# ---- the link between party 0 and the dealer ----------------------------------------------------------------------
# Requests and answers travel on a TCP stream of their own between party 0 and the dealer (set up at session start
# through CrypTen's ttp group, which carries only the port and a token): a request is one length-prefixed frame
# written without waiting (party 0 keeps what the socket does not take yet and writes it later); an answer is its
# raw int64 elements, which party 0 reads into the pending share at the next exchange. Why not gloo point-to-point
# on the ttp group: a gloo receive costs ~0.1 ms to post (measured here, 2 per request on the dealer plus 1 per
# answer on party 0: ~0.7 s per SmolLM2 decode token), a socket read or write ~5 us, and the dealer can sleep in
# select() on its socket between requests.
HEADER = 4  # bytes: the frame's length (little endian)
TERMINATE = b"terminate"  # the last frame of a session (then CrypTen's own "terminate" over gloo)


def _rendezvous_host() -> str:
    """Rank 0's address as this process reaches it: the host of the torch.distributed rendezvous (tcp://host:port;
    a file rendezvous is this host)."""
    rdv = os.environ.get("RENDEZVOUS", "")
    if rdv.startswith("tcp://"):
        return rdv[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return "127.0.0.1"


def _timeout_s() -> float:
    from torch.distributed import distributed_c10d

    return float(distributed_c10d.default_pg_timeout.total_seconds())


class DealerClient:
    """A compute party's link to the dealer: the generator it shares with the dealer and, on party 0, the socket,
    the bytes of requests not yet taken by it and the pending answers (until :meth:`settle`)."""

    def __init__(self, comm, ttp_client, sock=None):
        self.comm = comm
        self.rank = comm.get_rank()
        self.dealer_rank = comm.get_ttp_rank()
        self._ttp = ttp_client  # CrypTen's TTPClient: its seeded generator (the seed came from the dealer)
        self.sock = sock  # party 0: the stream to the dealer
        self._out = bytearray()  # request bytes the socket has not taken yet
        self._pending: list = []  # [view of the answer's bytes, bytes read, tensor to fill, staging or None]
        self.timeout = _timeout_s() if sock is not None else 0.0
        self._base = base_words(ttp_client.get_generator())  # the keyed streams' secret with the dealer
        self._keyed: dict[bytes, object] = {}  # signature -> this party's keyed stream
        self._pools: dict[bytes, list] = {}  # party 0: signature -> [deque of (entry, answer view), takes so far]
        comm.dealer_settle = self.settle  # the counting communicator calls it after every exchange

    def generator(self, device=None):
        return self._ttp.get_generator(device=device)

    def request(self, func: str, device, args=(), out_size=None, kwargs=None):
        """Party 0: send request ``func(*args)`` (without waiting) and (``out_size`` not None) register the share of
        its answer to receive; returns that share, an int64 tensor filled at the next :meth:`settle` (None without
        answer)."""
        assert self.rank == 0, "only party 0 talks to the dealer"
        payload = encode(func, device, args, kwargs)
        out = None
        if out_size is not None:
            dev = torch.device("cpu") if device is None else torch.device(device)
            out = torch.empty(torch.Size(out_size), dtype=torch.long, device=dev)
        count = getattr(self.comm, "dealer_traffic", None)
        if count is not None:
            count(sent=len(payload) + HEADER, recv=0 if out is None else out.nelement() * 8)
        self._post(payload, func, args, kwargs, out)
        return out

    def _post(self, payload: bytes, func, args, kwargs, out, needed: bool = True) -> list | None:
        """Queue a request frame; register its answer (``out``) to be read in order. ``needed``: some share handed
        out waits for it (settle completes it); a prefetched pool batch is read when it comes."""
        self._out += len(payload).to_bytes(HEADER, "little") + payload
        entry = None
        if out is not None and out.nelement():
            stage = None if out.device.type == "cpu" else torch.empty(out.shape, dtype=torch.long)
            buf = out if stage is None else stage
            entry = [memoryview(buf.numpy()).cast("B"), 0, out, stage, needed]
            self._pending.append(entry)
        self._write()
        return entry

    # ---- pooled tuples ----------------------------------------------------------------------------------------
    def pooled(self, func: str, device, args, shares, out_size, kwargs=None) -> list[torch.Tensor]:
        """This party's shares of one tuple of kind ``func`` (in :data:`POOLED`): ``shares`` (its sizes) drawn
        from the keyed stream of the tuple's signature (the request itself: public), then the answer's share
        (``out_size``): party 0's from its pool of dealer answers, the other parties' drawn. See :func:`serve`."""
        sig = _signature(func, wire_device(device), args, kwargs)
        own = list(shares) + ([] if self.rank == 0 else [out_size])
        stream = self._keyed.get(sig)
        if stream is None:
            stream = self._keyed[sig] = keyed_stream(self._base, sig)
        parts = draw(stream, None, own, device)
        if self.rank == 0:
            parts.append(self._take(sig, torch.Size(out_size), device))
        return parts

    def _take(self, sig: bytes, out_size: torch.Size, device) -> torch.Tensor:
        """Party 0: the next answer of ``sig`` from its pool. An empty pool asks for one tuple (needed now, like an
        unpooled request); a pool just emptied asks at once for the next batch, ``min(takes so far, POOL_MAX,
        POOL_BYTES / answer bytes)`` tuples, which the dealer computes while party 0 goes on."""
        pool = self._pools.get(sig)
        if pool is None:
            from collections import deque

            pool = self._pools[sig] = [deque(), 0]
        if not pool[0]:
            self._ask(sig, pool, 1, out_size, device)
        entry, view = pool[0].popleft()
        pool[1] += 1
        if entry is not None:
            entry[4] = True  # a share handed out waits for this batch: settle completes it
        if not pool[0]:
            self._ask(sig, pool, _next_batch(pool[1], out_size.numel()), out_size, device)
        return view

    def _ask(self, sig: bytes, pool, count: int, out_size: torch.Size, device) -> None:
        frame = POOL_FRAME + count.to_bytes(4, "little") + sig
        dev = torch.device("cpu") if device is None else torch.device(device)
        buf = torch.empty((count, *out_size), dtype=torch.long, device=dev)
        tally = getattr(self.comm, "dealer_traffic", None)
        if tally is not None:
            tally(sent=len(frame) + HEADER, recv=buf.nelement() * 8)
        entry = self._post(frame, None, None, None, buf, needed=False)
        pool[0].extend((entry, buf[k]) for k in range(count))

    def _write(self) -> None:
        """Hand the socket what it takes now (never blocks)."""
        while self._out:
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                return
            except OSError as e:
                raise self._dead(e) from None
            del self._out[:n]

    def settle(self, final: bool = False) -> None:
        """Wait (asleep, in select) until every request is written and every pending answer is read into its share.
        ``final``: then end the link (the session's end; the dealer then expects CrypTen's own "terminate")."""
        import select

        if self.sock is None or (not self._pending and not self._out and not final):
            return
        if final:
            self._out += len(TERMINATE).to_bytes(HEADER, "little") + TERMINATE
        while True:
            self._write()
            if self._pending:
                self._read()
            waits = any(e[4] for e in self._pending) if not final else bool(self._pending)
            if not (self._out or waits):
                break
            r, w, _ = select.select(
                [self.sock] if self._pending else [], [self.sock] if self._out else [], [], self.timeout
            )
            if not (r or w):
                raise DealerError(
                    f"party {self.rank}: no answer from the dealer (rank {self.dealer_rank}) for {self.timeout:.0f} s; "
                    "it hangs or is overloaded (see its output); raise --timeout if it is merely slow"
                )
        if final:
            self.sock.close()
            self.sock = None

    def _read(self) -> None:
        """Read what has arrived into the pending answers, in order (never blocks)."""
        while self._pending:
            p = self._pending[0]
            view, got = p[0], p[1]
            try:
                n = self.sock.recv_into(view[got:])
            except BlockingIOError:
                return
            except OSError as e:
                raise self._dead(e) from None
            if n == 0:
                raise self._dead(ConnectionError("the dealer closed the link"))
            p[1] = got + n
            if p[1] == len(view):
                if p[3] is not None:
                    p[2].copy_(p[3])
                self._pending.pop(0)

    def _dead(self, e) -> DealerError:
        return DealerError(
            f"party {self.rank}: the dealer (rank {self.dealer_rank}) did not take or answer a tuple request: it died "
            f"or stopped (see its output above) [{str(e).splitlines()[0] if str(e) else type(e).__name__}]"
        )


def _link_party0(comm) -> object:
    """Party 0's end of the link: listen, send the port and a token to the dealer over the ttp group, accept it."""
    import secrets
    import socket

    import torch.distributed as dist

    srv = socket.create_server(("", 0))
    token = secrets.randbits(63)
    try:
        dist.send(torch.tensor([srv.getsockname()[1], token]), comm.get_ttp_rank(), group=comm.ttp_group)
        srv.settimeout(_timeout_s())
        try:
            sock, _ = srv.accept()
        except TimeoutError:
            raise DealerError(f"party 0: the dealer did not connect within {_timeout_s():.0f} s") from None
    finally:
        srv.close()
    sock.settimeout(_timeout_s())
    got = b""
    while len(got) < 8:
        chunk = sock.recv(8 - len(got))
        if not chunk:
            raise DealerError("party 0: the dealer's link closed before its token")
        got += chunk
    if int.from_bytes(got, "little") != token:
        raise DealerError("party 0: a process other than the dealer connected to the dealer link")
    return _stream(sock)


def _link_dealer(comm) -> object:
    """The dealer's end: the port and token from party 0 (ttp group), connect to rank 0's address, say the token."""
    import socket

    import torch.distributed as dist

    msg = torch.zeros(2, dtype=torch.long)
    dist.recv(msg, 0, group=comm.ttp_group)
    port, token = (int(v) for v in msg.tolist())
    host = _rendezvous_host()
    try:
        sock = socket.create_connection((host, port), timeout=_timeout_s())
    except OSError as e:
        raise DealerError(f"dealer: cannot reach party 0 at {host}:{port} for the dealer link: {e}") from None
    sock.sendall(token.to_bytes(8, "little"))
    return _stream(sock)


def _stream(sock):
    import socket

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def client() -> DealerClient:
    """This party's dealer client (one per CrypTen communicator: a dry run's has its own)."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    inst = comm.get()
    c = inst.__dict__.get("dealer_client")
    if c is None:
        if inst.get_rank() == 0:
            raise DealerError("party 0 has no dealer link: call mpcache.mpc.dealer.install() after crypten.init()")
        c = inst.dealer_client = DealerClient(inst, TTPClient.get())
    return c


def settle() -> None:
    """Complete this party's pending dealer answers now (a no-op without a dealer or anything pending)."""
    import crypten.communicator as comm

    c = comm.get().__dict__.get("dealer_client")
    if c is not None:
        c.settle()


# ---- the provider ------------------------------------------------------------------------------------------------
def _out_size(op: str, size0, size1, args, kwargs) -> torch.Size:
    from .lean_tfp import _result_size

    out = _result_size(op, size0, size1) if not (args or kwargs) else None
    if out is None:
        meta = [torch.empty(torch.Size(s), device="meta") for s in (size0, size1)]
        out = getattr(torch, op)(*meta, *args, **kwargs).shape
    return out


def pooled_device(device) -> bool:
    """Pooled tuples (keyed streams, batched answers) on CPU (and in CPU dry runs); CUDA keeps the stream order."""
    return device is None or torch.device(device).type in ("cpu", "meta")


def provider_class():
    """The provider served under CrypTen's "TTP" name (built lazily: CrypTen is imported after the patches)."""
    from crypten.common.rng import generate_kbit_random_tensor
    from crypten.mpc.primitives import ArithmeticSharedTensor as AST
    from crypten.mpc.primitives import BinarySharedTensor as BST
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty

    from .lean_tfp import _broadcast

    def ring(size, gen, device):
        from crypten.common.rng import generate_random_ring_element  # the patched (fast) draw

        return generate_random_ring_element(torch.Size(size), generator=gen, device=device)

    class PipelinedTrustedThirdParty(TrustedThirdParty):
        """CrypTen's TTP tuples (same shares, same dealer math), requested without waiting (module docstring)."""

        NAME = "TTP"

        def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
            cl = client()
            out = _out_size(op, size0, size1, args, kwargs)
            if pooled_device(device):
                a, b, c = cl.pooled("additive", device, (size0, size1, op, *args), (size0, size1), out, kwargs)
            else:
                gen = cl.generator(device)
                a, b = ring(size0, gen, device), ring(size1, gen, device)
                if cl.rank == 0:
                    c = cl.request("additive", device, (size0, size1, op, *args), out, kwargs)
                else:
                    c = ring(out, gen, device)
            return AST.from_shares(a, precision=0), AST.from_shares(b, precision=0), AST.from_shares(c, precision=0)

        def square(self, size, device=None):
            cl = client()
            if pooled_device(device):
                r, r2 = cl.pooled("square", device, (size,), (size,), size)
            else:
                gen = cl.generator(device)
                r = ring(size, gen, device)
                r2 = cl.request("square", device, (size,), size) if cl.rank == 0 else ring(size, gen, device)
            return AST.from_shares(r, precision=0), AST.from_shares(r2, precision=0)

        def generate_binary_triple(self, size0, size1, device=None):
            cl = client()
            out = _broadcast(size0, size1)
            if pooled_device(device):
                a, b, c = cl.pooled("binary", device, (size0, size1), (size0, size1), out)
            else:
                gen = cl.generator(device)
                a = generate_kbit_random_tensor(torch.Size(size0), generator=gen, device=device)
                b = generate_kbit_random_tensor(torch.Size(size1), generator=gen, device=device)
                if cl.rank == 0:
                    c = cl.request("binary", device, (size0, size1), out)
                else:
                    c = generate_kbit_random_tensor(out, generator=gen, device=device)
            return BST.from_shares(a), BST.from_shares(b), BST.from_shares(c)

        def wrap_rng(self, size, device=None):
            cl = client()
            gen = cl.generator(device)
            r = ring(size, gen, device)
            if cl.rank == 0:
                theta = cl.request("wraps", device, (size,), size)
                cl.settle()  # the wraps protocol copies theta_r before its exchange: complete it now
            else:
                theta = ring(size, gen, device)
            return AST.from_shares(r, precision=0), AST.from_shares(theta, precision=0)

        def B2A_rng(self, size, device=None):
            cl = client()
            if pooled_device(device):
                rB, rA = cl.pooled("B2A", device, (size,), (size,), size)
                rB = rB & 1
            else:
                gen = cl.generator(device)
                rB = generate_kbit_random_tensor(torch.Size(size), bitlength=1, generator=gen, device=device)
                rA = cl.request("B2A", device, (size,), size) if cl.rank == 0 else ring(size, gen, device)
            return AST.from_shares(rA, precision=0), BST.from_shares(rB)

    return PipelinedTrustedThirdParty


def register() -> None:
    """Serve CrypTen's "TTP" provider name with the pipelined provider (idempotent; no traffic: dry runs use it)."""
    from crypten import mpc

    providers = mpc.__dict__["__SUPPORTED_PROVIDERS"]
    if type(providers["TTP"]).__name__ != "PipelinedTrustedThirdParty":
        providers["TTP"] = provider_class()()


def install() -> None:
    """A compute party of a live TTP session, right after ``crypten.init()``: register the provider and (party 0)
    open the link to the dealer, which :func:`serve` opens from its side."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    register()
    inst = comm.get()
    if inst.__dict__.get("dealer_client") is None:
        sock = _link_party0(inst) if inst.get_rank() == 0 else None
        inst.dealer_client = DealerClient(inst, TTPClient.get(), sock)


# ---- the dealer's side -------------------------------------------------------------------------------------------
def handlers_class():
    """The dealer's request handlers: CrypTen's ``TTPServer`` ones (``additive``, ``square``, ``binary``, ``wraps``,
    ``B2A``) plus the fixed-operand requests (``fixed_register``, ``fixed_triple``: :mod:`mpcache.mpc.fixed_operand`),
    the mask plans (``masks``: :mod:`mpcache.mpc.masked`)
    and the three-operand gathers (``gather_scores``, ``gather_values``: :mod:`mpcache.mpc.gather_triple`), without
    CrypTen's serve loop. Each returns party 0's share of the answer (the value minus the other parties' seeded
    shares) or None (no answer)."""
    from crypten.mpc.provider.ttp_provider import TTPServer

    class DealerHandlers(TTPServer):
        """Memory: one mask B per fixed operand (|W| int64) and per opened one-hot until its last use."""

        def __init__(self, device="cpu"):  # no serve loop here: see serve()
            self.device = device
            self.fixed_masks: dict[int, torch.Tensor] = {}
            self.bases: list[list[int]] = []  # each party's keyed-stream secret (serve() takes them after setup)
            self.keyed: dict = {}  # (party, signature) -> that party's keyed stream

        def _setup_generators(self):
            """CrypTen's seed exchange (one seed to each compute party, then a barrier), seeds from os.urandom."""
            import crypten.communicator as comm
            import torch.distributed as dist

            ws = comm.get().get_world_size()
            g = comm.get().ttp_group
            seeds = [torch.tensor(int.from_bytes(os.urandom(8), "big") - 2**63) for _ in range(ws)]
            reqs = [dist.isend(tensor=seeds[i], dst=i, group=g) for i in range(ws)]
            self.generators = [torch.Generator(device="cpu") for _ in range(ws)]
            self.generators_cuda = [
                torch.Generator(device="cuda") if torch.cuda.is_available() else None for _ in range(ws)
            ]
            for i in range(ws):
                self.generators[i].manual_seed(seeds[i].item())
                if self.generators_cuda[i] is not None:
                    self.generators_cuda[i].manual_seed(seeds[i].item())
                reqs[i].wait()
            dist.barrier(group=g)

        def _answer(self, values: list[torch.Tensor]) -> torch.Tensor:
            """Party 0's share of several values, flattened into one answer (the others draw theirs, same order)."""
            flat = values[0].reshape(-1) if len(values) == 1 else torch.cat([v.reshape(-1) for v in values])
            return flat - self._get_additive_PRSS(flat.shape, remove_rank=True)

        def additive(self, size0, size1, op, *args, **kwargs):
            """CrypTen's handler (same draws, same order), the ring product by ``ring_matmul`` for a matmul."""
            if op != "matmul" or args or kwargs:
                return super().additive(size0, size1, op, *args, **kwargs)
            from .fixed_operand import ring_matmul

            a = self._get_additive_PRSS(torch.Size(size0))
            b = self._get_additive_PRSS(torch.Size(size1))
            c = ring_matmul(a, b)
            return c - self._get_additive_PRSS(c.size(), remove_rank=True)

        # ---- pooled tuples: count tuples of one signature at once, from the parties' keyed streams ----------------
        def pooled(self, sig: bytes, count: int) -> torch.Tensor:
            """Party 0's shares of the answers of the next ``count`` tuples of signature ``sig`` (a request of a
            kind in :data:`POOLED`), flat, tuple after tuple. Each party's draws come from its keyed stream of
            ``sig``, in the order the party takes them (party 0: its operand shares; the others: those and their
            answer share), so the answers match the parties' draws tuple by tuple; the products are batched."""
            func, _device, args, kwargs = decode(sig)
            if func not in POOLED:
                raise DealerError(f"dealer: {func!r} is not a pooled request (pooled: {', '.join(POOLED)})")
            streams, n = self.keyed, len(self.bases)

            def parts(shares, out):
                """Per party, its draws for ``count`` tuples: ``shares`` (+ ``out`` for parties > 0)."""
                got = []
                for i in range(n):
                    st = streams.get((i, sig))
                    if st is None:
                        st = streams[(i, sig)] = keyed_stream(self.bases[i], sig)
                    got.append(draw(st, count, list(shares) + ([out] if i else [])))
                return got

            def total(xs, op=torch.add):
                return functools.reduce(op, xs)

            if func == "additive":
                size0, size1, op, *rest = args
                out = _out_size(op, size0, size1, tuple(rest), kwargs)
                p = parts((size0, size1), out)
                a, b = total([q[0] for q in p]), total([q[1] for q in p])
                if op == "mul" and not rest and not kwargs:
                    d = max(len(size0), len(size1))
                    c = _batched(a, size0, d) * _batched(b, size1, d)
                elif op == "matmul" and not rest and not kwargs:
                    from .fixed_operand import ring_matmul

                    c = torch.stack([ring_matmul(a[k], b[k]) for k in range(count)])
                else:
                    c = torch.stack([getattr(torch, op)(a[k], b[k], *rest, **kwargs) for k in range(count)])
                ans = c.reshape(count, -1) - total([q[2] for q in p[1:]]).reshape(count, -1)
            elif func == "square":
                (size,) = args
                p = parts((size,), size)
                r = total([q[0] for q in p])
                ans = r * r - total([q[1] for q in p[1:]])
            elif func == "binary":
                from .lean_tfp import _broadcast

                size0, size1 = args
                out = _broadcast(size0, size1)
                p = parts((size0, size1), out)
                a, b = total([q[0] for q in p], torch.bitwise_xor), total([q[1] for q in p], torch.bitwise_xor)
                d = max(len(size0), len(size1))
                c = _batched(a, size0, d) & _batched(b, size1, d)
                ans = c.reshape(count, -1) ^ total([q[2] for q in p[1:]], torch.bitwise_xor).reshape(count, -1)
            elif func == "B2A":
                (size,) = args
                p = parts((size,), size)
                rB = total([q[0] & 1 for q in p], torch.bitwise_xor)
                ans = rB - total([q[1] for q in p[1:]])
            elif func == "masks":  # mpcache.mpc.masked: n masks of numel elements, the products its plan needs
                from .masked import answer_numel, dealer_answer, mask_values, own_sizes

                spec, subsets = args
                p = parts(own_sizes(spec), (answer_numel(spec, subsets),))
                ans = dealer_answer(mask_values(p, spec, total), spec, subsets) - total([q[len(spec)] for q in p[1:]])
            else:  # fixed_triple
                from .fixed_operand import eval_spec, ring_matmul

                spec, size0 = args
                B = eval_spec(spec, self.fixed_masks)
                out = torch.matmul(torch.empty(size0, device="meta"), torch.empty(B.shape, device="meta")).shape
                p = parts((size0,), out)
                a = total([q[0] for q in p])
                if B.dim() == 2 and len(size0) >= 1:  # one product for the whole batch: B is read once
                    c = ring_matmul(a.reshape(-1, size0[-1]), B)
                else:
                    c = torch.stack([ring_matmul(a[k], B) for k in range(count)])
                ans = c.reshape(count, -1) - total([q[1] for q in p[1:]]).reshape(count, -1)
            return ans.reshape(-1)

        def masks(self, spec, subsets):
            """A mask plan unpooled (CUDA): each party's own draws in order, then party 0's share of the answer."""
            from crypten.common.rng import generate_random_ring_element

            from .masked import answer_numel, dealer_answer, mask_values, own_sizes

            gens = self._get_generators(device=self.device)
            p = [
                [generate_random_ring_element(torch.Size(z), generator=g).unsqueeze(0) for z in own_sizes(spec)]
                for g in gens
            ]
            c = dealer_answer(mask_values(p, spec, lambda xs, op=torch.add: functools.reduce(op, xs)), spec, subsets)
            return c.reshape(-1) - self._get_additive_PRSS(torch.Size((answer_numel(spec, subsets),)), remove_rank=True)

        # ---- fixed operands (mpcache.mpc.fixed_operand) --------------------------------------------------------
        def fixed_register(self, entries):
            for key, size in entries:  # in the parties' drawing order (no answer)
                # row-major: a pooled batch of rows times B is one int64 matmul over contiguous rows (SmolLM2's MLP
                # mask, 16 rows: 0.09 ms a row, vs 0.44 ms a row by torch.mv over a column-major B)
                self.fixed_masks[key] = self._get_additive_PRSS(torch.Size(size))

        def fixed_triple(self, spec, size0):
            from .fixed_operand import eval_spec, ring_matmul

            b = eval_spec(spec, self.fixed_masks)
            a = self._get_additive_PRSS(torch.Size(size0))
            c = ring_matmul(a, b)
            return c - self._get_additive_PRSS(c.size(), remove_rank=True)

        # ---- three-operand gathers (mpcache.mpc.gather_triple) -------------------------------------------------
        def gather_scores(self, a_key, k_spec, q_size):
            from .fixed_operand import eval_spec
            from .gather_triple import dealer_score_terms

            a = self._get_additive_PRSS(torch.Size(q_size))
            B = eval_spec(k_spec, self.fixed_masks)
            return self._answer(dealer_score_terms(a, self.fixed_masks[a_key], B))

        def gather_values(self, a_key, v_spec, p_size, rest_spec=None, rest_size=None):
            from .fixed_operand import eval_spec, ring_matmul
            from .gather_triple import dealer_value_terms

            a = self._get_additive_PRSS(torch.Size(p_size))
            a2 = self._get_additive_PRSS(torch.Size(rest_size)) if rest_spec is not None else None
            B = eval_spec(v_spec, self.fixed_masks)
            terms = dealer_value_terms(a, self.fixed_masks.pop(a_key), B)  # the one-hot's last use
            if a2 is not None:
                terms[-1] = terms[-1] + ring_matmul(a2, eval_spec(rest_spec, self.fixed_masks))
            return self._answer(terms)

    return DealerHandlers


def _batched(x: torch.Tensor, size, dims: int) -> torch.Tensor:
    """``(count, *size)`` viewed with ``size`` left-padded by ones to ``dims`` dims, so two operands of different
    ranks broadcast as their tuples do (the batch dimension first)."""
    size = tuple(size)
    return x.reshape(x.shape[0], *((1,) * (dims - len(size))), *size)


def serve() -> None:
    """The dealer's loop (the last MPI rank with ``--provider ttp``): answer party 0's requests in order until it
    says "terminate". Sleeps in select() on its link between requests (no busy wait); answers are queued and
    written as the socket takes them, so it never waits for party 0 to read."""
    import select

    import crypten
    import crypten.communicator as comm

    crypten.init()  # joins the compute parties' process groups as the ttp rank (cfg.mpc.provider is "TTP")
    h = handlers_class()()
    h._setup_generators()
    h.bases = [base_words(g) for g in h.generators]  # each party's keyed-stream secret (its first draw)
    sock = _link_dealer(comm.get())
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    hang_after = int(os.environ.get(HANG_AFTER_ENV, "0") or 0)
    inbox, outbox = bytearray(), []  # outbox: memoryviews of answers (their tensors kept alive beside)
    served, done = 0, False
    while not done or outbox:
        r, _, _ = select.select([] if done else [sock], [sock] if outbox else [], [])
        if r:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                raise DealerError("dealer: party 0 closed the link without terminate (it failed; see its output)")
            if chunk:
                inbox += chunk
            while not done and len(inbox) >= HEADER:
                n = int.from_bytes(inbox[:HEADER], "little")
                if len(inbox) < HEADER + n:
                    break
                frame = bytes(inbox[HEADER : HEADER + n])
                del inbox[: HEADER + n]
                if frame == TERMINATE:
                    done = True
                    break
                msg, count = decode_frame(frame)
                out = _serve_one(h, msg) if count is None else h.pooled(frame[5:], count)
                if out is not None and out.nelement():
                    out = out.contiguous().cpu()
                    outbox.append([memoryview(out.numpy()).cast("B"), out])
                served += 1
                if exit_after and served >= exit_after:
                    sys.stderr.write(
                        f"[mpcache dealer] exiting after {served} requests ({EXIT_AFTER_ENV}: a test hook)\n"
                    )
                    sys.stderr.flush()
                    os._exit(3)
                if hang_after and served >= hang_after:
                    sys.stderr.write(
                        f"[mpcache dealer] hanging after {served} requests ({HANG_AFTER_ENV}: a test hook)\n"
                    )
                    sys.stderr.flush()
                    while True:
                        time.sleep(3600)
        while outbox:  # write what the socket takes now
            try:
                k = sock.send(outbox[0][0])
            except BlockingIOError:
                break
            if k == len(outbox[0][0]):
                outbox.pop(0)
            else:
                outbox[0][0] = outbox[0][0][k:]
    sock.close()
    comm.get().recv_obj(0, comm.get().ttp_group)  # CrypTen's own "terminate" (party 0's crypten.uninit)


def _serve_one(h, msg):
    func, device, args, kwargs = msg
    if func not in REQUESTS:
        raise DealerError(f"dealer: unknown request {func!r} (serves {', '.join(REQUESTS)})")
    h.device = device if device is not None else "cpu"
    return getattr(h, func)(*args, **kwargs)


__all__ = [
    "DealerClient",
    "DealerError",
    "client",
    "install",
    "pool_batches",
    "public",
    "register",
    "request_nbytes",
    "serve",
    "settle",
]
