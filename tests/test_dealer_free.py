"""Dealer-free 3PC (mpcache/mpc/dealer_free.py, provider "none"): real CrypTen parties (mpcache.mpc.local_parties,
one module-scoped set of 3 replicated parties), no dealer, no TFP.

Every tuple kind opens to a valid tuple and looks uniform; tuples cost nothing on the wire and B2A exactly what
its docstring states; CrypTen's replicated products come out re-randomised; comparisons, softmax, SiLU and the
RMSNorm scale match their float models; a private generation on the tiny model gives the plaintext tokens, with
bytes and rounds independent of the secrets and equal to the dry run's prediction; a 3PC launch with a dealer is
refused. Tolerances derive from the fixed-point resolution (16 fractional bits), as in tests/test_secure_ops.py.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import PublicLength

from mpcache.mpc import ops
from mpcache.mpc.local_parties import Parties

ULP = 2.0**-16
N = 4096  # tuple elements: enough for the uniformity checks (a fair bit's mean is 0.5 +- 0.008, 1 sigma)


@pytest.fixture(scope="module")
def parties():
    with Parties(3, protocol="replicated", timeout=300) as p:
        yield p


def grid(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.double() * 2**16) / 2**16


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _add(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out = out + t
    return out


def _xor(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out = out ^ t
    return out


def _cost(sess, name):
    t = sess.ledger.totals(name)
    return (t["bytes_sent"], t["bytes_recv"], t["rounds"])


# ---- party-side functions (module level: they go to the running parties by pickle) ------------------------------
def _tuples(sess):
    import crypten

    prov = crypten.mpc.get_default_provider()
    out = {"provider": type(prov).__name__, "cfg_provider": crypten.cfg.mpc.provider}
    with sess.scope("mul"):
        out["mul"] = [t.share for t in prov.generate_additive_triple(torch.Size([N]), torch.Size([N]), "mul")]
    with sess.scope("mul-bcast"):
        out["mul-bcast"] = [
            t.share for t in prov.generate_additive_triple(torch.Size([4, 1, 8]), torch.Size([3, 8]), "mul")
        ]
    with sess.scope("matmul"):
        out["matmul"] = [
            t.share for t in prov.generate_additive_triple(torch.Size([2, 5, 7]), torch.Size([7, 3]), "matmul")
        ]
    with sess.scope("square"):
        out["square"] = [t.share for t in prov.square(torch.Size([N]))]
    with sess.scope("binary"):
        out["binary"] = [t.share for t in prov.generate_binary_triple(torch.Size([N]), torch.Size([N]))]
    with sess.scope("B2A_rng"):
        out["b2a"] = [t.share for t in prov.B2A_rng(torch.Size([N]))]
    try:
        prov.wrap_rng(torch.Size([3]))
    except NotImplementedError as e:
        out["wrap_rng"] = str(e)
    out["costs"] = {k: _cost(sess, k) for k in ("mul", "mul-bcast", "matmul", "square", "binary", "B2A_rng")}
    return out


def _b2a_cost(sess, bits: torch.Tensor):
    """CrypTen's B2A_single_bit (the patched one) on a bit sharing: the bits and the cost."""
    from crypten.mpc.primitives import BinarySharedTensor
    from crypten.mpc.primitives.beaver import B2A_single_bit

    xB = BinarySharedTensor(bits, src=0)
    with sess.scope("b2a"):
        y = B2A_single_bit(xB)
    return y.get_plain_text(), _cost(sess, "b2a")


def _product_shares(sess, x, y):
    """Each party's own shares of x, y (precision 0: ring integers, no truncation) and of the replicated x * y;
    and, for a truncation, what party 2 sends to party 1 next to party 2's share before it."""
    import crypten.communicator as comm
    from crypten.mpc.primitives import ArithmeticSharedTensor as AST

    xs, ys = AST(x, precision=0, src=0), AST(y, precision=0, src=0)
    z = xs.mul(ys)
    sent = []
    c = comm.get()
    orig = c.send
    c.send = lambda t, dst: (sent.append(t.clone()), orig(t, dst))[1]
    t = AST(x * 2**16, precision=0, src=0)
    before = t.share.clone()
    t.div_(4)
    del c.send
    return {"x": xs.share, "y": ys.share, "z": z.share, "trunc_before": before, "trunc_sent": sent}


