"""Open-once masks (mpcache/mpc/masked.py): every value opened once, products of opened values local. Against the
plain products on real 2PC parties (TFP and the dealer), with the exact zeros the activations' muxes rely on, the
stated bytes and rounds, and costs independent of the secrets."""

from __future__ import annotations

import pytest
import torch

from mpcache.mpc.local_parties import Parties
from mpcache.mpc.masked import BIT, RING, answer_numel, closure, dealer_answer, mask_values, mono_reference

ULP = 2.0**-16


def test_closure_and_the_dealers_answer_in_the_clear():
    got = closure([(0, 1), (2, 1, 0), (3, 3), (4,)])
    assert got == ((0, 1), (0, 2), (1, 2), (3, 3), (0, 1, 2))  # sorted by size, repeats kept, singles dropped
    # two parties' draws of a plan with a ring slot (2, 3) and a bit slot (3,) (packed: 1 word), broadcast products
    spec = [((2, 3), RING), ((3,), BIT)]
    subsets = closure([(0, 1), (0, 0)])
    g = torch.Generator().manual_seed(0)
    parts = [[torch.randint(-(2**62), 2**62, (1, 6), generator=g), torch.randint(0, 2**62, (1, 1), generator=g)]]
    parts.append([torch.randint(-(2**62), 2**62, (1, 6), generator=g), torch.randint(0, 2**62, (1, 1), generator=g)])
    total = lambda xs, op=torch.add: op(xs[0], xs[1])
    ring, bits = mask_values(parts, spec, total)
    assert torch.equal(ring, (parts[0][0] + parts[1][0]).reshape(1, 2, 3))
    assert torch.equal(bits[0], torch.tensor([((parts[0][1] ^ parts[1][1]).item() >> k) & 1 for k in range(3)]))
    ans = dealer_answer([ring, bits], spec, subsets)
    assert ans.shape == (1, answer_numel(spec, subsets)) == (1, 3 + 6 + 6)
    assert torch.equal(ans[0, :3], bits[0]) and torch.equal(ans[0, 3:9], (ring * ring).reshape(-1))
    assert torch.equal(ans[0, 9:], (ring * bits).reshape(-1))


def _plan_job(sess, x, y, bit, big):
    """x, y fixed-point; bit 0/1 (scale 1); big: values whose square overflows the ring's truncation margin;
    the bit slots from a real comparison's B2A: lt = [x < 0], ge = 1 - [y < 0] (complement)."""
    import crypten

    from mpcache.mpc.compare import _ltz_lanes
    from mpcache.mpc.masked import BIT, RING, Plan

    sx, sy, sg = (crypten.cryptensor(v.float(), src=0) for v in (x, y, big))
    sb = crypten.cryptensor(bit.long(), src=0, precision=0)
    n = x.numel()
    slots = {k: ((n,), RING) for k in ("x", "y", "b", "g")} | {"lt": ((n,), BIT), "ge": ((n,), BIT)}
    derived = {"d": (1, {"lt": -1, "ge": 1})}  # 1 - lt + ge
    monos = [("x", "y"), ("x", "x"), ("b", "x", "y"), ("b", "g", "g"), ("b", "y"), ("lt", "x", "y"), ("d", "y")]
    out = {}
    with sess.scope("plan"):
        plan = Plan(slots, monos, derived)
        plan.open([("x", sx), ("y", sy)])
        plan.open([("b", sb), ("g", sg)])
        cmp_lt = _ltz_lanes(sx, 16, 12, b2a=plan.b2a("lt"))  # the comparison's own rounds, its B2A in the plan
        cmp_ge = 1 - _ltz_lanes(sy, 16, 12, b2a=plan.b2a("ge", complement=True))
        out["xy"] = plan.lin({("x", "y"): 1.0})
        out["xx"] = plan.lin({("x", "x"): 1.0})
        out["bxy"] = plan.lin({("b", "x", "y"): 1.0})
        out["by"] = plan.lin({("b", "y"): 1.0})
        out["bgg"] = plan.lin({("b", "g", "g"): 1.0})
        out["lin"] = plan.lin({("x", "y"): 0.75, ("x",): -2.0, ("b",): 0.5}, 3.0)
        out["ltxy"] = plan.lin({("lt", "x", "y"): 1.0})
        out["dy"] = plan.lin({("d", "y"): 1.0})
        out["cmp_lt"], out["cmp_ge"] = cmp_lt, cmp_ge
        try:
            plan.open([("x", sx)])
            out["reopen"] = "opened"
        except RuntimeError as e:
            out["reopen"] = str(e)
    c = sess.ledger.totals("plan", kind="online")
    out = {k: v if isinstance(v, str) else v.get_plain_text() for k, v in out.items()}
    out["cost"] = (c["rounds"], c["bytes_sent"])
    return out


@pytest.mark.parametrize("provider", ["tfp", "ttp"])
def test_plan_products_match_plain_products(provider):
    g = torch.Generator().manual_seed(7)
    N = 300
    x = torch.round(torch.randn(N, generator=g) * 3 * 2**16) / 2**16
    y = torch.round(torch.randn(N, generator=g) * 5 * 2**16) / 2**16
    bit = (torch.rand(N, generator=g) < 0.5).long()
    big = torch.full((N,), 30000.0)  # big^2 * 2^32 ~ 2^62: the local truncation of such products fails often
    x2 = x * 1.5 - 0.25  # other secrets, same shapes: same costs
    with Parties(2, protocol="arithmetic", provider=provider, timeout=300) as p:
        out = p.run(_plan_job, x, y, bit, big)[0].value
        other = p.run(_plan_job, x2, -y, 1 - bit, big * 0.5)[0].value
    tol = 2 * ULP  # one truncation where two fixed-point factors meet, one for the sum
    assert (out["xy"].double() - mono_reference([x, y])).abs().max() <= tol
    assert (out["xx"].double() - mono_reference([x, x])).abs().max() <= tol
    assert (out["bxy"].double() - mono_reference([bit, x, y])).abs().max() <= tol
    assert torch.equal(out["by"].double(), mono_reference([bit, y]))  # one fixed-point factor: exact
    # exact zeros: where the bit is 0 the product is a sharing of 0, truncated to exactly 0 whatever its factors
    assert torch.all(out["bgg"][bit == 0] == 0)
    want = 0.75 * x * y - 2 * x + 0.5 * bit + 3
    assert (out["lin"].double() - want).abs().max() <= 4 * ULP
    # the comparison's bits through the plan: the same function as the plain comparison (1/16 resolution), and
    # their products with opened values local
    lt, ge = out["cmp_lt"].double(), out["cmp_ge"].double()
    assert torch.equal(lt[(x < 0) | (x >= 1 / 16)], (x < 0).double()[(x < 0) | (x >= 1 / 16)])
    assert torch.equal(ge[(y < 0) | (y >= 1 / 16)], (y >= 0).double()[(y < 0) | (y >= 1 / 16)])
    assert (out["ltxy"].double() - lt * x * y).abs().max() <= tol
    assert torch.equal(out["dy"].double(), (1 - lt + ge) * y.double())  # a derived factor: one exact product
    assert "already open" in out["reopen"]
    # stated: 2 openings of 2 x 8 B per element, then 2 comparisons (16-bit, blocks of 4 at this size: 90 AND
    # planes x 16 B + the B2A word, per 64 elements; 4 rounds each, sequential here), nothing else online
    words = -(-N // 64)
    assert out["cost"] == (2 + 4 + 4, 8 * 4 * N + 2 * words * (16 * 90 + 8)), out["cost"]
    assert other["cost"] == out["cost"]
