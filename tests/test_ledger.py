"""The communicator-level counting rules of the cost ledger, on a fake transport (no processes)."""
import torch

from mpcache.mpc.ledger import CostLedger, _counting_communicator_class


class FakeComm:
    main_group = object()

    def __init__(self, rank=0, n=2):
        self.rank, self.n = rank, n

    def get_rank(self):
        return self.rank

    def send(self, t, dst): pass
    def recv(self, t, src=None): return t
    def isend(self, t, dst): pass
    def irecv(self, t, src=None): pass
    def all_reduce(self, x, op=None, batched=False): return x
    def reduce(self, x, dst, op=None, batched=False): return x
    def broadcast(self, x, src, group=None, batched=False): return x
    def send_obj(self, obj, dst, group=None): pass
    def recv_obj(self, src, group=None): return "obj"


def make(rank=0, n=2):
    cls = _counting_communicator_class(FakeComm)
    cls._n = lambda self, group=None: self.n
    c = cls(rank, n)
    c.ledger = CostLedger(rank, n)
    return c


T = torch.zeros(10, dtype=torch.long)      # 80 bytes


def test_collectives_and_rounds():
    c = make(n=3)
    with c.ledger.scope("decode"), c.ledger.scope("L0"):
        c.all_reduce(T)                    # 1 round, (n-1) x 80 each way
        c.all_reduce([T, T], batched=True)  # batched: 1 round
    t = c.ledger.totals("decode")
    assert t == {"bytes_sent": 2 * 80 + 2 * 160, "bytes_recv": 2 * 80 + 2 * 160, "rounds": 2, "calls": 2}


def test_posted_irecvs_are_one_round():
    c = make(n=3)
    for _ in range(2):                     # replicated resharing of two tensors: isend, irecv, isend, irecv
        c.isend(T, 1)
        c.irecv(T, 2)
    assert c.ledger.totals()["rounds"] == 1
    c.ledger._irecv_run = False          # the protocol waited: the next posted irecv is a new exchange
    c.irecv(T, 2)
    assert c.ledger.totals()["rounds"] == 2
    c.recv(T, 1)                           # a later blocking receive is a new round
    assert c.ledger.totals()["rounds"] == 3


def test_waiting_ends_an_irecv_run():
    c = make(n=3)
    req = c.irecv(T, 2)
    req._work = None                     # the fake transport has no request object
    req.wait()
    c.irecv(T, 2)
    assert c.ledger.totals()["rounds"] == 2


def test_reduce_and_broadcast_directions():
    src, other = make(rank=1), make(rank=0)
    src.reduce(T, dst=1)
    other.reduce(T, dst=1)
    assert src.ledger.totals()["bytes_recv"] == 80 and src.ledger.totals()["rounds"] == 1
    assert other.ledger.totals()["bytes_sent"] == 80 and other.ledger.totals()["rounds"] == 0
    b = make(rank=0)
    b.broadcast(T, src=0, group=object())  # not the main group: dealer traffic
    assert b.ledger.totals(kind="dealer")["bytes_sent"] == 80 and b.ledger.totals(kind="online")["calls"] == 0


def test_scopes_nest_and_time():
    L = CostLedger()
    with L.scope("prefill"), L.scope("L1"):
        L.record(sent=5, rounds=1)
    with L.scope("token/0"):
        L.record(sent=7)
    assert L.totals("prefill")["bytes_sent"] == 5 and L.totals("token")["bytes_sent"] == 7
    assert L.totals("prefill/L1")["rounds"] == 1 and "prefill/L1" in L.seconds
    assert L.to_dict()["counts"][0]["scope"] == "prefill/L1"
