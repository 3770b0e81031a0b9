"""The reveal audit: every message a party receives, on every channel, recorded with its values, and the checks that
what a party learns inside the MPC is masked and independent of the secrets, that the only plaintext is the
generated tokens, received by the client alone, and that the dealer receives public requests only.

Why one file: the recorders (three channels) and the checks read the same message records; apart they would share
one format across files for no gain.

**Recorded** (per receiving party, per message: channel, op, ledger scope, origin, source, dtype/shape and the
received values; :func:`enable` in a process, inherited by the processes forked from it):

* CrypTen's communicator as the ledger counts it (:func:`mpcache.mpc.ledger.attach` calls :func:`watch` through
  ``ledger.ATTACH_HOOKS``): every opening, over gloo, MPI or the local pipes -- recorded as the opened value a
  party learns (an all-reduce's sum, a reduce's result at its destination) -- and every point-to-point receive
  (replicated resharing, dealer-free B2A), gather, broadcast and object; channel ``online`` on the compute
  parties' group, ``dealer`` on CrypTen's dealer groups.
* the pipelined dealer's own TCP link (:mod:`mpcache.mpc.dealer`; :func:`_watch_dealer_link` wraps its socket):
  every request frame the dealer reads (``request``, exact bytes) and the answers party 0 reads (raw int64 shares,
  ``ring``, in blocks of :data:`LINK_BLOCK`).
* torch.distributed receives made outside CrypTen's communicator (:func:`_watch_dist`): the PRG seeds exchanged at
  ``crypten.init``, the dealer's seeds, the link's setup (party 0's port and a random token: ``setup``). On the
  dealer, :func:`watch_dealer` also hooks the communicator CrypTen's dealer makes (CrypTen's own "terminate").
* ``mpi``: the session's mpi4py communicator of the compute parties (:class:`AuditedMPI`: send/recv/bcast/
  gather/allgather/scatter/reduce/allreduce/sendrecv), each message with the :func:`label` of the block it was
  received in (``parties generate`` labels every one: the public prompt length, the cost reports, the verify step).
* files: the weight sources each process read (:func:`mpcache.model.weights.weight_reads`) and, with
  :func:`watch_files`, every Python-level ``open`` under the model's folder.

Not recorded: the MPI handshake and rendezvous before the session (the public setup it compares: model config,
policy, knobs, code digest, host names; rank 0's address). Every received value is kept in memory: an audit is for
small models (the tests' tiny ones), not for SmolLM2's gigabytes of openings.

**Origins** (what a received value should look like, from the protocol on the stack when it arrives -- the
docstrings of :mod:`mpcache.mpc.compare`, :mod:`mpcache.mpc.fixed_operand`, :mod:`mpcache.mpc.dealer_free` and
CrypTen's beaver): ``bits`` for the opened value of CrypTen's ``B2A_single_bit`` (``x ^ r``, r one random bit:
uniform over {0, 1}); ``reveal`` for ``get_plain_text`` (a deliberate plaintext opening: only the token, to the
client); ``request`` for what the dealer receives; ``setup`` for the dealer link's credentials; ``object`` for
pickled objects; ``ring`` for everything else -- a Beaver ``x - a`` / ``y - b`` or ``x ^ a`` (64-bit masks), a fixed
operand's ``W - B`` and ``x - a``, the bit-sliced comparison's AND openings (planes of 64 elements' bits, masked by
full 64-bit binary masks) and its packed B2A opening (64 bits ``x ^ r`` a word, r random per bit), a replicated share (PRZS-masked), a dealer's answer or seed -- uniform over Z_2^64.

**Checks** (family-wise significance ``alpha`` per call, Bonferroni over its tests; :data:`ALPHA` by default):

* :func:`check_masked`: per ``ring`` message, a magnitude test on all its values (the smallest ``|v|`` as a signed
  64-bit word and as two 32-bit lanes: an unmasked fixed-point value is tiny next to 2^63) and chi-squares of the
  top bits of the word and of its low lane (up to 256 bins, >= 5 expected per bin) on at most :data:`CAP` of its
  distinct values (a share repeated inside a message is one sample); per ``bits`` opening, values in {0, 1} and a
  chi-square of its ones; pooled per party. Given runs with other secrets, elements bit-identical in all of them
  (a party's share of a public constant, sent as is by replicated sharing) are public: set aside and counted.
* :func:`check_same_structure` + :func:`check_independent`: the same message sequence (party, channel, op, scope,
  origin, shape) for different secrets, and per aligned message a two-sample chi-square between the runs;
  :func:`check_runs` does both for several runs, sharing the work and one family-wise ``alpha``.
* :func:`check_reveals`: the ``reveal`` messages are exactly the generated tokens, at the client, nowhere else.
* :func:`check_dealer`: the dealer's received bytes are the same in every run and no request holds a tensor.
* :func:`check_mpi`: every MPI message carries an allowed label.

Statistical, so the audit bounds what it can see: it flags masks that are missing or short (small values, a biased
top byte or lane) and distributions that depend on the secrets; it cannot tell a fresh uniform mask from a reused
one (the protocols' arguments do that), nor an unmasked value that happens to look uniform.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
import threading
from dataclasses import dataclass, field

import torch

from . import lockstep as _lockstep

ALPHA = 1e-3  # the family-wise significance of each check call (Bonferroni over its tests)


@dataclass
class Message:
    """One message received by ``party``: ``values`` (int64, flat copy) for tensors, ``obj`` (pickled bytes) for
    objects."""

    party: int
    channel: str  # "online" | "dealer" | "mpi"
    op: str
    scope: str
    origin: str  # "ring" | "bits" | "reveal" | "request" | "object"
    src: int | None
    dtype: str
    shape: tuple
    values: torch.Tensor | None = None
    obj: bytes | None = None
    label: str = ""
    scale: int | None = None  # a plaintext opening's fixed-point scale (its encoder's)

    def key(self) -> tuple:
        """What must not depend on secrets: the message's place and form."""
        return (self.party, self.channel, self.op, self.scope, self.origin, self.src, self.dtype, self.shape)

    def load(self):
        return pickle.loads(self.obj) if self.obj is not None else None