def _on_shares(sess, cases):
    import crypten

    out = {}
    for name, (op, x) in cases.items():
        s = crypten.cryptensor(x.float(), src=0)
        with sess.scope(name):
            y = op(s)
        out[name] = (y.get_plain_text().double(), _cost(sess, name))
    return out


def _generate(sess, model: str, seed: int, ids: list[int], n_new: int):
    from mpcache.generation import private_generate
    from mpcache.model.weights import load_model

    cfg, w, _ = load_model(model, seed=seed)
    sess.comm = PublicLength(len(ids))
    toks, logits, _ = private_generate(
        sess, cfg, w if sess.rank == 0 else None, ids if sess.rank == 1 else None, n_new, keep_logits=True
    )
    sess.comm = None
    return {"tokens": toks, "logits": [lg.double() for lg in logits]}


# ---- tuples -------------------------------------------------------------------------------------------------------
def test_tuples_open_to_valid_uniform_tuples_at_zero_cost(parties):
    """a*b == c (elementwise, broadcast, matmul), r^2, a&b, B2A's rA == rB in {0,1}; values and shares look uniform
    (bit means within 5 sigma of 1/2); tuples send nothing; B2A_rng: 1 round, 8 B/element from party 1 to 2."""
    res = [r.value for r in parties.run(_tuples)]
    assert res[0]["provider"] == "DealerFree3PC" and res[0]["cfg_provider"] == "R3"
    for kind, op in (("mul", torch.mul), ("mul-bcast", torch.mul), ("matmul", torch.matmul)):
        a, b, c = (_add([r[kind][i] for r in res]) for i in range(3))
        assert torch.equal(op(a, b), c), kind
    r, r2 = (_add([x["square"][i] for x in res]) for i in range(2))
    assert torch.equal(r * r, r2)
    a, b, c = (_xor([x["binary"][i] for x in res]) for i in range(3))
    assert torch.equal(a & b, c)
    rA, rB = _add([x["b2a"][0] for x in res]), _xor([x["b2a"][1] for x in res])
    assert torch.equal(rA, rB) and set(rA.unique().tolist()) == {0, 1}

    def fair(bits: torch.Tensor, what: str) -> None:
        m = bits.double().mean().item()
        assert abs(m - 0.5) <= 5 * 0.5 / N**0.5, (what, m)

    fair(rA, "B2A bit")
    for name, v in (("mul a", _add([x["mul"][0] for x in res])), ("binary a", a), ("square r", r)):
        for bit in (0, 31, 63):
            fair((v >> bit) & 1, f"{name} bit {bit}")
    for p in range(3):  # each party's share, alone, looks uniform too (binary B2A shares as TFP's: 64 random bits)
        fair((res[p]["b2a"][1] >> 40) & 1, f"party {p} rB share")
        fair((res[p]["b2a"][0] >> 40) & 1, f"party {p} rA share")
        fair(res[p]["mul"][2] & 1, f"party {p} c share")
    for kind in ("mul", "mul-bcast", "matmul", "square", "binary"):
        assert [x["costs"][kind] for x in res] == [(0, 0, 0)] * 3, kind
    assert [x["costs"]["B2A_rng"] for x in res] == [(0, 0, 0), (8 * N, 0, 0), (0, 8 * N, 1)]
    assert "replicated.truncate" in res[0]["wrap_rng"]


def test_b2a_single_bit_costs_the_opening_plus_party_1s_share_of_r(parties):
    """CrypTen's B2A_single_bit under dealer-free 3PC: exact bits; 1 round (as TFP); TFP's opening (2 x 8 B each
    way per element and party) plus 8 B per element from party 1 to party 2 in the same exchange -- what the
    schedule search's model (schedules.b2a) says."""
    from mpcache.mpc import schedules

    bits = torch.randint(0, 2, (3, 50), generator=gen(3))
    res = parties.run(_b2a_cost, bits)
    assert torch.equal(res[0].value[0].long(), bits)
    n = bits.numel()
    assert [r.value[1] for r in res] == [(16 * n, 16 * n, 1), (24 * n, 16 * n, 1), (16 * n, 24 * n, 1)]
    model = schedules.b2a(schedules.Setting(3, "replicated", "none"), bits.shape)
    assert [r.value[1] for r in res] == [
        (model.c["online"]["bytes_sent"][p], model.c["online"]["bytes_recv"][p], model.c["online"]["rounds"][p])
        for p in range(3)
    ]


