"""SqueezeAttention's layer-wise budgets (mpcache/policies/squeeze.py, BudgetPolicy.layer_budgets) and BalanceKV

Why one file: both founding systems share the calibration, walk and CLI fixtures here.
(mpcache/policies/balancekv.py): validation, allocation, the stored public calibration, the per-prompt allocation,
the per-layer policies inside the model, BalanceKV's walk against a direct float reference and the weighted
attention. MPC twins: tests/mpi_jobs.py (job_squeeze_balance)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mpcache.backends import PlainBackend
from mpcache.model.transformer import KVCache, Transformer
from mpcache.model.weights import init_random_weights, tiny_config
from mpcache.policies import make_policy
from mpcache.policies.squeeze import (
    allocate,
    calibrate,
    calibrated_budgets,
    calibration_path,
    kmeans_1d,
    layer_similarities,
    prompt_budgets,
    save_calibration,
)

torch.set_num_threads(1)
CFG = tiny_config("llama")
W = init_random_weights(CFG, seed=0)


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture()
def cal_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MPCACHE_CACHE_DIR", str(tmp_path))
    return tmp_path / "squeeze"


# ---- layer_budgets: validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"budget": 0.2, "layer_budgets": (0.1, 0.2)}, "sum to 0.3 but 2 layers x budget 0.2 = 0.4"),
        ({"budget": 10, "layer_budgets": (5, 6)}, "sum to 11 but 2 layers x budget 10 = 20"),
        ({"budget": 10, "layer_budgets": (0.5, 0.5)}, "must be token counts"),
        ({"budget": 0.5, "layer_budgets": (1.0, 0.0)}, "layer_budgets[1]"),
        ({"budget": 0.5, "layer_budgets": "uniform"}, "or 'calibrated'"),
        ({"budget": 0.5, "layer_budgets": ()}, "non-empty tuple"),
    ],
)
def test_layer_budgets_refused(kw, needle):
    with pytest.raises(ValueError) as e:
        make_policy("h2o", **kw)
    assert needle in str(e.value)


def test_layer_budget_below_the_policy_minimum_is_refused():
    with pytest.raises(
        ValueError,
        match=r"layer_budgets\[0\] = 10 is below the policy's minimum of 40 rows per layer "
        r"\(window=32 \+ sinks=8|sinks=8 \+ window=32",
    ):
        make_policy("balancekv", budget=50, sinks=8, window=32, layer_budgets=(10, 90))
    with pytest.raises(ValueError, match=r"minimum of 4 rows per layer \(sinks=4\)"):
        make_policy("streaming", budget=10, layer_budgets=(3, 17))
    # a fraction's floor depends on the (public) prompt length: refused at the prefill, before any work
    pol = make_policy("streaming", budget=0.2, layer_budgets=(0.05, 0.35))
    with pytest.raises(ValueError, match=r"keeps 2 of 40 prompt rows, below the policy's minimum of 4"):
        Transformer(CFG, W, PlainBackend(), pol).prefill(ids(40), KVCache(CFG.n_layers))
    Transformer(CFG, W, PlainBackend(), pol).prefill(ids(100), KVCache(CFG.n_layers))  # 5 >= 4: runs


def test_layer_budgets_must_match_the_model():
    with pytest.raises(ValueError, match="has 3 entries but model 'tiny-llama' has 2 layers"):
        Transformer(CFG, W, PlainBackend(), make_policy("h2o", budget=0.2, layer_budgets=(0.1, 0.2, 0.3)))
    with pytest.raises(ValueError, match="not resolved: call policy.bind"):
        make_policy("h2o", layer_budgets="calibrated").for_layer(0)
    with pytest.raises(
        ValueError, match=r"shares the selection of layer 2 \(share_layers\) but their layer budgets differ"
    ):
        cfg4 = dataclasses.replace(CFG, n_layers=4)
        make_policy("mpcache", budget=0.2, share_layers=True, share_start=2, layer_budgets=(0.2, 0.2, 0.1, 0.3)).bind(
            cfg4
        )


@pytest.mark.parametrize("name", ["h2o", "streaming", "snapkv", "tova", "balancekv"])
def test_each_layer_keeps_its_own_budget(name):
    """A static policy with token-count layer budgets keeps exactly its layer's count at the prefill, and its
    per-layer decode matches running that layer's policy alone (layer 1 of a uniform run with the same budget)."""
    extra = {"window": 8, "sinks": 4} if name == "balancekv" else ({"window": 8} if name == "snapkv" else {})
    pol = make_policy(name, budget=40, layer_budgets=(24, 56), **extra)
    model = Transformer(CFG, W, PlainBackend(), pol)
    cache = KVCache(CFG.n_layers)
    model.prefill(ids(120), cache)
    if name == "balancekv":  # sinks + window + whole blocks halved (see BalanceKV's plan)
        assert [int(k.shape[1]) for k in cache.k] == [pol.for_layer(i).n_kept(120) for i in range(2)]
    else:
        assert [int(k.shape[1]) for k in cache.k] == [24, 56]
    assert pol.attended_by_layer(120, 0, 2) == [pol.for_layer(i).attended_tokens(120, 0) for i in range(2)]
    uni = Transformer(CFG, W, PlainBackend(), make_policy(name, budget=56, **extra))
    c2 = KVCache(CFG.n_layers)
    uni.prefill(ids(120), c2)
    assert torch.equal(cache.k[1], c2.k[1]) and torch.equal(cache.v[1], c2.v[1])