@dataclass
class Recorder:
    messages: list[Message] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    opened_files: list[str] = field(default_factory=list)
    link: bytearray = field(default_factory=bytearray)  # bytes received on the dealer link, not yet in messages
    link_party: int | None = None


_REC: Recorder | None = None
_TL = threading.local()  # .depth > 0 inside an audited communicator call: its own torch.distributed calls are
#   recorded at that level (per lockstep branch too: registered with mpcache.mpc.lockstep.SWITCHED below)
_DIST_ORIG: dict = {}  # torch.distributed's receives, while the audit wraps them
_LINK_ORIG: dict = {}  # the dealer link's socket setup (mpcache.mpc.dealer._stream), while the audit wraps it
LINK_BLOCK = 4096  # int64 elements per message of party 0's dealer-link stream (its answers, raw)


def enable() -> Recorder:
    """Start recording in this process (and in processes forked from it): CrypTen's communicator is watched when
    the ledger attaches to it. Idempotent."""
    global _REC
    from . import ledger

    if _REC is None:
        _REC = Recorder()
    if watch not in ledger.ATTACH_HOOKS:
        ledger.ATTACH_HOOKS.append(watch)
    _watch_dist()
    _watch_dealer_link()
    return _REC


def disable() -> None:
    global _REC
    from . import ledger

    _REC = None
    with contextlib.suppress(ValueError):
        ledger.ATTACH_HOOKS.remove(watch)
    if _DIST_ORIG:
        import torch.distributed as dist

        for name, fn in _DIST_ORIG.items():
            setattr(dist, name, fn)
        _DIST_ORIG.clear()
    if _LINK_ORIG:
        from . import dealer

        dealer._stream = _LINK_ORIG.pop("_stream")


@contextlib.contextmanager
def recording():
    """``with recording():`` -- :func:`enable`, then :func:`disable` (tests)."""
    enable()
    try:
        yield
    finally:
        disable()


def take() -> list[Message]:
    """This process's messages so far (and forget them)."""
    if _REC is None:
        return []
    _flush_link()
    out, _REC.messages = _REC.messages, []
    return out


@contextlib.contextmanager
def label(text: str):
    """Label the MPI messages received inside the block (a no-op when the audit is off)."""
    if _REC is None:
        yield
        return
    _REC.labels.append(text)
    try:
        yield
    finally:
        _REC.labels.pop()


def _origin(opened: bool) -> tuple[str, int | None]:
    """(origin, scale) of a value received now, from the protocol functions on the stack: ``get_plain_text`` opens a
    plaintext (with its encoder's scale); an opening (``opened``: an all-reduce's or reduce's result) inside
    CrypTen's ``B2A_single_bit`` is ``x ^ r`` (bits); a share received point to point is a ring element."""
    f = sys._getframe(2)
    for _ in range(48):
        if f is None:
            break
        name = f.f_code.co_name
        if name == "B2A_single_bit" and opened:
            return "bits", None
        if name == "get_plain_text":
            enc = getattr(f.f_locals.get("self"), "encoder", None)
            return "reveal", int(getattr(enc, "scale", 1))
        f = f.f_back
    return "ring", None


def _note(inst, op: str, value, src, group, party: int | None = None) -> None:
    """Record one received ``value`` (a tensor or an object) on CrypTen's communicator ``inst`` (None: not made
    yet). Origin: the dealer's own receives are ``request``s; a compute party's receives on a dealer group are the
    dealer's shares (``ring``); others by the protocol on the stack (:func:`_origin`)."""
    if _REC is None:
        return
    party = inst.get_rank() if party is None else party
    dealer_side = inst is not None and party >= inst.get_world_size()
    channel = "online" if group is None or group is getattr(inst, "main_group", None) else "dealer"
    if dealer_side and _REC.link:
        _flush_link()  # the link's requests so far first: the dealer's record stays in order
    led = getattr(inst, "ledger", None)
    scope = led.path if led is not None else ("dealer" if dealer_side else "setup")
    if not torch.is_tensor(value):
        _REC.messages.append(
            Message(party, channel, op, scope, "object", src, type(value).__name__, (), obj=pickle.dumps(value))
        )
        return
    if dealer_side or channel == "dealer":
        origin, scale = ("setup" if _in_link_setup() else "request" if dealer_side else "ring"), None
    else:
        origin, scale = _origin(op.startswith(("all_reduce", "reduce")))
    v = value.detach()
    _REC.messages.append(
        Message(
            party,
            channel,
            op,
            scope,
            origin,
            src,
            str(v.dtype),
            tuple(v.shape),
            values=v.reshape(-1).cpu().clone(),
            scale=scale,
        )
    )


class _Recorded:
    """A posted receive's request: its tensor is recorded when it is waited on (or first seen completed)."""

    def __init__(self, req, on_done):
        self._req, self._on_done, self._done = req, on_done, False

    def _record(self):
        if not self._done:
            self._done = True
            self._on_done()

    def wait(self, *args, **kwargs):
        out = self._req.wait(*args, **kwargs) if self._req is not None else None
        self._record()
        return out

    def is_completed(self):
        done = self._req.is_completed()
        if done:
            self._record()
        return done

    def __getattr__(self, name):
        return getattr(self._req, name)


def _in_link_setup() -> bool:
    """Whether the dealer link is being set up (:mod:`mpcache.mpc.dealer`: party 0's port and a random token reach
    the dealer over the ttp group): a credential, no data, and different in every run."""
    f = sys._getframe(2)
    for _ in range(16):
        if f is None:
            return False
        if f.f_code.co_name in ("_link_dealer", "_link_party0"):
            return True
        f = f.f_back
    return False