def test_replicated_products_and_truncations_are_rerandomised(parties):
    """Without a PRZS, party 2's product share z_2 = x_2 y_2 + x_2 y_1 + x_1 y_2 (CrypTen's replicated mul) reaches
    party 1 (truncation, or the next product), which holds x_0, x_1, y_0, y_1: it learns (x - x_0)(y - y_0). With
    the dealer-free install, z_2 carries a fresh zero share (the product is still exact), and a truncation's
    input is re-randomised before party 2 sends it."""
    x = torch.randint(-(2**40), 2**40, (64,), generator=gen(4))
    y = torch.randint(-(2**20), 2**20, (64,), generator=gen(5))
    res = [r.value for r in parties.run(_product_shares, x, y)]
    z = _add([r["z"] for r in res])
    assert torch.equal(z, x * y)
    x1, x2, y1, y2 = res[1]["x"], res[2]["x"], res[1]["y"], res[2]["y"]
    stock = x2 * y2 + x2 * y1 + x1 * y2  # CrypTen's z_2 (party 2 holds x_2 and, from party 1, x_1)
    assert not torch.equal(res[2]["z"], stock)
    assert ((res[2]["z"] - stock) != 0).all()  # the mask covers every element
    (sent,) = res[2]["trunc_sent"]  # party 2's one message of the truncation, to party 1
    assert ((sent - res[2]["trunc_before"]) != 0).all()


# ---- protocols built on the tuples ------------------------------------------------------------------------------------
def test_comparisons_softmax_silu_rmsnorm_match_plaintext(parties):
    """The lean comparison and CrypTen's _ltz: exact signs. Softmax (flat and peaked rows of 1,024): within 512 ulp
    of its float model (tests/test_secure_ops.py::test_exp_limit). SiLU: 400 ulp of its float model away from the
    breakpoints +-8 (the coarse comparison may pick the other piece within 2/16 below them); 2.7e-3 + 2e-4 of the
    exact function away from that window, and inside it the picked piece's own error (the tail's: 3.0e-3 at
    |x| = 7.875). RMSNorm's scale v/sqrt(sum
    v^2 + D eps): 1e-3 (tests/test_secure_ops.py::test_norm_scale_massive_activation). Costs: the same for a second
    input of each op."""
    from mpcache.mpc.activations import SILU_T

    x_cmp = grid(torch.randn(3, 111, generator=gen(1)) * 3000)
    x_cmp[0, :6] = torch.tensor([0.0, -(2.0**-16), 2.0**-16, 1.0, -1.0, -32767.0])
    flat = torch.randn(2, 1024, generator=gen(2)) * 0.01
    peaked = torch.randn(2, 1024, generator=gen(3)) * 3
    peaked[:, 5] += 20
    x_sm = grid(torch.cat([flat, peaked]))
    x_act = grid(torch.cat([torch.linspace(-14, 14, 281), torch.tensor([8.0, -8.0, 60.0, -60.0])]))
    h = torch.randn(5, 64, generator=gen(6))
    h[1:, 7] = torch.linspace(2.0e4, 2.6e4, 4)
    h = grid(h)
    norm = partial(ops.norm_scale, add=64 * 1e-5)
    cases = {
        "ltz_lean": (ops._ltz_lean, x_cmp),
        "ltz": (partial(ops._ltz, lean=False), x_cmp),  # CrypTen's MPCTensor._ltz
        "softmax": (ops.softmax, x_sm),
        "silu": (ops.silu, x_act),
        "norm": (norm, h),
    }
    out = parties.run(_on_shares, cases)[0].value
    again = parties.run(
        _on_shares,
        {k: (op, grid(torch.randn(x.shape, generator=gen(9)) * x.abs().max())) for k, (op, x) in cases.items()},
    )[0].value
    assert {k: v[1] for k, v in out.items()} == {k: v[1] for k, v in again.items()}
    assert torch.equal(out["ltz_lean"][0], (x_cmp < 0).double())
    assert torch.equal(out["ltz"][0], (x_cmp < 0).double())
    assert (out["softmax"][0] - ops.softmax_reference(x_sm)).abs().max() <= 512 * ULP
    y = out["silu"][0]
    near = (x_act.abs() <= SILU_T) & (x_act.abs() > SILU_T - 2 / 16)
    assert (y - ops.silu_reference(x_act))[~near].abs().max() <= 400 * ULP
    exact = torch.nn.functional.silu(x_act)
    assert (y - exact)[~near].abs().max() <= 2.7e-3 + 2e-4
    # within 3PC's 1/8-wide window the coarse comparison may pick the tail relu(x): its own error there (3.0e-3 at
    # |x| = 7.875; tests/test_floor.py::test_activation_split)
    tail = (x_act.clamp(min=0) - exact)[near].abs().max()
    assert (y - exact)[near].abs().max() <= max(2.7e-3, float(tail)) + 2e-4
    assert (out["norm"][0] - ops.norm_scale_reference(h, 64 * 1e-5)).abs().max() < 1e-3