# ---- the allocator -----------------------------------------------------------------------------------------------
def test_kmeans_groups_by_similarity():
    assert kmeans_1d([0.91, 0.2, 0.95, 0.5, 0.52, 0.9]) == [2, 0, 2, 1, 1, 2]
    assert kmeans_1d([0.3, 0.3]) == [0, 0]


def test_allocate_moves_budget_from_the_least_important_group():
    sims = [0.91, 0.2, 0.95, 0.5, 0.52, 0.9]
    b = allocate(sims, 0.1, p=0.3)
    assert b[0] == b[2] == b[5] == pytest.approx(0.03)  # the high-similarity group: p * 0.1
    assert b[1] == b[3] == b[4] == pytest.approx(0.1 + 3 * 0.07 / 3)
    assert sum(b) == pytest.approx(0.6)
    make_policy("h2o", budget=0.1, layer_budgets=b)  # a valid setting
    capped = allocate(sims, 0.8, p=0.5)  # 0.4 low, the rest capped at 1, the excess back to the low
    assert capped == (0.6, 1.0, 0.6, 1.0, 1.0, 0.6)
    counts = allocate(sims, 20, p=0.3, floor=8)  # counts: low at the floor, sum kept
    assert counts == (8, 32, 8, 32, 32, 8) and sum(counts) == 120
    counts = allocate([0.9, 0.1, 0.2, 0.95], 10, p=0.3)
    assert sum(counts) == 40 and counts[0] == counts[3] == 3 and sorted(counts[1:3]) == [17, 17]
    assert allocate([0.5, 0.5, 0.5], 0.2) == (0.2, 0.2, 0.2)  # one group: uniform
    with pytest.raises(ValueError, match="p .* must be in"):
        allocate(sims, 0.1, p=1.5)


def test_similarity_is_one_when_attention_adds_nothing():
    """cos(x, x + attn(x)) = 1 where a layer's output projection is zero; below 1 elsewhere."""
    w = dict(W)
    w["layers.1.wo"] = torch.zeros_like(w["layers.1.wo"])
    s = layer_similarities(CFG, w, ids(30))
    assert s[1].item() == pytest.approx(1.0, abs=1e-6) and s[0].item() < 0.999


