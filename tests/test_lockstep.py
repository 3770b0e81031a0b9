"""Lockstep branches (mpcache/mpc/lockstep.py) on real parties: independent protocols' openings share exchanges
(rounds = the longest branch, bytes = the sum), results as computed one after the other, costs independent of the
secret inputs, a branch's exception reaches the caller, the dry run counts the same."""

from __future__ import annotations

import pytest
import torch

from mpcache.mpc.local_parties import Parties

ULP = 2.0**-16


@pytest.fixture(scope="module")
def parties():
    with Parties(2, protocol="arithmetic", timeout=300) as p:
        yield p


def _chain(x, k: int):
    """x^(2^k) by k squarings: k rounds."""
    for _ in range(k):
        x = x.square()
    return x


def _cmp(x):
    from mpcache.mpc.compare import _ltz_lanes

    return _ltz_lanes(x, 32, 0)  # 5 rounds in 2PC (bit-sliced, blocks of 4 at this size); 3PC: 8


def _branches(x, enabled: bool):
    from mpcache.mpc.lockstep import parallel

    y = x * 0.5
    a, b, c = parallel(lambda: _chain(y, 3), lambda: _cmp(x), lambda: y * y, enabled=enabled)
    return a, b, c


def _run(sess, x, enabled: bool, branches=None):
    import crypten

    share = crypten.cryptensor(x.float(), src=0)
    with sess.scope("case"):
        outs = (branches or _branches)(share, enabled)
    c = sess.ledger.totals("case", kind="online")
    return [o.get_plain_text().double() for o in outs], c["rounds"], c["bytes_sent"]


def _raises(sess):
    import crypten

    from mpcache.mpc.lockstep import parallel

    x = crypten.cryptensor(torch.ones(4), src=0)

    def bad():
        x.square()
        raise ValueError("branch failed on purpose")

    try:
        parallel(lambda: x.square().square(), bad)
    except ValueError as e:
        return str(e)
    return None


def test_parallel_merges_rounds_keeps_bytes_and_values(parties):
    g = torch.Generator().manual_seed(0)
    x = torch.round((torch.rand(64, generator=g) * 2 - 1) * 2**16) / 2**16
    (a, b, c), rounds, sent = parties.run(_run, x, True)[0].value
    (a2, b2, c2), rounds_seq, sent_seq = parties.run(_run, x, False)[0].value
    y = x.double() * 0.5
    assert (a - y**8).abs().max() <= 64 * ULP and (a2 - y**8).abs().max() <= 64 * ULP
    assert torch.equal(b, (x < 0).double()) and torch.equal(b2, b)
    assert (c - y * y).abs().max() <= 4 * ULP and (c2 - y * y).abs().max() <= 4 * ULP
    assert sent == sent_seq  # the same openings, merged
    assert (rounds, rounds_seq) == (5, 3 + 5 + 1)  # the longest branch (the comparison) vs the sum
    # another secret input: the same schedule, the same costs
    other = parties.run(_run, -x * 0.3, True)[0].value
    assert other[1:] == (rounds, sent)


def test_branch_exception_reaches_the_caller(parties):
    assert parties.run(_raises)[0].value == "branch failed on purpose"


def test_dry_run_counts_the_merged_rounds():
    """The dry run (meta tensors, no traffic) runs the same branches and counts the same rounds and bytes."""
    from mpcache.mpc.dryrun import dry_parties, dry_share

    def fn(sess):
        x = dry_share((64,), precision=16)
        with sess.scope("case"):
            _branches(x, True)

    from mpcache.mpc.config import MpcConfig

    led = dry_parties(fn, MpcConfig())[0]
    rounds = sum(c["rounds"] for c in led["counts"] if c["scope"].startswith("case") and c["kind"] == "online")
    assert rounds == 5


@pytest.mark.parametrize("enabled", [True, False])
def test_nested_or_disabled_runs_in_order(enabled):
    """Outside a session, disabled, or nested inside a branch: the branches simply run one after the other."""
    from mpcache.mpc.lockstep import parallel

    order = []
    out = parallel(lambda: order.append(1) or 1, lambda: order.append(2) or 2, enabled=enabled)
    assert out == [1, 2] and order == [1, 2]


def _nested(x, enabled: bool):
    from mpcache.mpc.lockstep import parallel

    y = x * 0.5

    def inner():
        return parallel(lambda: _chain(y, 3), lambda: _cmp(x), enabled=enabled)

    (a, b), c = parallel(inner, lambda: _chain(y, 2), enabled=enabled)
    return a, b, c


def test_nested_parallel_travels_in_the_outer_exchanges(parties):
    """A branch that runs its own branches (a norm with the next layer's product inside it, run beside an offset:
    Transformer._decode_offset): the inner branches' openings are parked by the enclosing branch as one request, so
    every level shares the outermost exchanges -- rounds max(max(3, 5), 2) = 5 instead of 3 + 5 + 2, the same
    bytes and values."""
    x = torch.round((torch.rand(64, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 2**16) / 2**16
    (a, b, c), rounds, sent = parties.run(_run, x, True, _nested)[0].value
    (a2, b2, c2), rounds_seq, sent_seq = parties.run(_run, x, False, _nested)[0].value
    y = x.double() * 0.5
    assert (a - y**8).abs().max() <= 64 * ULP and (a2 - y**8).abs().max() <= 64 * ULP
    assert torch.equal(b, (x < 0).double()) and torch.equal(b2, b)
    assert (c - y**4).abs().max() <= 16 * ULP and (c2 - y**4).abs().max() <= 16 * ULP
    assert sent == sent_seq
    assert (rounds, rounds_seq) == (5, 3 + 5 + 2)
