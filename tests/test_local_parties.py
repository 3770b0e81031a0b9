"""The multi-party harness of the protocol tests (mpcache/mpc/local_parties.py): every party runs, every party's
result and ledger come back, and any party's failure or hang fails the caller, in bounded time."""

from __future__ import annotations

import os
import time

import pytest
import torch

from mpcache.mpc.local_parties import Parties, PartyFailure, run_parties

pytest_plugins = ["pytester"]

SETTINGS = {
    "2pc-tfp": (2, "arithmetic", "tfp"),
    "3pc-replicated": (3, "replicated", "none"),
    "2pc-ttp": (2, "arithmetic", "ttp"),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_party_returns_its_value_and_its_ledger(setting):
    """A product of two shared vectors: every compute party (the dealer, with TTP, is not one) sees its rank and
    the session's setting, opens the same product, and has counted the product's online rounds in its ledger: one
    opening each (2PC Beaver); the resharing, then the ABY3 truncation's message to party 1 (3PC: 1, 2, 1)."""
    n, protocol, provider = SETTINGS[setting]
    x, y = torch.arange(6.0), torch.linspace(-1, 1, 6)

    def fn(sess):
        import crypten

        a, b = crypten.cryptensor(x, src=0), crypten.cryptensor(y, src=1)
        with sess.scope("product"):
            z = a * b
        return sess.rank, sess.n_parties, sess.protocol, sess.provider, z.get_plain_text()

    results = run_parties(n, fn, protocol=protocol, provider=provider, timeout=60)
    assert [r.rank for r in results] == list(range(n))
    for r in results:
        rank, parties, proto, prov, z = r.value
        assert (rank, parties, proto, prov) == (r.rank, n, protocol, provider)
        assert torch.allclose(z, x * y, atol=2**-14)
    rounds = [r.ledger.totals("product", kind="online")["rounds"] for r in results]
    assert rounds == ([1, 2, 1] if protocol == "replicated" else [1, 1])
    if provider == "ttp":  # party 0 asks the dealer for the triple (pipelined: dealer bytes, no round)
        dealer = results[0].ledger.totals("product", kind="dealer")
        assert dealer["bytes_recv"] > 0 and dealer["rounds"] == 0


@pytest.mark.parametrize("setting,rank", [("2pc-tfp", 1), ("3pc-replicated", 2), ("2pc-ttp", 1)])
def test_a_failure_in_a_nonzero_rank_fails_the_call(setting, rank):
    """Party ``rank`` raises while the others wait for it inside an opening: the call raises PartyFailure naming
    that party with its own error (not its peers' consequences first), long before the peers' transport timeout."""
    n, protocol, provider = SETTINGS[setting]

    def fn(sess):
        import crypten

        x = crypten.cryptensor(torch.ones(4), src=0)
        if sess.rank == rank:
            raise ValueError(f"deliberate failure in party {rank}")
        return (x * x).get_plain_text()

    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match=rf"^party {rank} raised ValueError: deliberate failure in party {rank}"):
        run_parties(n, fn, protocol=protocol, provider=provider, timeout=60)
    assert time.monotonic() - t0 < 20


def test_a_party_that_dies_fails_the_call():
    """A party that exits without a result (a crash, ``os._exit``) is named with its exit code."""

    def fn(sess):
        if sess.rank == 1:
            os._exit(3)
        return sess.rank

    with pytest.raises(PartyFailure, match=r"^party 1 exited \(code 3\) without a result"):
        run_parties(2, fn, timeout=60)


def test_a_hang_is_bounded_by_the_timeout():
    """Party 1 hangs (alive, silent) while party 0 has returned: the call fails after ``timeout`` seconds, naming
    the party still inside fn; every party process is gone afterwards."""
    import multiprocessing as mp

    def fn(sess):
        if sess.rank == 1:
            time.sleep(120)
        return sess.rank

    t0 = time.monotonic()
    with pytest.raises(PartyFailure, match=r"not done within 3 s: parties \[1\] still inside fn.*returned: \[0\]"):
        run_parties(2, fn, timeout=3)
    assert 3 <= time.monotonic() - t0 < 15
    assert not [p for p in mp.active_children() if p.name.startswith("party-")]


def test_a_failing_party_fails_the_test(pytester):
    """The harness's purpose, end to end: a test whose party 1 fails an assertion is reported as FAILED by pytest
    (with that party's message), and a test whose parties all pass passes."""
    pytester.makepyfile(
        test_parties="""
        from mpcache.mpc.local_parties import run_parties

        def test_rank_1_disagrees():
            def fn(sess):
                assert sess.rank != 1, "rank 1 disagrees"
                return sess.rank
            run_parties(2, fn, timeout=60)

        def test_all_agree():
            assert [r.value for r in run_parties(2, lambda sess: sess.rank, timeout=60)] == [0, 1]
    """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        ["*party 1 raised AssertionError: rank 1 disagrees*", "FAILED test_parties.py::test_rank_1_disagrees*"]
    )