# ---- a private generation -------------------------------------------------------------------------------------------
def _scoped(ledger) -> dict:
    return {k: (v["bytes_sent"], v["bytes_recv"], v["rounds"]) for k, v in ledger.counts.items() if any(v.values())}


def test_private_generation_matches_plaintext_costs_oblivious_and_predicted(parties):
    """Tiny LLaMA, 3PC dealer-free: tokens == plaintext, logits within 0.05 (tests/test_private_generation.py);
    a second prompt under other weights costs exactly the same per scope and party; a dry run of the same
    generation predicts every scope of every party exactly."""
    from mpcache.generation import plaintext_generate
    from mpcache.model.weights import load_model
    from mpcache.mpc.dryrun import predict_generation
    from mpcache.mpc.schedules import Setting

    n_prompt, n_new = 6, 2
    runs = []
    for seed in (0, 1):
        ids = torch.randint(0, 256, (n_prompt,), generator=gen(50 + seed)).tolist()
        res = parties.run(_generate, "tiny-llama", seed, ids, n_new, timeout=600)
        cfg, w, _ = load_model("tiny-llama", seed=seed)
        pt, plog, _ = plaintext_generate(cfg, w, ids, n_new)
        assert res[1].value["tokens"] == pt, (seed, res[1].value["tokens"], pt)
        err = max((a - b.double()).abs().max().item() for a, b in zip(res[0].value["logits"], plog))
        assert err <= 0.05, err
        runs.append([_scoped(r.ledger) for r in res])
    assert runs[0] == runs[1]
    pred, _ = predict_generation(cfg, None, Setting(3, "replicated", "none"), n_prompt, n_new, keep_logits=True)
    for p in range(3):
        got = {(c["scope"], c["kind"]): (c["bytes_sent"], c["bytes_recv"], c["rounds"]) for c in pred[p]["counts"]}
        got = {k: v for k, v in got.items() if any(v)}
        assert len(got) > 20 and got == runs[0][p], p


# ---- configuration and launch -----------------------------------------------------------------------------------------
def test_resolve_provider_and_the_settings_that_take_it():
    from mpcache.mpc.config import MpcConfig
    from mpcache.mpc.schedules import Setting
    from mpcache.mpc.session import SessionError, resolve_provider
    from mpcache.report import trust_model

    assert resolve_provider("replicated", None) == "none"
    assert resolve_provider("replicated", "none") == "none"
    assert resolve_provider("arithmetic", None) == "ttp"  # secure by default: 2PC takes a dealer
    assert resolve_provider("arithmetic", "ttp") == "ttp"
    for bad in ("tfp", "ttp"):
        with pytest.raises(SessionError, match=f"dealer-free.*drop --provider {bad}"):
            resolve_provider("replicated", bad)
    with pytest.raises(SessionError, match="needs --protocol replicated"):
        resolve_provider("arithmetic", "none")
    with pytest.raises(ValueError, match="replicated"):
        MpcConfig(provider="none")
    assert MpcConfig(protocol="replicated", provider="none", n_parties=3).setting == Setting(3, "replicated", "none")
    with pytest.raises(ValueError, match="replicated"):
        Setting(2, "arithmetic", "none")
    assert Setting(3, "replicated", "none").label == "3PC replicated dealer-free"
    assert trust_model("replicated", "none", 3)["text"].startswith(
        "3PC replicated, dealer-free: secure against one semi-honest party (honest majority)"
    )


@pytest.mark.mpi
def test_cli_refuses_a_dealer_in_3pc():
    """``--protocol replicated --provider tfp`` stops every party at once with the fix named, non-zero exit."""
    from conftest import run_mpi

    p = run_mpi(
        3,
        ["-m", "parties", "generate", "--model", "tiny-llama", "--protocol", "replicated", "--provider", "tfp"],
        timeout=120,
        check=False,
    )
    assert p.returncode != 0
    assert "drop --provider tfp" in p.stderr, p.stderr[-2000:]