class _RecordedSocket:
    """The dealer link's socket (:mod:`mpcache.mpc.dealer`): every byte received is kept (:func:`_flush_link` turns
    the stream into messages); everything else passes through."""

    def __init__(self, sock):
        import torch.distributed as dist

        self._sock = sock
        if _REC is not None:
            _REC.link_party = dist.get_rank()

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def fileno(self):
        return self._sock.fileno()

    def recv(self, *args, **kwargs):
        data = self._sock.recv(*args, **kwargs)
        if _REC is not None and data:
            _REC.link += data
        return data

    def recv_into(self, buf, *args, **kwargs):
        n = self._sock.recv_into(buf, *args, **kwargs)
        if _REC is not None and n:
            _REC.link += bytes(memoryview(buf).cast("B")[:n])
        return n


def _watch_dealer_link() -> None:
    """Record what travels on the pipelined dealer's own TCP link (:mod:`mpcache.mpc.dealer`: requests to the dealer,
    answers to party 0), by wrapping the socket both ends set up (``dealer._stream``)."""
    if _LINK_ORIG:
        return
    try:
        from . import dealer
    except ImportError:
        return
    orig = getattr(dealer, "_stream", None)
    if orig is None:
        return
    _LINK_ORIG["_stream"] = orig

    def _stream(sock):
        return _RecordedSocket(orig(sock))

    dealer._stream = _stream


def _flush_link() -> None:
    """The dealer-link bytes received so far as messages: on the dealer, one ``request`` per length-prefixed frame
    (its exact bytes); on party 0, its answers' raw int64 elements in blocks of :data:`LINK_BLOCK` (``ring``: each
    a fresh share, uniform)."""
    if _REC is None or not _REC.link:
        return
    from . import dealer

    inst = _crypten_comm()
    party = _REC.link_party
    buf = _REC.link
    if inst is not None and party >= inst.get_world_size():  # the dealer: requests
        header = getattr(dealer, "HEADER", 4)
        while len(buf) >= header:
            n = int.from_bytes(buf[:header], "little")
            if len(buf) < header + n:
                break
            frame = bytes(buf[header : header + n])
            del buf[: header + n]
            _REC.messages.append(
                Message(party, "dealer", "link", "dealer link", "request", 0, "bytes", (n,), obj=frame)
            )
        return
    k = len(buf) // 8 * 8
    v = torch.frombuffer(bytearray(buf[:k]), dtype=torch.int64)
    del buf[:k]
    src = inst.get_ttp_rank() if inst is not None else None
    for block in torch.split(v, LINK_BLOCK):
        _REC.messages.append(
            Message(
                party,
                "dealer",
                "link",
                "dealer link",
                "ring",
                src,
                "torch.int64",
                tuple(block.shape),
                values=block.clone(),  # its own storage: a view would pickle all of ``v`` with every block
            )
        )


def _crypten_comm():
    """CrypTen's live communicator of this process, or None while ``crypten.init`` is still making it."""
    from crypten.communicator.distributed_communicator import DistributedCommunicator as DC

    return DC.instance


def _dist_note(op, tensor, src, group) -> None:
    import torch.distributed as dist

    _note(_crypten_comm(), op, tensor, src, group, party=dist.get_rank())


def _watch_dist() -> None:
    """Record the receives made with torch.distributed directly, outside CrypTen's communicator: the pipelined
    dealer's requests (on the dealer) and answers (on party 0), the dealer's seeds (:mod:`mpcache.mpc.dealer`)."""
    import torch.distributed as dist

    if _DIST_ORIG:
        return
    _DIST_ORIG.update(irecv=dist.irecv, recv=dist.recv)

    def irecv(tensor, *args, **kwargs):
        work = _DIST_ORIG["irecv"](tensor, *args, **kwargs)
        if _REC is None or getattr(_TL, "depth", 0):
            return work
        src, group = (list(args) + [None, None])[:2]
        src, group = kwargs.get("src", src), kwargs.get("group", group)
        return _Recorded(work, lambda: _dist_note("irecv", tensor, src, group))

    def recv(tensor, *args, **kwargs):
        out = _DIST_ORIG["recv"](tensor, *args, **kwargs)
        if _REC is not None and not getattr(_TL, "depth", 0):
            src, group = (list(args) + [None, None])[:2]
            _dist_note("recv", tensor, kwargs.get("src", src), kwargs.get("group", group))
        return out

    dist.irecv, dist.recv = irecv, recv


def _depth_get() -> int:
    return getattr(_TL, "depth", 0)


def _depth_set(v: int) -> None:
    _TL.depth = v


_lockstep.SWITCHED.append((_depth_get, _depth_set))  # a parked branch's depth is its own


@contextlib.contextmanager
def _inside():
    _TL.depth = getattr(_TL, "depth", 0) + 1
    try:
        yield
    finally:
        _TL.depth -= 1


def _audit_class(base):
    """CrypTen's (counting) communicator, recording every value it receives after the transfer (same transfers)."""

    class AuditingCommunicator(base):
        audited = True

        def recv(self, tensor, src=None):
            with _inside():
                out = super().recv(tensor, src)
            _note(self, "recv", out if out is not None else tensor, src, None)
            return out

        def irecv(self, tensor, src=None):
            with _inside():
                req = super().irecv(tensor, src)
            return _Recorded(req, lambda: _note(self, "irecv", tensor, src, None))

        def all_reduce(self, input, op=None, batched=False):
            with _inside():
                if op is None:
                    out = super().all_reduce(input, batched=batched)
                else:
                    out = super().all_reduce(input, op=op, batched=batched)
            name = "all_reduce" if op is None or "SUM" in str(op) else f"all_reduce.{str(op).rsplit('.', 1)[-1]}"
            for t in out if batched else [out]:
                _note(self, name, t, None, None)
            return out

        def reduce(self, input, dst, op=None, batched=False):
            with _inside():
                if op is None:
                    out = super().reduce(input, dst, batched=batched)
                else:
                    out = super().reduce(input, dst, op=op, batched=batched)
            if self.get_rank() == dst:
                for t in out if batched else [out]:
                    _note(self, "reduce", t, None, None)
            return out

        def gather(self, tensor, dst):
            with _inside():
                out = super().gather(tensor, dst)
            if self.get_rank() == dst:
                for j, t in enumerate(out):
                    if j != dst:
                        _note(self, "gather", t, j, None)
            return out

        def all_gather(self, tensor):
            with _inside():
                out = super().all_gather(tensor)
            for j, t in enumerate(out):
                if j != self.get_rank():
                    _note(self, "all_gather", t, j, None)
            return out

        def broadcast(self, input, src, group=None, batched=False):
            with _inside():
                out = super().broadcast(input, src, group=group, batched=batched)
            if self.get_rank() != src:
                for t in out if batched else [out]:
                    _note(self, "broadcast", t, src, group)
            return out

        def scatter(self, scatter_list, src, size=None, device=None):
            with _inside():
                out = super().scatter(scatter_list, src, size=size, device=device)
            if self.get_rank() != src:
                _note(self, "scatter", out, src, None)
            return out

        def recv_obj(self, src, group=None):
            with _inside():
                obj = super().recv_obj(src, group=group)
            _note(self, "recv_obj", obj, src, group)
            return obj

        def broadcast_obj(self, obj, src, group=None):
            with _inside():
                out = super().broadcast_obj(obj, src, group=group)
            if self.get_rank() != src:
                _note(self, "broadcast_obj", out, src, group)
            return out

    return AuditingCommunicator