# ---- Parties: the same parties for many calls ----------------------------------------------------------------
def _pid_and_product(sess, x):
    import crypten

    with sess.scope("product"):
        z = crypten.cryptensor(x, src=0) * crypten.cryptensor(x, src=1)
    return os.getpid(), z.get_plain_text()


def _fail_in(sess, rank):
    if sess.rank == rank:
        raise RuntimeError(f"party {rank} gives up")
    return sess.rank


def test_parties_keep_running_between_calls_and_restart_after_a_failure():
    """Two calls run in the same processes, each with its own ledger; a failing call (party 1 raises) fails with
    PartyFailure and the next call runs in fresh parties; a closure cannot be sent to running parties."""
    x = torch.linspace(-2, 2, 5)
    with Parties(2, timeout=60) as parties:
        first = parties.run(_pid_and_product, x)
        second = parties.run(_pid_and_product, x)
        assert [r.value[0] for r in first] == [r.value[0] for r in second]
        for a, b in zip(first, second):
            assert torch.allclose(b.value[1], x * x, atol=2**-14)
            # per call (online: the dealer's pooled tuples of the first call serve the second, so its traffic differs)
            assert b.ledger.totals(kind="online") == a.ledger.totals(kind="online")
            assert b.ledger.totals("product")["rounds"] > 0
        with pytest.raises(TypeError, match="module-level function"):
            parties.run(lambda sess: sess.rank)
        with pytest.raises(PartyFailure, match="^party 1 raised RuntimeError: party 1 gives up"):
            parties.run(_fail_in, 1)
        assert not parties.running
        again = parties.run(_pid_and_product, x)
        assert {r.value[0] for r in again}.isdisjoint(r.value[0] for r in first)


# ---- the point-to-point transport ------------------------------------------------------------------------------
def _softmax_and_reshare(sess, x):
    import crypten

    from mpcache.mpc import ops

    with sess.scope("softmax"):
        y = ops.softmax(crypten.cryptensor(x, src=0))
    with sess.scope("square"):
        z = crypten.cryptensor(x, src=1).square()
    return y.get_plain_text(), z.get_plain_text()


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pipes_and_gloo_carry_the_same_protocol(setting):
    """The harness's point-to-point pipes and CrypTen's gloo pairs run the same protocol: every party's ledger is
    the same scope by scope (bytes, rounds, kind), and the results agree within twice the softmax's 512-ulp bound
    (each run draws its own masks, so its own truncation errors)."""
    n, protocol, provider = SETTINGS[setting]
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 3
    runs = {}
    for p2p in ("pipes", "gloo"):
        with Parties(n, protocol=protocol, provider=provider, timeout=60, p2p=p2p) as parties:
            runs[p2p] = parties.run(_softmax_and_reshare, x)
    for a, b in zip(runs["pipes"], runs["gloo"]):
        assert {k: {f: v[f] for f in ("bytes_sent", "bytes_recv", "rounds")} for k, v in a.ledger.counts.items()} == {
            k: {f: v[f] for f in ("bytes_sent", "bytes_recv", "rounds")} for k, v in b.ledger.counts.items()
        }
        for u, v in zip(a.value, b.value):
            assert (u - v).abs().max() <= 2 * 512 * 2**-16


def _exchange_big(sess):
    from crypten import communicator as comm

    c, other = comm.get(), 1 - sess.rank
    n = 300_000  # 2.4 MB: more than a pipe holds
    sent = [c.isend(torch.zeros(0, dtype=torch.long), other), c.isend(torch.arange(n) * (sess.rank + 1), other)]
    empty, got = torch.zeros(0, dtype=torch.long), torch.empty(n, dtype=torch.long)
    c.irecv(empty, other).wait()
    c.irecv(got, other).wait()
    for r in sent:
        r.wait()
    c.isend(torch.ones(2, n, dtype=torch.long), other)  # never waited on
    strided = torch.empty(n, 2, dtype=torch.long).t()  # a non-contiguous receive buffer
    c.irecv(strided, other).wait()
    return bool(torch.equal(got, torch.arange(n) * (other + 1))), bool((strided == 1).all())


def test_pipes_exchange_big_messages_both_ways():
    """Both parties send 2.4 MB to each other before receiving (and one send is never waited on): sends complete
    when posted (reading the peer's bytes ahead while the pipe is full), so nothing blocks; empty and strided
    receives work."""
    assert [r.value for r in run_parties(2, _exchange_big, timeout=60)] == [(True, True), (True, True)]
