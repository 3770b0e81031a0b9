"""Open-once masks (mpcache/mpc/masked.py): every value opened once, products of opened values local. Against the
plain products on real 2PC parties (TFP and the dealer), with the exact zeros the activations' muxes rely on, the
stated bytes and rounds, and costs independent of the secrets."""

from __future__ import annotations

import pytest
import torch

from mpcache.mpc.local_parties import Parties
from mpcache.mpc.masked import closure, dealer_products, mono_reference

ULP = 2.0**-16


def test_closure_lists_every_product_of_masks_once():
    got = closure([(0, 1), (2, 1, 0), (3, 3), (4,)])
    assert got == ((0, 1), (0, 2), (1, 2), (3, 3), (0, 1, 2))  # sorted by size, repeats kept, singles dropped
    masks = [torch.tensor([2, 3]), torch.tensor([5, 7]), torch.tensor([11, 13]), torch.tensor([-1, 4])]
    prods = dealer_products(masks, got)
    assert prods.tolist() == [[10, 21], [22, 39], [55, 91], [1, 16], [110, 273]]
    assert dealer_products(masks, ((0, 0),)).dtype == torch.long


def _plan_job(sess, x, y, bit, big):
    """x, y fixed-point; bit 0/1 (scale 1); big: values whose square overflows the ring's truncation margin."""
    import crypten

    from mpcache.mpc.masked import Plan

    X, Y, B, G = 0, 1, 2, 3
    sx, sy, sg = (crypten.cryptensor(v.float(), src=0) for v in (x, y, big))
    sb = crypten.cryptensor(bit.long(), src=0, precision=0)
    out = {}
    with sess.scope("plan"):
        plan = Plan(sx, 4, [(X, Y), (X, X), (B, X, Y), (B, G, G), (B, Y)])
        with sess.scope("plan/open1"):
            plan.open([(X, sx), (Y, sy)])
        with sess.scope("plan/open2"):
            plan.open([(B, sb), (G, sg)])
        out["xy"] = plan.lin({(X, Y): 1.0})
        out["xx"] = plan.lin({(X, X): 1.0})
        out["bxy"] = plan.lin({(B, X, Y): 1.0})
        out["by"] = plan.lin({(B, Y): 1.0})
        out["bgg"] = plan.lin({(B, G, G): 1.0})
        out["lin"] = plan.lin({(X, Y): 0.75, (X,): -2.0, (B,): 0.5}, 3.0)
        try:
            plan.open([(X, sx)])
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
    assert (out["xy"].double() - mono_reference([x, y])).abs().max() <= tol * (1 + 1e-9)
    assert (out["xx"].double() - mono_reference([x, x])).abs().max() <= tol
    assert (out["bxy"].double() - mono_reference([bit, x, y])).abs().max() <= tol
    assert torch.equal(out["by"].double(), mono_reference([bit, y]))  # one fixed-point factor: exact
    # exact zeros: where the bit is 0 the product is a sharing of 0, truncated to exactly 0 whatever its factors
    assert torch.all(out["bgg"][bit == 0] == 0)
    want = 0.75 * x * y - 2 * x + 0.5 * bit + 3
    assert (out["lin"].double() - want).abs().max() <= 4 * ULP
    assert "already open" in out["reopen"]
    # stated: 2 rounds, 8 B per element and opened value (4 values), nothing else online
    assert out["cost"] == (2, 8 * 4 * N), out["cost"]
    assert other["cost"] == out["cost"]