def watch(inst) -> None:
    """Record what CrypTen's live communicator ``inst`` receives (re-classes the instance once; a ledger hook)."""
    if not getattr(type(inst), "audited", False):
        inst.__class__ = _audit_class(type(inst))


def watch_dealer() -> None:
    """In the dealer's process, before CrypTen's dealer starts: record what it receives (its communicator is made
    inside the dealer, by ``crypten.init``, so the hook is on the communicator's creation)."""
    enable()
    from . import compat

    compat.crypten()  # CrypTen through the compatibility layer, before its communicator module is touched
    from crypten.communicator.distributed_communicator import DistributedCommunicator as DC

    if getattr(DC, "_audit_hooked", False):
        return
    orig = DC.initialize.__func__

    def initialize(cls, rank, world_size, init_ttp=False):
        orig(cls, rank, world_size, init_ttp=init_ttp)
        watch(cls.instance)

    DC.initialize = classmethod(initialize)
    DC._audit_hooked = True


def serve_dealer_audited(out_dir):
    """A ``serve_dealer(sess)`` that records the dealer's received messages and writes them to
    ``out_dir/rank{r}.pt`` when the dealer stops (for :mod:`mpcache.mpc.local_parties`, whose dealer returns
    nothing)."""

    from .session import serve_dealer  # the real one (this wrapper may replace the module's attribute)

    def serve(sess):
        watch_dealer()
        serve_dealer(sess)
        dump(out_dir, sess.rank)

    return serve