# ---- the stored public calibration --------------------------------------------------------------------------------
def test_calibrated_needs_a_stored_calibration(cal_dir):
    with pytest.raises(
        ValueError,
        match=r"no SqueezeAttention calibration for model 'tiny-llama'.*"
        r"python -m experiments.squeeze_calibrate --model tiny-llama",
    ):
        Transformer(CFG, W, PlainBackend(), make_policy("squeeze-h2o", budget=0.2))


def test_calibration_roundtrip_and_mismatch(cal_dir):
    cal = calibrate(CFG, W, [ids(40, 1), ids(40, 2)], p=0.3, source="test")
    path = save_calibration(cal, CFG)
    assert path == calibration_path(CFG) and path.parent == cal_dir
    pol = make_policy("squeeze-h2o", budget=0.2)
    bound = pol.bind(CFG)
    assert bound.layer_budgets == allocate(cal["similarities"], 0.2, 0.3, 1, cal["groups"])
    assert bound.layer_budgets == calibrated_budgets(CFG, 0.2)
    assert sum(bound.layer_budgets) == pytest.approx(0.4) and bound.layer_budgets != (0.2, 0.2)
    out = Transformer(CFG, W, PlainBackend(), pol).prefill(ids(50), KVCache(2))  # runs
    assert out.shape == (1, CFG.vocab_size)
    # the same file read for another architecture / another config of the same name: refused
    other = dataclasses.replace(CFG, n_layers=3)
    with pytest.raises(
        ValueError,
        match=r"made for another model or architecture .*n_layers 2 != 3.*"
        r"squeeze_calibrate --model tiny-llama",
    ):
        make_policy("squeeze-h2o", budget=0.2).bind(other)
    bad = dict(cal, arch="gpt2")
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="arch 'gpt2' != 'llama'"):
        make_policy("h2o", budget=0.2, layer_budgets="calibrated").bind(CFG)


def test_prompt_budgets_follow_the_prompt():
    x = ids(60, 3)
    b = prompt_budgets(CFG, W, x, 0.2, p=0.3)
    assert b == allocate(layer_similarities(CFG, W, x), 0.2, 0.3)
    assert sum(b) == pytest.approx(0.4)
    s = layer_similarities(CFG, W, x)
    assert b[int(s.argmax())] == pytest.approx(0.06)  # the more similar layer gets p * 0.2
    assert math.isclose(b[int(s.argmin())], 0.34)


