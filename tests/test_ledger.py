"""The communicator-level counting rules of the cost ledger, on a fake transport (no processes), and the per-round
profile (compute / wait / copy seconds per scope) on a real 2-party run (this file is also that run's job script)."""

import json
import os
import sys
import time

import torch

from mpcache.mpc.ledger import CostLedger, _counting_communicator_class


class FakeComm:
    main_group = object()

    def __init__(self, rank=0, n=2):
        self.rank, self.n = rank, n

    def get_rank(self):
        return self.rank

    def send(self, t, dst):
        pass

    def recv(self, t, src=None):
        return t

    def isend(self, t, dst):
        pass

    def irecv(self, t, src=None):
        pass

    def all_reduce(self, x, op=None, batched=False):
        return x

    def reduce(self, x, dst, op=None, batched=False):
        return x

    def broadcast(self, x, src, group=None, batched=False):
        return x

    def send_obj(self, obj, dst, group=None):
        pass

    def recv_obj(self, src, group=None):
        return "obj"


def make(rank=0, n=2):
    cls = _counting_communicator_class(FakeComm)
    cls._n = lambda self, group=None: self.n
    c = cls(rank, n)
    c.ledger = CostLedger(rank, n)
    return c


T = torch.zeros(10, dtype=torch.long)  # 80 bytes


def test_collectives_and_rounds():
    c = make(n=3)
    with c.ledger.scope("decode"), c.ledger.scope("L0"):
        c.all_reduce(T)  # 1 round, (n-1) x 80 each way
        c.all_reduce([T, T], batched=True)  # batched: 1 round
    t = c.ledger.totals("decode")
    assert t == {"bytes_sent": 2 * 80 + 2 * 160, "bytes_recv": 2 * 80 + 2 * 160, "rounds": 2, "calls": 2}


def test_posted_irecvs_are_one_round():
    c = make(n=3)
    for _ in range(2):  # replicated resharing of two tensors: isend, irecv, isend, irecv
        c.isend(T, 1)
        c.irecv(T, 2)
    assert c.ledger.totals()["rounds"] == 1
    c.ledger._irecv_run = False  # the protocol waited: the next posted irecv is a new exchange
    c.irecv(T, 2)
    assert c.ledger.totals()["rounds"] == 2
    c.recv(T, 1)  # a later blocking receive is a new round
    assert c.ledger.totals()["rounds"] == 3


def test_waiting_ends_an_irecv_run():
    c = make(n=3)
    req = c.irecv(T, 2)
    req._work = None  # the fake transport has no request object
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


def test_profile_splits_wall_time_on_a_fake_transport():
    """Transfers handed to the transport count as waiting; the split is inclusive and sums to the wall time."""

    class SlowComm(FakeComm):
        def recv(self, t, src=None):
            time.sleep(0.02)  # the peer is late
            return t

    cls = _counting_communicator_class(SlowComm)
    cls._n = lambda self, group=None: self.n
    c = cls(0, 2)
    c.ledger = CostLedger(0, 2)
    with c.ledger.scope("token/1"), c.ledger.scope("L0"), c.ledger.scope("norm"):
        c.recv(T, 1)
        sum(range(20000))  # local work
    d = c.ledger.to_dict()
    for p in ("token/1", "token/1/L0", "token/1/L0/norm"):
        w, cp, cm, s = d["wait_seconds"][p], d["copy_seconds"][p], d["compute_seconds"][p], d["seconds"][p]
        assert w >= 0.02 and cp == 0 and cm > 0 and abs(w + cp + cm - s) < 1e-9, (p, w, cp, cm, s)
    from mpcache.mpc.ledger import decode_profile

    rows = {r["op"]: r for r in decode_profile(d)}
    assert rows["norm"]["rounds"] == 1 and rows["norm"]["wait_s"] >= 0.02 and rows["token"]["rounds"] == 1


def test_profile_on_a_real_two_party_run(tmp_path):
    """On a real 2-party CrypTen run (openings over MPI): per scope, compute / wait / copy are non-negative and sum
    to the scope's wall time; a party that sleeps before an opening makes its peer wait (wait, not compute), and
    openings report copies."""
    from tests.conftest import run_mpi

    out = tmp_path / "profile.json"
    run_mpi(2, ["tests/test_ledger.py", str(out)], timeout=300)
    ledgers = json.loads(out.read_text())
    assert len(ledgers) == 2
    for r, d in enumerate(ledgers):
        assert set(d["seconds"]) == set(d["wait_seconds"]) == set(d["copy_seconds"]) == set(d["compute_seconds"])
        for p, s in d["seconds"].items():
            w, cp, cm = d["wait_seconds"][p], d["copy_seconds"][p], d["compute_seconds"][p]
            assert w >= 0 and cp >= 0 and cm >= 0, (r, p, w, cp, cm)
            assert abs(w + cp + cm - s) <= 1e-6 + 1e-3 * s, (r, p, w, cp, cm, s)
        assert d["copy_seconds"]["job/ops"] > 0 and d["wait_seconds"]["job/ops"] >= 0
        # inclusive: a scope holds at least its children's waits and copies
        assert d["wait_seconds"]["job"] >= d["wait_seconds"]["job/ops"] + d["wait_seconds"]["job/sleepy"] - 1e-9
    sleeper, waiter = ledgers[1], ledgers[0]
    assert waiter["wait_seconds"]["job/sleepy"] >= 0.25, waiter["wait_seconds"]["job/sleepy"]
    assert sleeper["compute_seconds"]["job/sleepy"] >= 0.25 and sleeper["wait_seconds"]["job/sleepy"] < 0.2


def _profile_job(out):
    """2 parties: a few secure ops under scopes, then party 1 sleeps 0.3 s before an opening."""
    from mpcache.mpc.session import open_session

    sess = open_session("arithmetic", "tfp", public_info={}, timeout_s=60)
    import crypten  # after the session: mpcache's compatibility shims first

    x = crypten.cryptensor(torch.linspace(-3, 3, 4096), src=0)
    y = crypten.cryptensor(torch.linspace(1, 2, 4096), src=0)
    with sess.scope("job"):
        with sess.scope("ops"):
            for _ in range(3):
                z = (x * y).relu()
            z.get_plain_text()
        with sess.scope("sleepy"):
            if sess.rank == 1:
                time.sleep(0.3)
            (x * y).get_plain_text()
    ledgers = sess.comm.gather(sess.ledger.to_dict(), root=0)
    if sess.rank == 0:
        with open(out, "w") as f:
            json.dump(ledgers, f)
    sess.close()


if __name__ == "__main__":  # the job of test_profile_on_a_real_two_party_run, under mpirun -n 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    from mpcache.mpc.session import run_party

    sys.exit(run_party(_profile_job, sys.argv[1]))