# ---- the session's MPI communicator --------------------------------------------------------------------------------
class AuditedMPI:
    """An mpi4py communicator whose object-level receives are recorded (channel ``mpi``, the current
    :func:`label`); everything else (buffer calls, Barrier, ranks) passes through unchanged."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _rec(self, op, obj, src):
        if _REC is None:
            return
        lab = _REC.labels[-1] if _REC.labels else ""
        _REC.messages.append(
            Message(
                self._comm.Get_rank(),
                "mpi",
                op,
                "",
                "object",
                src,
                type(obj).__name__,
                (),
                obj=pickle.dumps(obj),
                label=lab,
            )
        )

    def send(self, obj, dest, tag=0):
        return self._comm.send(obj, dest=dest, tag=tag)

    def recv(self, buf=None, source=None, tag=None, status=None):
        from mpi4py import MPI

        st = status if status is not None else MPI.Status()
        source = MPI.ANY_SOURCE if source is None else source
        out = self._comm.recv(buf, source=source, tag=MPI.ANY_TAG if tag is None else tag, status=st)
        self._rec("recv", out, st.Get_source())
        return out

    def sendrecv(self, sendobj, dest, sendtag=0, recvbuf=None, source=None, recvtag=None, status=None):
        from mpi4py import MPI

        st = status if status is not None else MPI.Status()
        source = MPI.ANY_SOURCE if source is None else source
        recvtag = MPI.ANY_TAG if recvtag is None else recvtag
        out = self._comm.sendrecv(sendobj, dest, sendtag, recvbuf, source, recvtag, st)
        self._rec("sendrecv", out, st.Get_source())
        return out

    def bcast(self, obj, root=0):
        out = self._comm.bcast(obj, root=root)
        if self._comm.Get_rank() != root:
            self._rec("bcast", out, root)
        return out

    def gather(self, sendobj, root=0):
        out = self._comm.gather(sendobj, root=root)
        if self._comm.Get_rank() == root:
            for j, o in enumerate(out):
                if j != root:
                    self._rec("gather", o, j)
        return out

    def allgather(self, sendobj):
        out = self._comm.allgather(sendobj)
        for j, o in enumerate(out):
            if j != self._comm.Get_rank():
                self._rec("allgather", o, j)
        return out

    def scatter(self, sendobj, root=0):
        out = self._comm.scatter(sendobj, root=root)
        if self._comm.Get_rank() != root:
            self._rec("scatter", out, root)
        return out

    def reduce(self, sendobj, op=None, root=0):
        out = self._comm.reduce(sendobj, root=root) if op is None else self._comm.reduce(sendobj, op=op, root=root)
        if self._comm.Get_rank() == root:
            self._rec("reduce", out, None)
        return out

    def allreduce(self, sendobj, op=None):
        out = self._comm.allreduce(sendobj) if op is None else self._comm.allreduce(sendobj, op=op)
        self._rec("allreduce", out, None)
        return out


def wrap_mpi(comm):
    """``comm`` recorded when the audit is on (else ``comm`` itself); None stays None (the dealer)."""
    if comm is None or _REC is None or isinstance(comm, AuditedMPI):
        return comm
    return AuditedMPI(comm)


# ---- files ------------------------------------------------------------------------------------------------------
def watch_files(root) -> None:
    """Record every Python-level ``open`` of a path under ``root`` (``sys.addaudithook``; for this process's life).
    Native readers (the safetensors library) open files out of its reach: :func:`mpcache.model.weights.weight_reads`
    records those reads."""
    rec = enable()
    root = os.path.realpath(os.fspath(root))

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                p = os.path.realpath(os.fsdecode(args[0]))
            except (TypeError, ValueError):
                return
            if p == root or p.startswith(root + os.sep):
                rec.opened_files.append(p)

    sys.addaudithook(hook)


# ---- saving ------------------------------------------------------------------------------------------------------
def dump(out_dir, rank: int, **extra) -> str:
    """Write this process's record to ``out_dir/rank{rank}.pt``: messages, opened files, the weight sources read
    (:func:`mpcache.model.weights.weight_reads`) and ``extra``."""
    from ..model.weights import weight_reads

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    _flush_link()
    rec = _REC or Recorder()
    torch.save(
        {
            "rank": rank,
            "messages": [m.__dict__ for m in rec.messages],
            "opened_files": list(rec.opened_files),
            "weight_reads": weight_reads(),
            **extra,
        },
        path + ".tmp",
    )
    os.replace(path + ".tmp", path)
    return path


def load(path) -> dict:
    """A :func:`dump` file, its messages as :class:`Message`."""
    d = torch.load(path, weights_only=False)
    d["messages"] = [Message(**m) for m in d["messages"]]
    return d


# ---- statistics --------------------------------------------------------------------------------------------------
def _chi2_sf(x, df):
    """P(chi2_df >= x) (tensors or numbers): the regularised upper incomplete gamma Q(df/2, x/2); df <= 0 gives 1."""
    x = torch.as_tensor(x, dtype=torch.float64)
    df = torch.as_tensor(df, dtype=torch.float64)
    p = torch.special.gammaincc(df.clamp(min=1) / 2, x.clamp(min=0) / 2)
    return torch.where(df > 0, p, torch.ones_like(p))


def _bins_for(n: int, cap: int = 8) -> int:
    """Top bits per histogram: at least 5 expected per bin, at most ``cap`` bits (0: too few values)."""
    return max(0, min(cap, math.floor(math.log2(n / 5)) if n >= 10 else 0))


def _top(v: torch.Tensor, at: int, k: int) -> torch.Tensor:
    """The ``k`` bits below bit ``at`` (exclusive): the top k bits of the 64-bit word (at=64) or of a lane (32)."""
    return (v >> (at - k)) & ((1 << k) - 1)


def _p_small(m, n, bits: int):
    """P(the smallest |v| of n uniform signed ``bits``-bit words is <= m): the magnitude test's p-value (tensors)."""
    q = ((2 * m + 1) / 2.0**bits).clamp(max=1.0)
    return torch.where(q >= 1, torch.ones_like(q), -torch.expm1(n * torch.log1p(-q.clamp(max=1 - 1e-16))))


@dataclass
class _Batch:
    """Many messages' values in one flat tensor, message after message: ``v`` (int64), ``seg`` (the message of each
    value), ``n`` (values per message)."""

    v: torch.Tensor
    seg: torch.Tensor
    n: torch.Tensor

    @staticmethod
    def of(parts: list[torch.Tensor]) -> _Batch:
        n = torch.tensor([t.numel() for t in parts], dtype=torch.int64)
        v = torch.cat([t.reshape(-1).to(torch.int64) for t in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        return _Batch(v, torch.repeat_interleave(torch.arange(len(parts)), n), n)

    def keep(self, mask: torch.Tensor) -> _Batch:
        seg = self.seg[mask]
        return _Batch(self.v[mask], seg, torch.bincount(seg, minlength=len(self.n)))

    def distinct(self) -> _Batch:
        """Each message's distinct values (a share repeated inside a message is one sample, not two)."""
        parts = torch.split(self.v, self.n.tolist())
        return _Batch.of([torch.unique(t) if t.numel() > 1 else t for t in parts])


def _hist256(b: _Batch, at: int) -> torch.Tensor:
    """(messages x 256): each message's histogram of the top 8 bits below bit ``at`` (64: the word, 32: its low
    lane)."""
    S = len(b.n)
    cells = b.seg * 256 + ((b.v >> (at - 8)) & 255)
    return torch.bincount(cells, minlength=S * 256).reshape(S, 256).double()


def _groups(ks: torch.Tensor):
    """(k, the messages with k top bits) for every k > 0 present."""
    return [(k, torch.nonzero(ks == k).reshape(-1)) for k in sorted(set(ks.tolist()) - {0})]


def _collapse(h: torch.Tensor, k: int) -> torch.Tensor:
    """256-bin histograms (rows) merged to their top ``k`` bits."""
    return h.reshape(h.shape[0], 1 << k, 256 >> k).sum(-1)


def _mag(x: torch.Tensor) -> torch.Tensor:
    """|x| of signed words, as ``x`` for x >= 0 and ``~x = -x - 1`` below (no overflow at -2^63; 1 ulp low for
    negatives, which only makes the magnitude test more lenient by a factor (m + 1) / m)."""
    return x ^ (x >> 63)


def _magnitude_pvalues(b: _Batch, public: torch.Tensor) -> list[tuple[int, str, float]]:
    """(message, test, p-value): the smallest |v| of each message's non-public values, as a 64-bit word and as two
    32-bit lanes, against n uniform draws (an unmasked fixed-point value is tiny next to 2^63; duplicates only
    make it conservative)."""
    S = len(b.n)
    if not S:
        return []
    top = torch.iinfo(torch.int64).max
    lanes = torch.minimum(_mag((b.v << 32) >> 32), _mag(b.v >> 32))
    m64 = torch.full((S,), top).scatter_reduce_(0, b.seg, _mag(b.v).masked_fill_(public, top), "amin")
    m32 = torch.full((S,), top).scatter_reduce_(0, b.seg, lanes.masked_fill_(public, top), "amin")
    n = (b.n - torch.bincount(b.seg[public], minlength=S)).double()
    p64, p32 = _p_small(m64.double(), n, 64).tolist(), _p_small(m32.double(), 2 * n, 32).tolist()
    out = []
    for i, ni in enumerate(n.tolist()):
        if ni > 0:
            out += [(i, "min|v| (64-bit)", p64[i]), (i, "min|v| (32-bit lanes)", p32[i])]
    return out


def _chi_pvalues(b: _Batch) -> list[tuple[int, str, float]]:
    """(message, test, p-value): chi-squares of the top bits of the word and of its low lane of each message's
    values (as many bins as 5 expected per bin allow, up to 256)."""
    ks = torch.tensor([_bins_for(int(x)) for x in b.n], dtype=torch.int64)
    out = []
    for at, what in ((64, "top"), (32, "low-lane top")):
        h256 = _hist256(b, at)
        for k, idx in _groups(ks):
            h = _collapse(h256[idx], k)
            e = h.sum(1, keepdim=True) / (1 << k)
            ps = _chi2_sf(((h - e) ** 2 / e).sum(1), (1 << k) - 1).tolist()
            out += [(int(i), f"{what} {k} bits chi2", pv) for i, pv in zip(idx.tolist(), ps)]
    return out


def _two_sample_pvalues(a: _Batch, b: _Batch) -> list[tuple[int, str, float]]:
    """(message, test, p-value): per aligned message a two-sample chi-square (2 x bins contingency) of the top bits
    of the word and of its low lane, bins from the smaller sample."""
    ks = torch.tensor([_bins_for(int(min(x, y))) for x, y in zip(a.n, b.n)], dtype=torch.int64)
    out = []
    for at, what in ((64, "top"), (32, "low-lane top")):
        ha, hb = _hist256(a, at), _hist256(b, at)
        for k, idx in _groups(ks):
            ps = _contingency(_collapse(ha[idx], k), _collapse(hb[idx], k)).tolist()
            out += [(int(i), f"{what} {k} bits two-sample chi2", pv) for i, pv in zip(idx.tolist(), ps)]
    return out


def _contingency(ha: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """Row-wise two-sample chi-square p-values of histograms ``ha``, ``hb`` (rows x bins; empty bins dropped)."""
    tot = ha + hb
    na, nb = ha.sum(-1, keepdim=True), hb.sum(-1, keepdim=True)
    ea, eb = tot * na / (na + nb).clamp(min=1), tot * nb / (na + nb).clamp(min=1)
    nz = tot > 0
    term = torch.where(nz, (ha - ea) ** 2 / ea.clamp(min=1e-300) + (hb - eb) ** 2 / eb.clamp(min=1e-300), 0.0)
    return _chi2_sf(term.sum(-1), nz.sum(-1) - 1)


def _chi_uniform(cells: torch.Tensor, k: int) -> float:
    obs = torch.bincount(cells, minlength=1 << k).double()
    e = obs.sum() / (1 << k)
    return float(_chi2_sf(((obs - e) ** 2 / e).sum(), (1 << k) - 1))


def bits_tests(v: torch.Tensor) -> list[tuple[str, float]]:
    """(test, p-value) of 'uniform over {0, 1}'."""
    if bool(((v != 0) & (v != 1)).any()):
        return [("values in {0,1}", 0.0)]
    return [("ones chi2", _chi_uniform(v, 1))] if v.numel() >= 10 else []


@dataclass
class Report:
    """What a check found: ``flagged`` (empty = passed), the number of tests, the per-test threshold, the smallest
    p-value seen, and how many received elements were public constants (identical in every run, not tested)."""

    name: str
    n_tests: int = 0
    threshold: float = 0.0
    min_p: float = 1.0
    flagged: list[str] = field(default_factory=list)
    public_elements: int = 0
    tested_elements: int = 0

    @property
    def ok(self) -> bool:
        return not self.flagged

    def __str__(self) -> str:
        head = (
            f"{self.name}: {self.n_tests} tests over {self.tested_elements} received values (distinct ring "
            f"elements, every bit) ({self.public_elements} public constants set aside), Bonferroni threshold "
            f"{self.threshold:.2e} per test, min p {self.min_p:.3g}"
        )
        return head + ("" if self.ok else f"; FLAGGED {len(self.flagged)}:\n  " + "\n  ".join(self.flagged[:20]))


def _finish(rep: Report, tests: list[tuple[str, float]], alpha: float) -> Report:
    rep.n_tests = len(tests)
    rep.threshold = alpha / max(len(tests), 1)
    rep.min_p = min((p for _, p in tests), default=1.0)
    rep.flagged = [f"{what}: p = {p:.3g}" for what, p in tests if p < rep.threshold]
    return rep


def _where(m: Message, i: int) -> str:
    return f"party {m.party} msg {i} {m.channel}/{m.op} [{m.scope}] {m.origin} {m.shape}"


def _tested(run: list[Message], origin: str) -> list[tuple[int, Message]]:
    """(index, message) of the values of ``origin`` received inside the MPC (the dealer's requests, objects and
    plaintext openings are checked elsewhere)."""
    return [(i, m) for i, m in enumerate(run) if m.values is not None and m.origin == origin and m.values.numel()]


CAP = 4096  # values per message in the chi-squares (distinct, non-public; the magnitude test reads them all)


@dataclass
class _Prepared:
    """One run's ring messages for the checks: all values (``full``) with the public constants marked (``public``:
    bit-identical in every run compared -- different secrets, fresh randomness -- so a function of public inputs
    alone, e.g. a party's share of a public constant sent as is by replicated sharing), and per message at most
    :data:`CAP` of its distinct non-public values (``sample``; a share repeated inside a message, as in
    ``stack([t, t])``, is one sample, not two)."""

    ms: list[tuple[int, Message]]
    full: _Batch
    public: torch.Tensor
    sample: _Batch


def _prepare(runs: list[list[Message]]) -> list[_Prepared]:
    """:class:`_Prepared` of every run; public constants are the elements equal in all of ``runs`` (which must have
    the same message sequence when there are several)."""
    mss = [_tested(run, "ring") for run in runs]
    fulls = [_Batch.of([m.values for _, m in ms]) for ms in mss]
    public = torch.zeros_like(fulls[0].v, dtype=torch.bool)
    if len(runs) > 1 and all(f.v.numel() == fulls[0].v.numel() for f in fulls):
        public = torch.ones_like(fulls[0].v, dtype=torch.bool)
        for f in fulls[1:]:
            public &= f.v == fulls[0].v
    out = []
    for ms, f in zip(mss, fulls):
        kept = f.keep(~public)
        parts = torch.split(kept.v, kept.n.tolist())
        sample = _Batch.of([torch.unique(t[:CAP]) if t.numel() > 1 else t for t in parts])
        out.append(_Prepared(ms, f, public, sample))
    return out


def _masked(run: list[Message], prep: _Prepared, alpha: float) -> Report:
    rep = Report("masked (uniform) received values")
    rep.public_elements = int(prep.public.sum())
    rep.tested_elements = prep.full.v.numel() - rep.public_elements
    ms = prep.ms
    tests = [(f"{_where(ms[j][1], ms[j][0])}: {t}", p) for j, t, p in _magnitude_pvalues(prep.full, prep.public)]
    tests += [(f"{_where(ms[j][1], ms[j][0])}: {t}", p) for j, t, p in _chi_pvalues(prep.sample)]
    parties = torch.tensor([m.party for _, m in ms], dtype=torch.int64)
    for party in sorted(set(parties.tolist())):
        v = prep.sample.v[parties[prep.sample.seg] == party]
        if v.numel() >= 10:
            tests.append((f"party {party} all ring values: top 8 bits chi2", _chi_uniform(_top(v, 64, 8), 8)))
            tests.append((f"party {party} all ring values: low-lane top 8 bits chi2", _chi_uniform(_top(v, 32, 8), 8)))
    pooled: dict[int, list] = {}
    for i, m in _tested(run, "bits"):  # one bit: every element is a sample (equal across runs half the time)
        v = m.values.to(torch.int64)
        rep.tested_elements += v.numel()
        tests += [(f"{_where(m, i)}: {t}", p) for t, p in bits_tests(v)]
        pooled.setdefault(m.party, []).append(v)
    for party, vs in pooled.items():
        tests += [(f"party {party} all bits openings: {t}", p) for t, p in bits_tests(torch.cat(vs))]
    return _finish(rep, tests, alpha)


def check_masked(run: list[Message], others: list[list[Message]] = (), alpha: float = ALPHA) -> Report:
    """Every ``ring`` value received is uniform over Z_2^64 and every ``bits`` opening uniform over {0, 1}, at
    family-wise significance ``alpha``: per ring message the magnitude test on all its values and chi-squares on
    (at most :data:`CAP` of) its distinct values, per bits opening a chi-square of its ones, and pooled per party.
    ``others``: runs of the same public setup with other secrets (same message sequence): ring elements identical
    in all of them are public constants, set aside and counted (without ``others``, a replicated 3PC run's shares of
    public constants -- e.g. a public mask's zeros, sent as is -- are flagged: give other runs). Plaintext openings (``reveal``), objects and the
    dealer's requests are not tested here (:func:`check_reveals`, :func:`check_dealer`, :func:`check_mpi`)."""
    others = list(others)
    if others and check_same_structure([run, *others]):
        rep = Report("masked (uniform) received values")
        rep.flagged = ["the runs' message sequences differ (check_same_structure)"]
        return rep
    return _masked(run, _prepare([run, *others])[0], alpha)


def check_same_structure(runs: list[list[Message]]) -> list[str]:
    """Problems where the runs' message sequences differ in place or form (channel, op, scope, origin, source,
    dtype, shape): a shape or a message that depends on the secrets."""
    bad = []
    ref = [m.key() for m in runs[0]]
    for r, run in enumerate(runs[1:], start=1):
        keys = [m.key() for m in run]
        if len(keys) != len(ref):
            bad.append(f"run {r}: {len(keys)} messages, run 0: {len(ref)}")
        for i, (a, b) in enumerate(zip(ref, keys)):
            if a != b:
                bad.append(f"run {r} message {i}: {b} != run 0's {a}")
                break
    return bad


def _independent(a: list[Message], b: list[Message], pa: _Prepared, pb: _Prepared, alpha: float, name: str) -> Report:
    rep = Report(f"independent of the secrets{(' (' + name + ')') if name else ''}")
    rep.public_elements = int(pa.public.sum())
    rep.tested_elements = pa.sample.v.numel() + pb.sample.v.numel()
    ms = pa.ms
    tests = [(f"{_where(ms[j][1], ms[j][0])}: {t}", p) for j, t, p in _two_sample_pvalues(pa.sample, pb.sample)]
    parties = torch.tensor([m.party for _, m in ms], dtype=torch.int64)
    for party in sorted(set(parties.tolist())):
        u, w = pa.sample.v[parties[pa.sample.seg] == party], pb.sample.v[parties[pb.sample.seg] == party]
        if min(u.numel(), w.numel()) >= 10:
            for at, what in ((64, "top"), (32, "low-lane top")):
                hu, hw = (torch.bincount(_top(x, at, 8), minlength=256).double() for x in (u, w))
                p = float(_contingency(hu, hw))
                tests.append((f"party {party} all ring values: {what} 8 bits two-sample chi2", p))
    for i, x in _tested(a, "bits"):
        u, w = x.values.to(torch.int64), b[i].values.to(torch.int64)
        if min(u.numel(), w.numel()) >= 10 and not bool(((u | w) & ~1).any()):
            hu, hw = (torch.bincount(t, minlength=2).double() for t in (u, w))
            p = float(_contingency(hu, hw))
            tests.append((f"{_where(x, i)}: ones two-sample chi2", p))
    return _finish(rep, tests, alpha)


def check_independent(a: list[Message], b: list[Message], alpha: float = ALPHA, name: str = "") -> Report:
    """Two runs with different secrets (same public setup and message sequence, :func:`check_same_structure`): per
    aligned ``ring`` message a two-sample chi-square of the top bits of the word and of its low lane (at most
    :data:`CAP` distinct values each; public constants -- identical in both runs -- set aside), per ``bits``
    opening of the ones' count, and pooled per party. Distributions that differ between the runs are flagged."""
    if check_same_structure([a, b]):
        rep = Report(f"independent of the secrets{(' (' + name + ')') if name else ''}")
        rep.flagged = ["the runs' message sequences differ (check_same_structure)"]
        return rep
    pa, pb = _prepare([a, b])
    return _independent(a, b, pa, pb, alpha, name)


def check_runs(runs: list[list[Message]], alpha: float = ALPHA) -> list[Report]:
    """Every check of several runs of one public setup with different secrets, sharing one family-wise ``alpha``:
    the same message sequence, :func:`check_masked` of every run (public constants: the elements identical in all
    runs) and :func:`check_independent` of run 0 against each other run. One report per check (the first names a
    structural difference, if any)."""
    bad = check_same_structure(runs)
    if bad:
        rep = Report("same message sequence")
        rep.flagged = bad
        return [rep]
    preps = _prepare(runs)
    each = alpha / (2 * len(runs) - 1)
    reps = [_masked(run, prep, each) for run, prep in zip(runs, preps)]
    reps += [_independent(runs[0], runs[j], preps[0], preps[j], each, f"run 0 vs run {j}") for j in range(1, len(runs))]
    return reps


def decode_tokens(messages: list[Message]) -> list[int]:
    """The token ids of the ``reveal`` messages (each decoded at its encoder's scale)."""
    return [
        round(float(m.values.reshape(-1)[0]) / (m.scale or 1))
        for m in messages
        if m.origin == "reveal" and m.values is not None
    ]


def check_reveals(messages: list[Message], tokens: list[int], client: int = 1) -> list[str]:
    """The plaintext openings (``reveal``) are exactly ``tokens``, each a single value opened to the client only, in
    a ``reveal`` scope; any other plaintext opening, at any party, is a problem."""
    bad = []
    rev = [m for m in messages if m.origin == "reveal"]
    for m in rev:
        if m.party != client:
            bad.append(f"party {m.party} received a plaintext opening {m.op} [{m.scope}] {m.shape}")
        elif m.op != "reduce" or "reveal" not in m.scope.split("/") or m.values is None or m.values.numel() != 1:
            bad.append(f"the client received a plaintext opening that is not one token: {m.op} [{m.scope}] {m.shape}")
    got = decode_tokens([m for m in rev if m.party == client])
    if got != list(tokens):
        bad.append(f"the client's plaintext openings decode to {got}, the generated tokens are {list(tokens)}")
    return bad


def _payload(m: Message) -> bytes:
    """A received message's exact bytes (a tensor's, or an object's pickle)."""
    if m.obj is not None:
        return m.obj
    return m.values.contiguous().numpy().tobytes() if m.values is not None else b""


def _unpickle(b: bytes):
    from .dealer import POOL_FRAME

    if b[:1] == POOL_FRAME:  # a pooled batch: b"P" + its size + the tuple's request
        b = b[5:]
    try:
        return pickle.loads(b)
    except Exception:  # noqa: BLE001 - a raw frame (e.g. the link's b"terminate")
        return b


def dealer_requests(messages: list[Message], dealer: int) -> list:
    """What the dealer was asked, decoded: each frame of the pipelined dealer's link and each int8 payload of a
    gloo request unpickled (:mod:`mpcache.mpc.dealer`), each object it received (CrypTen's stock requests)."""
    out = []
    for m in messages:
        if m.party != dealer or m.origin == "setup":
            continue
        if m.obj is not None:
            out.append(_unpickle(m.obj))
        elif m.values is not None and m.values.dtype == torch.int8:
            out.append(_unpickle(_payload(m)))
    return out


def _has_tensor(x) -> bool:
    if torch.is_tensor(x):
        return True
    if isinstance(x, dict):
        return any(_has_tensor(k) or _has_tensor(v) for k, v in x.items())
    if isinstance(x, (list, tuple, set)):
        return any(_has_tensor(v) for v in x)
    return False


def check_dealer(runs: list[list[Message]], dealer: int) -> list[str]:
    """The dealer receives public requests only: byte for byte the same in every run (different secrets), and no
    tensor inside any request (sizes, op names, fixed-operand recipes). The link's setup (party 0's port and a random
    token, ``setup``) differs by design and is not compared."""
    bad = []
    seqs = [
        [(m.op, m.src, m.dtype, m.shape, _payload(m)) for m in run if m.party == dealer and m.origin != "setup"]
        for run in runs
    ]
    for r, s in enumerate(seqs[1:], start=1):
        if s != seqs[0]:
            i = next((i for i, (x, y) in enumerate(zip(seqs[0], s)) if x != y), min(len(s), len(seqs[0])))
            bad.append(
                f"run {r}: the dealer's received bytes differ from run 0's at message {i} ({len(s)} vs {len(seqs[0])})"
            )
    for r, run in enumerate(runs):
        reqs = dealer_requests(run, dealer)
        if any(_has_tensor(q) for q in reqs):
            bad.append(f"run {r}: a request to the dealer holds a tensor")
        setup = [m for m in run if m.party == dealer and m.origin == "setup"]
        if any(m.values is None or m.values.numel() > 2 for m in setup):
            bad.append(f"run {r}: the dealer link's setup carried more than a port and a token")
    return bad


def check_mpi(messages: list[Message], allowed: set[str]) -> list[str]:
    """Every MPI message carries a label in ``allowed``."""
    return [
        f"party {m.party} received an MPI {m.op} from {m.src} labelled {m.label!r} ({m.dtype})"
        for m in messages
        if m.channel == "mpi" and m.label not in allowed
    ]