# ---- BalanceKV ----------------------------------------------------------------------------------------------------
def walk_reference(k, v, levels, c, beta, iters, coins, kernel="bounded"):
    """A direct float64 re-implementation of the paired self-balancing walk over one block: the kept row indices,
    with explicit sums over pairs (no Gram matrices, no one-hots)."""
    ku = k.double() / k.double().norm(dim=-1, keepdim=True)
    vu = v.double() / v.double().norm(dim=-1, keepdim=True)
    vmax = float(v.double().norm(dim=-1).max())
    n, sd = 2**iters, math.sqrt(k.shape[-1])
    shift = 0.0

    def kern(a, b):
        if kernel == "softmax":  # the paper's kernel, shifted by the current rows' largest |k|^2 / sqrt d
            return math.exp(float(k[a].double() @ k[b].double()) / sd - shift) * (
                1 + float(v[a].double() @ v[b].double()) / vmax**2
            )
        return (1 - beta / n + beta / n * float(ku[a] @ ku[b])) ** n * (1 + float(vu[a] @ vu[b]))

    idx = list(range(k.shape[0]))
    for t in range(levels):
        shift = max(float(k[a].double() @ k[a].double()) / sd for a in idx)
        pairs = [(idx[2 * i], idx[2 * i + 1]) for i in range(len(idx) // 2)]
        chi = []
        for i, (a, b) in enumerate(pairs):
            x = sum(
                chi[j] * (kern(aj, a) - kern(aj, b) - kern(bj, a) + kern(bj, b)) for j, (aj, bj) in enumerate(pairs[:i])
            )
            chi.append(1 if x < c * (1 - 2 * float(coins(t)[i])) else -1)
        idx = [a if s > 0 else b for (a, b), s in zip(pairs, chi)]
    return idx


def gathered_rows(g, n: int) -> list[list[int]]:
    """Per KV head, the cache rows a BalanceKV Gather keeps (plaintext one-hot -> indices), in output order."""
    from mpcache.layout import strata_layout

    idx, _ = strata_layout(g.strata, g.n_blocks_selected, g.interleave)
    pick = idx[torch.arange(idx.shape[0]), g.onehot.argmax(-1)] + g.start  # (Hkv, k)
    before = [r for s, e in g.ranges if e <= g.start for r in range(s, e)]
    after = [r for s, e in g.ranges if s >= g.start for r in range(s, e)]
    return [before + pick[h].tolist() + after for h in range(pick.shape[0])]


@pytest.mark.parametrize(
    "rate, block, n, kernel",
    [(2, 8, 50, "bounded"), (4, 16, 71, "bounded"), (8, 16, 90, "bounded"), (4, 16, 71, "softmax")],
)
def test_balancekv_walk_matches_a_direct_reference(rate, block, n, kernel):
    from mpcache.policies import PrefillContext

    pol = make_policy("balancekv", rate=rate, block=block, sinks=3, window=5, threshold=1.5, kernel=kernel)
    g = torch.Generator().manual_seed(rate + n)
    k, v = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
    ctx = PrefillContext(PlainBackend(), 1, 2, None, k, v, None, {}, {})
    gat = pol.prefill(ctx)
    s, e, r = pol.plan(n)
    nb = (e - s) // block
    assert r == rate and gat.weight == rate and gat.n_rows == pol.n_kept(n) == n - (e - s) + (e - s) // rate
    rows = gathered_rows(gat, n)
    levels = int(math.log2(rate))
    for h in range(2):
        want = list(range(s))
        for j in range(nb):
            a = s + j * block
            coins = lambda t, x=h * nb + j: pol.coins(1, t, (2 * nb, block >> (t + 1)))[x]
            want += [
                a + i
                for i in walk_reference(
                    k[h, a : a + block],
                    v[h, a : a + block],
                    levels,
                    pol.threshold,
                    pol.beta,
                    pol.kernel_iters,
                    coins,
                    kernel,
                )
            ]
        want += list(range(e, n))
        assert rows[h] == want, f"head {h}: {sum(x != y for x, y in zip(rows[h], want))} rows differ"
    out = gat.apply(k, PlainBackend())
    assert torch.equal(out, k[torch.arange(2)[:, None], torch.tensor(rows)])
    lw = gat.log_weights()
    assert torch.equal(lw, torch.tensor([0.0] * s + [math.log(rate)] * ((e - s) // rate) + [0.0] * (n - e)))


def test_weighted_attention_is_the_weighted_softmax():
    """Row weights w enter numerator and normaliser: out = sum_i w_i e^{s_i} v_i / sum_i w_i e^{s_i}."""
    model = Transformer(CFG, W, PlainBackend())
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(4, 1, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    w = torch.tensor([1, 1, 4, 4, 4, 1, 1, 2, 1.0])
    out, _ = model._attend(q, k, v, logw=w.log())
    for h in range(4):
        s = (q[h, 0] @ k[h // 2].T) / 4.0
        want = (w * s.exp()) @ v[h // 2] / (w * s.exp()).sum()
        torch.testing.assert_close(out[0, h * 16 : (h + 1) * 16], want, rtol=1e-5, atol=1e-6)


def test_balancekv_cache_carries_weights_through_decode():
    pol = make_policy("balancekv", rate=4, block=16, window=8)
    model = Transformer(CFG, W, PlainBackend(), pol)
    cache = KVCache(CFG.n_layers)
    logits = model.prefill(ids(80), cache)
    n_kept = pol.n_kept(80)
    assert cache.length == n_kept and cache.logw[0].shape == (n_kept,)
    assert float(cache.logw[0].max()) == pytest.approx(math.log(4)) and int((cache.logw[0] > 0).sum()) == 64 // 4
    model.decode(int(logits.argmax()), cache)
    assert cache.logw[1].shape == (n_kept + 1,) and cache.logw[1][-1] == 0


def test_balancekv_walk_reduces_the_discrepancy():
    """The walk's signs leave a smaller signed kernel sum ||sum_i chi_i u_i||^2 = chi^T G chi than random pair signs
    (what makes the kept half, weighted 2, estimate the whole batch): mean over random clustered batches."""
    from mpcache.policies import PrefillContext
    from mpcache.policies.balancekv import kernel_gram

    B = PlainBackend()
    pol = make_policy("balancekv", rate=2, block=64, sinks=0, window=0, threshold=0.5)
    g = torch.Generator().manual_seed(0)
    walk = rand = 0.0
    for trial in range(12):
        centers = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1) * 3
        k = (centers[torch.randint(0, 6, (128,), generator=g)] + 0.5 * torch.randn(128, 16, generator=g))[None]
        v = torch.randn(1, 128, 16, generator=g) + torch.randn(16, generator=g)
        gat = dataclasses.replace(pol, seed=trial).prefill(PrefillContext(B, 0, 1, None, k, v, None, {}, {}))
        chi = torch.where(torch.isin(torch.arange(128), torch.tensor(gathered_rows(gat, 128)[0])), 1.0, -1.0)
        rnd = (torch.rand(64, generator=g) < 0.5).float().repeat_interleave(2) * 2 - 1
        rnd[1::2] *= -1
        u = torch.cat([B.norm_scale(k[0]), B.norm_scale(v[0])], -1).reshape(2, 64, 32)
        G = kernel_gram(B, u, 16, pol.beta, pol.kernel_iters)
        for j in range(2):
            walk += float(chi[j * 64 : (j + 1) * 64] @ G[j] @ chi[j * 64 : (j + 1) * 64])
            rand += float(rnd[j * 64 : (j + 1) * 64] @ G[j] @ rnd[j * 64 : (j + 1) * 64])
    assert walk < 0.8 * rand, (walk, rand)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"rate": 3}, "power of two >= 2 that divides block=32"),
        ({"rate": 64}, "divides block=32"),
        ({"block": 24}, "block must be a power of two"),
        ({"beta": 40.0}, "beta <= 2^kernel_iters"),
        ({"sinks": -1}, "must be >= 0"),
        ({"kernel": "rbf"}, "kernel must be one of ('bounded', 'softmax')"),
    ],
)
def test_balancekv_refuses_bad_settings(kw, needle):
    with pytest.raises(ValueError) as e:
        make_policy("balancekv", **kw)
    assert needle in str(e.value)


def test_balancekv_rate_from_the_budget():
    assert [make_policy("balancekv", budget=b).plan(1000)[2] for b in (0.5, 0.2, 0.1, 0.05)] == [2, 4, 8, 16]
    assert make_policy("balancekv", budget=0.01).plan(1000)[2] == 32  # capped at block
    pol = make_policy("balancekv", budget=120)  # 992 - 24 = 968... (s=4, w=16: m = 960)
    s, e, r = pol.plan(1000)
    assert (e - s) == 960 and r == 2 ** round(math.log2(960 / (120 - 40)))
    assert make_policy("balancekv", budget=0.1).plan(30) is None  # no whole block


# ---- under MPC (2PC, real mpirun): tests/mpi_jobs.py job_squeeze_balance ---------------------------------------
@pytest.mark.mpi
def test_squeeze_and_balancekv_on_shares_like_plaintext(tmp_path, monkeypatch):
    """squeeze-h2o (calibrated budgets read by every party), squeeze-mpcache, BalanceKV at rates 2 and 4: bytes and
    rounds of every scope identical for two weight sets and two prompts (oblivious), the static stage's kept rows
    equal to the plaintext twin's, the tokens equal to plaintext."""
    from conftest import mpi_job

    monkeypatch.setenv("MPCACHE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config("llama")
    save_calibration(calibrate(cfg, W, [ids(64, 1), ids(64, 2)], p=0.3, source="test"), cfg)
    res = mpi_job(2, "squeeze_balance", tmp_path, "squeeze-h2o,squeeze-mpcache,balancekv2,balancekv4", timeout=900)
    for label, r in res.items():
        assert r["same_costs"] and r["n_scopes"] > 20, label
        assert r["tokens_ok"] == [True] * 3, (label, r["tokens_ok"])
        assert r["sel_ok"] == [True] * 3, (label, r["sel"])
    assert res["squeeze-h2o"]["layer_budgets"] == list(calibrated_budgets(cfg, 0.3))
    assert res["squeeze-h2o"]["kept"] == [round(b * 40 + 1e-9) + 1 for b in calibrated_budgets(cfg, 0.3)]
    assert all(x is not None for x in res["balancekv4"]["sel"].values())
    assert res["balancekv4"]["kept"] == [2 + 32 // 4 + 6 + 1] * 2  # sinks + blocks / rate + rest, +1
    # the walk's rounds do not depend on the prompt length (blocks batched): per layer, rate 2 < rate 4
    assert 0 < res["balancekv2"]["static_rounds"] < res["balancekv4"]["static_rounds"]


def test_bench_cost_classes_follow_the_layer_budgets():
    from mpcache.bench import bench_layers_needed, layer_classes

    pol = make_policy("h2o", budget=0.2, layer_budgets=(0.05, 0.05, 0.5, 0.2))
    assert layer_classes(pol, 4) == ["own@0.05", "own@0.05", "own@0.5", "own@0.2"]
    assert bench_layers_needed(pol, 4) == 4 and bench_layers_needed(make_policy("h2o"), 4) == 1


@pytest.mark.mpi
def test_cli_generate_and_bench_with_squeeze_and_balancekv(tmp_path, monkeypatch):
    """``parties generate --policy balancekv`` and ``--layer-budgets calibrated`` agree with plaintext; ``parties
    bench`` runs squeeze-h2o and balancekv beside full with selections equal to the plaintext twin; a missing
    calibration is refused at startup with the calibration command, nothing written."""
    from conftest import run_mpi

    monkeypatch.setenv("MPCACHE_CACHE_DIR", str(tmp_path / "cache"))
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    gen = ["-m", "parties", "generate", "--model", "tiny-llama", "--prompt-file", str(prompt), "--max-new-tokens", "2"]
    p = run_mpi(
        2,
        [
            *gen,
            "--provider",
            "tfp",
            "--policy",
            "h2o",
            "--budget",
            "0.3",
            "--layer-budgets",
            "calibrated",
            "--out",
            str(tmp_path / "bad"),
        ],
        check=False,
        timeout=300,
    )
    assert p.returncode != 0 and "python -m experiments.squeeze_calibrate --model tiny-llama" in p.stdout + p.stderr
    assert not (tmp_path / "bad").exists()
    cfg = tiny_config("llama")
    save_calibration(calibrate(cfg, W, [ids(64, 1)], p=0.3, source="test"), cfg)
    for pol in (
        ["--policy", "balancekv", "--budget", "0.25"],
        ["--policy", "h2o", "--budget", "0.3", "--layer-budgets", "calibrated"],
    ):
        for n, proto in ((2, ["--provider", "tfp"]), (3, ["--protocol", "replicated"])):  # 2PC and 3PC
            out = tmp_path / f"{pol[1]}-{n}"
            run_mpi(n, [*gen, *pol, *proto, "--out", str(out)], timeout=300)
            s = json.loads((out / "summary.json").read_text())
            assert s["tokens_agree"] and s["n_parties"] == n, (pol, n, s["tokens"], s["plaintext_tokens"])
    out = tmp_path / "bench"
    run_mpi(
        2,
        [
            "-m",
            "parties",
            "bench",
            "--provider",
            "tfp",
            "--model",
            "tiny-llama",
            "--text",
            "random",
            "--seq-lens",
            "96",
            "--policies",
            "full,balancekv,squeeze-h2o",
            "--budget",
            "0.25",
            "--out",
            str(out),
        ],
        timeout=600,
    )
    rows = {r["policy"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"full", "balancekv", "squeeze-h2o"}
    for label in ("balancekv", "squeeze-h2o"):
        assert rows[label]["selection_agreement"] == 1.0 and rows[label]["logit_err"] < 0.1, rows[label]
        assert rows[label]["static_rounds"] > 0 and rows[label]["attended"] < rows["full"]["attended"]


@pytest.mark.mpi
def test_balancekv_generation_cost_predicted_equal_measured(tmp_path):
    """The cost tracer runs BalanceKV's walk too: every scope of every party, predicted == measured (2PC)."""
    from conftest import mpi_job
    from test_costs import _compare_ledgers

    from mpcache.mpc.dryrun import Setting, predict_generation

    res = mpi_job(2, "generation_costs", tmp_path, "tiny-llama", "arithmetic", "tfp", "balancekv", "2", "80")
    pol = make_policy("balancekv", budget=0.3)
    assert repr(pol) == res["policy"] and pol.plan(80) == (4, 36, 4)
    pred, _ = predict_generation(tiny_config("llama"), pol, Setting(2, "arithmetic", "tfp"), 80, 2)
    bad = _compare_ledgers(res["ledgers"], pred)
    assert not bad, "\n".join(bad[:40])


@pytest.mark.mpi
def test_bench_scales_per_layer_budgets_exactly(tmp_path):
    """Distinct per-layer budgets are distinct cost classes: ``--layers auto`` runs the first 3 of 4 blocks (layer 2 is
    the first of the 0.6 class) and its scaled whole-model cost equals the all-layer run's exactly."""
    import csv

    from conftest import run_mpi

    from mpcache.model.weights import save_safetensors_folder

    cfg = dataclasses.replace(tiny_config("llama"), n_layers=4, name="tiny-llama-4")
    ckpt = tmp_path / "tiny4"
    save_safetensors_folder(cfg, init_random_weights(cfg, seed=3), ckpt)
    rows = {}
    for layers in ("auto", "all"):
        out = tmp_path / layers
        run_mpi(
            2,
            [
                "-m",
                "parties",
                "bench",
                "--provider",
                "tfp",
                "--model",
                str(ckpt),
                "--seq-lens",
                "80",
                "--text",
                "random",
                "--budget",
                "0.3",
                "--layer-budgets",
                "0.2,0.2,0.6,0.2",
                "--policies",
                "h2o,mpcache",
                "--layers",
                layers,
                "--steps",
                "1",
                "--out",
                str(out),
            ],
            timeout=600,
        )
        with open(out / "bench.csv") as f:
            rows[layers] = {r["policy"]: r for r in csv.DictReader(f)}
    for pol in ("h2o", "mpcache"):
        a, b = rows["auto"][pol], rows["all"][pol]
        assert (a["bench_layers"], b["bench_layers"]) == ("3", "4")
        assert float(a["bytes_per_token"]) == float(b["bytes_per_token"]), (a, b)
        assert float(a["rounds_per_token"]) == float(b["rounds_per_token"]), (a, b)
        assert float(a["selection_agreement"]) == 1.0


def test_balancekv_softmax_kernel_is_plaintext_only():
    import types

    from mpcache.policies.balancekv import balance_walk

    k = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="plaintext only .* use kernel='bounded' under MPC"):
        balance_walk(types.SimpleNamespace(secure=True), k, k, 1, 1.0, 4.0, 4, None, kernel="softmax")
