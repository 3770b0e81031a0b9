"""mpcache/policies: the one-hot Gather path against index gathering, public shapes, incremental summaries,
MPCache's selection against an independent torch re-implementation, budgets, and every policy inside the model.

Why one file (~550 lines): the plaintext contract of every policy, checked with the same fixtures.

Eviction decisions are compared as kept index sets on random Gaussian inputs (no ties in practice).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mpcache.backends import PlainBackend
from mpcache.model.transformer import KVCache, Transformer
from mpcache.model.weights import init_random_weights, tiny_config
from mpcache.policies import (
    REGISTRY,
    DecodeContext,
    Gather,
    MPCachePolicy,
    PrefillContext,
    QuestPolicy,
    make_policy,
    resolve_budget,
)
from mpcache.policies.base import as_selection, kept_count, nonempty
from mpcache.policies.snapkv import pool1d

torch.set_num_threads(1)
B = PlainBackend()
H, HKV, D = 4, 2, 16
G = H // HKV
STATIC = ("streaming", "h2o", "snapkv", "tova")
DYNAMIC = ("quest", "mpcache")
POLICIES = ("full",) + STATIC + DYNAMIC


# ---- helpers -------------------------------------------------------------------------------------------------
def prefill_ctx(n: int, seed: int, layer: int = 0, n_layers: int = 2, shared: dict | None = None) -> PrefillContext:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, n, D, generator=g) for h in (H, HKV, HKV))
    logits = torch.randn(H, n, n, generator=g) * 2
    attn = torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), dim=-1)
    return PrefillContext(B, layer, n_layers, q, k, v, attn, {}, {} if shared is None else shared)


def decode_ctx(
    L: int,
    seed: int,
    n_prompt: int | None = None,
    state: dict | None = None,
    K=None,
    layer: int = 0,
    shared: dict | None = None,
) -> DecodeContext:
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(HKV, L, D, generator=g) if K is None else K[:, :L]
    q = torch.randn(H, D, generator=g)
    return DecodeContext(
        B,
        layer,
        2,
        q,
        K,
        K + 1.0,
        L if n_prompt is None else n_prompt,
        {} if state is None else state,
        {} if shared is None else shared,
    )


def row_indices(g: Gather | None, L: int) -> torch.Tensor:
    """(Hkv, n_rows) cache rows a Gather returns, from its ranges and the argmax of its one-hot (plain only)."""
    if g is None:
        return torch.arange(L).expand(HKV, L)
    end = g.start + g.n_candidates * g.block
    before = [torch.arange(s, e) for s, e in g.ranges if e <= g.start]
    after = [torch.arange(s, e) for s, e in g.ranges if s >= end]
    parts = [torch.cat(before).expand(HKV, -1)] if before else []
    if g.onehot is not None:
        assert torch.equal(g.onehot.sum(-1), torch.ones(g.onehot.shape[:-1])), "one-hot rows must hold one 1"
        blocks = g.onehot.argmax(-1)  # (Hkv, k)
        if g.strata:  # compact form: slot j of row r is candidate strata_layout[r, j]
            from mpcache.layout import strata_layout

            layout, _ = strata_layout(g.strata, g.n_blocks_selected, g.interleave)
            blocks = layout[torch.arange(layout.shape[0]), blocks]
        rows = g.start + blocks[..., None] * g.block + torch.arange(g.block)  # (Hkv, k, block)
        parts.append(rows.reshape(HKV, -1))
    if after:
        parts.append(torch.cat(after).expand(HKV, -1))
    return torch.cat(parts, dim=1)


def index_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[h].index_select(0, idx[h]) for h in range(x.shape[0])])


def hook(name: str, n: int, seed: int, **kw):
    """(Gather, rows the gather reads from) of the policy's own hook: prefill for static ones, select for dynamic
    ones at decode step 0 of an n-token prompt (for mpcache, on a cache the size its static stage leaves)."""
    pol = make_policy(name, **kw)
    if name in DYNAMIC:
        n_prompt = pol.n_static(n) if name == "mpcache" else n
        ctx = decode_ctx(n_prompt + 1, seed, n_prompt=n_prompt, state={"mpcache/prompt_len": n})
        return as_selection(pol.select(ctx)).gather, ctx.k
    ctx = prefill_ctx(n, seed)
    return pol.prefill(ctx), ctx.k


# ---- budgets -------------------------------------------------------------------------------------------------
def test_budget_arithmetic():
    assert resolve_budget(None, None) == 0.1
    assert resolve_budget(0.25, None) == 0.25 and resolve_budget(None, 0.75) == 0.25 and resolve_budget(64, None) == 64
    assert kept_count(200, resolve_budget(None, 0.9)) == 20  # 1 - 0.9 is 0.0999...: round, never truncate
    assert kept_count(200, 0.1) == 20 and kept_count(205, 0.1) == 21 and kept_count(10, 0.01) == 1
    assert kept_count(100, 500) == 100 and kept_count(100, 1.0) == 100


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"budget": 0.1, "compression_ratio": 0.9}, "not both"),
        ({"budget": 0.0}, r"\(0, 1\]"),
        ({"budget": 1.5}, "pass an int"),
        ({"budget": -0.2}, r"\(0, 1\]"),
        ({"budget": 0}, ">= 1"),
        ({"budget": True}, "fraction"),
        ({"budget": "0.1"}, "fraction"),
        ({"compression_ratio": 1.0}, r"\[0, 1\)"),
        ({"compression_ratio": -0.1}, r"\[0, 1\)"),
    ],
)
@pytest.mark.parametrize("name", STATIC + DYNAMIC)
def test_budget_validation(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make_policy(name, **kw)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("streaming", {"sinks": -1}),
        ("h2o", {"recent_ratio": 1.5}),
        ("snapkv", {"kernel_size": 4}),
        ("snapkv", {"pooling": "median"}),
        ("snapkv", {"window": 0}),
        ("quest", {"page_size": 0}),
        ("mpcache", {"static_keep": 1.2}),
        ("mpcache", {"static_reduce": "sum"}),
        ("mpcache", {"alpha": 2.0}),
        ("mpcache", {"fanout": 1}),
        ("mpcache", {"ratio1": 0.0}),
        ("mpcache", {"window_fraction": 1.0}),
        ("mpcache", {"share_group": 0}),
        ("nosuch", {}),
    ],
)
def test_setting_validation(name, kw):
    with pytest.raises(ValueError):
        make_policy(name, **kw)


# ---- the one-hot Gather path equals index gathering; public shapes --------------------------------------------
CASES = [
    ("streaming", {"budget": 0.3}),
    ("h2o", {"budget": 0.3}),
    ("snapkv", {"budget": 0.3}),
    ("snapkv", {"budget": 0.3, "pooling": "max"}),
    ("snapkv", {"budget": 40}),
    ("tova", {"budget": 0.3}),
    ("quest", {"budget": 0.2}),
    ("mpcache", {"budget": 0.2}),
    ("mpcache", {"budget": 0.2, "linear": False}),
    ("mpcache", {"budget": 0.2, "hierarchy": False}),
    ("mpcache", {"budget": 0.2, "keep_last_cluster": True}),
    ("mpcache", {"budget": 0.5, "static": True, "static_reduce": "mean"}),
    ("mpcache", {"budget": 0.2, "head_reduce": "sum", "cluster_size": 16}),
    ("h2o", {"budget": 0.3, "recent_ratio": 0.0}),
    # the stratified tournament (compact one-hots) and the "auto" rule
    ("h2o", {"budget": 0.3, "topk": "strata"}),
    ("snapkv", {"budget": 0.3, "topk": "strata"}),
    ("tova", {"budget": 0.3, "topk": "auto"}),
    ("quest", {"budget": 0.2, "topk": "strata"}),
    ("mpcache", {"budget": 0.2, "topk": "strata"}),
    ("mpcache", {"budget": 0.2, "topk": "auto"}),
    ("mpcache", {"budget": 0.5, "static": True, "topk": "strata"}),
]


def case_id(kw) -> str:
    return "-".join(f"{k}={v}" for k, v in kw.items()) or "default"


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{case_id(kw)}" for n, kw in CASES])
def test_onehot_gather_equals_index_gather(name, kw):
    for n in (257, 600):
        g, k = hook(name, n, seed=n, **kw)
        assert g is not None and (g.onehot is not None or name == "streaming")
        idx = row_indices(g, k.shape[1])
        for h in range(HKV):  # every row at most once, and the Gather's row count
            assert len(set(idx[h].tolist())) == idx.shape[1] == g.n_rows
        assert torch.equal(g.apply(k, B), index_gather(k, idx))


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("budget", [0.1, 0.37, 50])
def test_rows_depend_only_on_public_sizes(name, budget):
    kw = {} if name == "full" else {"budget": budget}
    for n in (100, 333, 1000):
        rows = []
        for seed in (1, 2):
            g, k = hook(name, n, seed, **kw)
            rows.append(k.shape[1] if g is None else g.n_rows)
            if g is not None and g.onehot is not None:  # the one-hot's shape is public too
                rows.append(tuple(g.onehot.shape) + (g.start, g.block))
        assert rows[: len(rows) // 2] == rows[len(rows) // 2 :]
        pol = make_policy(name, **kw)
        expected = pol.attended_tokens(n, 0) if name in DYNAMIC else pol.attended_tokens(n, 0) - 1
        assert rows[0] == expected, (name, n, rows, expected)


def test_attended_fraction_tracks_budget():
    for name in STATIC:
        assert make_policy(name, budget=0.1).attended_fraction(4000) == pytest.approx(0.1, abs=1e-3)
    assert QuestPolicy(budget=0.1).attended_fraction(4000) == pytest.approx(0.1, abs=0.01)
    for kw in (
        {},
        {"static": True},
        {"hierarchy": False},
        {"static": True, "static_keep": 0.1},
        {"cluster_size": 16},
        {"share_layers": True},
    ):
        pol = MPCachePolicy(budget=0.1, **kw)
        assert pol.attended_fraction(4000) == pytest.approx(0.1, abs=0.01), kw
        assert pol.attended_fraction(4000, step=100) == pytest.approx(0.1, abs=0.01), kw
    assert MPCachePolicy(budget=0.1).n_static(4000) == 4000  # no static stage by default
    pol = MPCachePolicy(budget=0.1, static=True)
    assert pol.n_static(4000) == 4 + 800 + round(0.5 * (4000 - 804))  # sinks + window + half the middle
    for name in POLICIES[1:]:
        assert make_policy(name, budget=1.0).attended_fraction(500, 3) == 1.0


# ---- static stages against direct re-implementations -----------------------------------------------------------
def test_static_selections_match_reference():
    n = 300
    ctx = prefill_ctx(n, seed=5)
    grouped = lambda x: x.reshape(HKV, G, *x.shape[1:]).sum(1)
    # max pooling makes ties between neighbours: the backend's rule (lower index first) is part of the spec
    top = lambda s, k: torch.sort(-s, stable=True).indices[..., :k].sort(-1).values
    kept = lambda g: row_indices(g, n)
    # h2o: 45 recent + 45 by accumulated attention
    s = grouped(ctx.attn.sum(1))[:, : n - 45]
    ref = torch.cat([top(s, 45), torch.arange(n - 45, n).expand(HKV, -1)], 1)
    assert torch.equal(kept(make_policy("h2o", budget=0.3).prefill(ctx)), ref)
    # snapkv: window 32 + 58 by pooled window attention (F.avg_pool1d as the oracle)
    for mode in ("avg", "max"):
        s = grouped(ctx.attn[:, -32:, : n - 32].sum(1))[:, None]
        pool = torch.nn.functional.avg_pool1d if mode == "avg" else torch.nn.functional.max_pool1d
        s = pool(s, 7, stride=1, padding=3)[:, 0]
        ref = torch.cat([top(s, 58), torch.arange(n - 32, n).expand(HKV, -1)], 1)
        assert torch.equal(kept(make_policy("snapkv", budget=0.3, pooling=mode).prefill(ctx)), ref)
    # tova
    ref = top(grouped(ctx.attn[:, -1]), 90)
    assert torch.equal(kept(make_policy("tova", budget=0.3).prefill(ctx)), ref)
    # mpcache: sinks 4, window 60, half of the 236 middle tokens by the window attention (max or mean)
    for red in ("max", "mean"):
        win = ctx.attn[:, n - 60 :, 4 : n - 60]
        s = grouped(win.amax(1) if red == "max" else win.mean(1))
        ref = torch.cat([torch.arange(4).expand(HKV, -1), 4 + top(s, 118), torch.arange(n - 60, n).expand(HKV, -1)], 1)
        assert torch.equal(
            kept(MPCachePolicy(budget=0.1, static=True, static_reduce=red, topk="rank").prefill(ctx)), ref
        )


def test_lazy_attention_context_gives_the_same_selections():
    """A PrefillContext with ``attn_fn`` (the plaintext model's: probabilities computed on demand) gives the same
    static selections as one holding the materialised ``attn``, and ``attn`` itself is still available."""
    n = 300
    ctx = prefill_ctx(n, seed=6)
    calls = []

    def rows(a, b):
        calls.append((a, b))
        return ctx.attn[:, a:b]

    lazy = PrefillContext(B, 0, 2, ctx.q, ctx.k, ctx.v, None, {}, {}, attn_fn=rows)
    assert torch.equal(lazy.attn_rows(10, 20), ctx.attn[:, 10:20])
    assert torch.allclose(lazy.attn_colsum(chunk=64), ctx.attn.sum(1), atol=1e-5)
    for name in STATIC + ("mpcache",):
        for b in (0.1, 0.3):
            lazy = PrefillContext(B, 0, 2, ctx.q, ctx.k, ctx.v, None, {}, {}, attn_fn=rows)
            calls.clear()
            kw = {"static": True} if name == "mpcache" else {}
            got, ref = make_policy(name, budget=b, **kw).prefill(lazy), make_policy(name, budget=b, **kw).prefill(ctx)
            assert got is not None, name
            assert torch.equal(row_indices(got, n), row_indices(ref, n)), (name, b)
            assert all(e - a < n for a, e in calls) or name == "h2o", (name, calls)  # never all rows at once
    lazy = PrefillContext(B, 0, 2, ctx.q, ctx.k, ctx.v, None, {}, {}, attn_fn=rows)
    assert torch.equal(lazy.attn, ctx.attn) and "attn" not in repr(lazy)


def test_pool1d_matches_torch():
    x = torch.rand(HKV, 50)
    assert torch.allclose(pool1d(B, x, 7, "avg"), 7 * torch.nn.functional.avg_pool1d(x[:, None], 7, 1, 3)[:, 0])
    assert torch.equal(pool1d(B, x, 5, "max"), torch.nn.functional.max_pool1d(x[:, None], 5, 1, 2)[:, 0])


# ---- incremental summaries and MPCache's dynamic selection ------------------------------------------------------
def reference_clusters(pol: MPCachePolicy, K: torch.Tensor, q: torch.Tensor, n_full: int, n_prompt: int) -> list:
    """Chosen fine clusters per KV head, recomputed from scratch with plain torch (sets of cluster ids)."""
    L, S2, f = K.shape[1], pol.cluster_size, pol.fanout
    plan = pol.dynamic_plan(L, n_full + L - n_prompt)
    qg = q.reshape(HKV, G, D)

    def scores(size: int, c: int) -> torch.Tensor:  # (Hkv, c) over clusters of `size` rows from S2
        blocks = K[:, S2 : S2 + c * size].reshape(HKV, c, size, D)
        rmax, rmin = blocks.amax(2), blocks.amin(2)
        if pol.linear and pol.head_reduce == "sum":  # the group's queries summed first: one product per cluster
            return torch.einsum("hd,hcd->hc", qg.sum(1), pol.alpha * rmax + (1 - pol.alpha) * rmin)
        if pol.linear:  # each head's score, then the max over the group's heads
            per_head = torch.einsum("hgd,hcd->hgc", qg, pol.alpha * rmax + (1 - pol.alpha) * rmin)
        else:
            per_head = torch.maximum(qg[:, :, None] * rmax[:, None], qg[:, :, None] * rmin[:, None]).sum(3)
        return per_head.sum(1) if pol.head_reduce == "sum" else per_head.amax(1)

    s2 = scores(S2, plan.C2)
    out = []
    for h in range(HKV):
        if pol.hierarchy and plan.k1 < plan.C1:
            chosen = scores(f * S2, plan.C1)[h].topk(plan.k1).indices
            cand = (chosen[:, None] * f + torch.arange(f)).flatten()
        else:
            cand = torch.arange(plan.C2)
        out.append(set(cand[s2[h, cand].topk(plan.k2).indices].tolist()))
    return out


SELECT_CASES = [
    {},
    {"linear": False},
    {"hierarchy": False},
    {"keep_last_cluster": True},
    {"fanout": 4, "cluster_size": 8},
    {"ratio1": 0.25},
    {"head_reduce": "sum"},
    {"head_reduce": "sum", "linear": False},
    {"cluster_size": 16, "share_layers": True},
]


@pytest.mark.parametrize("kw", SELECT_CASES, ids=case_id)
def test_mpcache_selection_matches_torch_topk_over_steps(kw):
    """Decode 70 steps over a growing cache: the selected clusters equal a from-scratch torch re-implementation,
    and the incrementally kept summaries equal a direct recomputation at every step."""
    pol = MPCachePolicy(budget=0.15, **{"topk": "rank", **kw})  # the exact top-k (strata: own test)
    n_full, n_prompt = 1500, 900  # as if the static stage had kept 900 of 1500 prompt rows
    g = torch.Generator().manual_seed(11)
    K = torch.randn(HKV, n_prompt + 70, D, generator=g)
    state: dict = {}
    S2, f = pol.cluster_size, pol.fanout
    try:
        from kernels.cluster_summary import cluster_summary_reference
    except ImportError:  # pragma: no cover
        cluster_summary_reference = None
    for step in range(70):
        L = n_prompt + step + 1
        ctx = decode_ctx(L, seed=step, n_prompt=n_prompt, state=state, K=K)
        state["mpcache/prompt_len"] = n_full
        gat = as_selection(pol.select(ctx)).gather
        plan = pol.dynamic_plan(L, n_full + L - n_prompt)
        got = [set(gat.onehot[h].argmax(-1).tolist()) for h in range(HKV)]
        assert got == reference_clusters(pol, K[:, :L], ctx.q, n_full, n_prompt), (step, plan)
        assert gat.n_rows == L - (plan.C2 - plan.k2) * S2 and gat.ranges == nonempty((0, S2), (plan.end, L))
        fine = state[f"mpcache/fine{S2}"]
        c2 = (L - S2) // S2
        blocks = K[:, S2 : S2 + c2 * S2].reshape(HKV, c2, S2, D)
        assert fine.count == c2 and torch.equal(fine.max, blocks.amax(2)) and torch.equal(fine.min, blocks.amin(2))
        if cluster_summary_reference is not None:
            ref_max, ref_min = cluster_summary_reference(K[:, S2 : S2 + c2 * S2], S2)
            assert torch.equal(fine.max, ref_max) and torch.equal(fine.min, ref_min)
        if pol.linear:
            assert torch.allclose(fine.rep, pol.alpha * fine.max + (1 - pol.alpha) * fine.min)
        coarse = state.get(f"mpcache/coarse{S2}x{f}")
        if coarse is not None and coarse.count:
            c1 = coarse.count
            assert c1 <= c2 // f
            big = K[:, S2 : S2 + c1 * f * S2].reshape(HKV, c1, f * S2, D)
            assert torch.equal(coarse.max, big.amax(2)) and torch.equal(coarse.min, big.amin(2))


def test_mpcache_gather_layout_and_forced_rows():
    pol = MPCachePolicy(budget=0.15, topk="rank")
    n_full, n_prompt, L = 1500, 900, 913
    state = {"mpcache/prompt_len": n_full}
    gat = as_selection(pol.select(decode_ctx(L, seed=3, n_prompt=n_prompt, state=state))).gather
    plan = pol.dynamic_plan(L, n_full + L - n_prompt)
    S2, f = pol.cluster_size, pol.fanout
    assert gat.start == S2 and gat.block == S2 and gat.onehot.shape == (HKV, plan.k2, plan.C2)
    assert gat.ranges == ((0, S2), (plan.end, L)) and plan.end == S2 + f * S2 * plan.C1
    assert pol.recent <= L - plan.end < pol.recent + f * S2  # the newest rows are never candidates
    assert gat.keeps_ends(4, pol.recent, L) and not gat.keeps_ends(S2 + 1, 1, L)
    assert abs(gat.n_rows - pol.kept(n_full + L - n_prompt)) <= S2 // 2  # nearest multiple of the cluster size


def test_quest_selection_and_page_summaries():
    pol = QuestPolicy(budget=0.2)
    state: dict = {}
    g = torch.Generator().manual_seed(4)
    K = torch.randn(HKV, 520, D, generator=g)
    for L in range(480, 520):
        ctx = decode_ctx(L, seed=L, state=state, K=K)
        gat = pol.select(ctx)
        C, k, end = pol.plan(L)
        pages = K[:, 16 : 16 + 16 * C].reshape(HKV, C, 16, D)
        rmax, rmin = pages.amax(2), pages.amin(2)
        qg = ctx.q.reshape(HKV, G, D)
        s = torch.maximum(qg[:, :, None] * rmax[:, None], qg[:, :, None] * rmin[:, None]).sum((1, 3))
        try:
            from kernels.cluster_scores import cluster_scores_exact_reference

            assert torch.allclose(
                s, sum(cluster_scores_exact_reference(qg[:, j], rmax, rmin) for j in range(G)), rtol=1e-5, atol=1e-5
            )
        except ImportError:  # pragma: no cover
            pass
        ref = [set(s[h].topk(k).indices.tolist()) for h in range(HKV)]
        assert [set(gat.onehot[h].argmax(-1).tolist()) for h in range(HKV)] == ref
        assert gat.ranges == nonempty((0, 16), (end, L)) and gat.n_rows == pol.attended_tokens(L - 1)
        summ = state["quest/pages16"]
        full = (L - 16) // 16
        assert summ.count == full and torch.equal(summ.max[:, :C], rmax) and torch.equal(summ.min[:, :C], rmin)


def test_layer_sharing():
    assert [MPCachePolicy().leader(i) for i in range(4)] == [0, 1, 2, 3]  # no sharing by default
    pol = MPCachePolicy(budget=0.2, static=True, share_layers=True)
    assert [pol.leader(i) for i in range(8)] == [0, 1, 2, 2, 4, 4, 6, 6]
    assert [MPCachePolicy(share_layers=True, share_start=1, share_group=3).leader(i) for i in range(8)] == [
        0,
        1,
        1,
        1,
        4,
        4,
        4,
        7,
    ]
    assert [MPCachePolicy(share_layers=False).leader(i) for i in range(4)] == [0, 1, 2, 3]
    shared: dict = {}
    g2 = pol.prefill(prefill_ctx(400, seed=1, layer=2, n_layers=4, shared=shared))
    assert pol.prefill(prefill_ctx(400, seed=2, layer=3, n_layers=4, shared=shared)) is g2
    g3 = dataclasses.replace(pol, share_static=False).prefill(prefill_ctx(400, 2, layer=3, n_layers=4, shared=shared))
    assert g3 is not g2 and g3.n_rows == g2.n_rows
    shared = {}
    d2 = as_selection(pol.select(decode_ctx(600, seed=1, layer=2, shared=shared))).gather
    assert as_selection(pol.select(decode_ctx(600, seed=2, layer=3, shared=shared))).gather is d2 and d2 is not None


# ---- inside the model --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("llama")  # 2 layers, hidden 64, 4 heads, 2 KV heads, head dim 16
    return cfg, init_random_weights(cfg, seed=0)


def run_model(cfg, w, policy, n: int = 200, steps: int = 5):
    model = Transformer(cfg, w, B, policy)
    cache = KVCache(cfg.n_layers)
    tokens = torch.randint(0, cfg.vocab_size, (n + steps,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = [model.prefill(tokens[:n], cache)]
    for t in tokens[n:]:  # teacher forcing: every policy sees the same tokens
        logits.append(model.decode(t, cache))
    return torch.cat(logits), cache


@pytest.fixture(scope="module")
def full_run(tiny):
    return run_model(*tiny, make_policy("full"))


@pytest.mark.parametrize("name", POLICIES)
def test_policy_in_model(tiny, full_run, name):
    cfg, w = tiny
    for kw in [{}] if name == "full" else [{"budget": 0.1}, {"budget": 0.3}, {"compression_ratio": 0.5}]:
        pol = make_policy(name, **kw)
        logits, cache = run_model(cfg, w, pol)
        assert logits.shape == (6, cfg.vocab_size) and torch.isfinite(logits).all(), kw
        assert torch.equal(logits[0], full_run[0][0])  # the prefill itself is never evicted
        n_static = pol.n_static(200) if name == "mpcache" else (200 if name in ("full", "quest") else pol.kept(200))
        assert cache.n_prompt == n_static and cache.length == n_static + 5
    if name != "full":  # keep everything: exactly the full cache's computation
        same, cache = run_model(cfg, w, make_policy(name, budget=1.0))
        assert cache.n_prompt == 200 and torch.equal(same, full_run[0])


def test_mpcache_switches_in_model(tiny, full_run):
    cfg, w = tiny
    for kw in (
        {"static": True},
        {"linear": False},
        {"hierarchy": False},
        {"static": True, "static_reduce": "mean"},
        {"head_reduce": "sum"},
        {"share_layers": True},
        {"cluster_size": 16},
    ):
        logits, _ = run_model(cfg, w, MPCachePolicy(budget=0.3, **kw))
        assert torch.isfinite(logits).all(), kw
    four = dataclasses.replace(cfg, n_layers=4)
    logits, cache = run_model(
        four, init_random_weights(four, seed=1), MPCachePolicy(budget=0.3, static=True, share_layers=True)
    )
    assert torch.isfinite(logits).all()
    # layer 3 shares layer 2's static selection: same number of rows, and the state of the follower stays empty
    assert cache.k[3].shape == cache.k[2].shape and not any(k.startswith("mpcache/fine") for k in cache.state[3])


class MaterialisedBackend(type(B)):
    """The plaintext ops with ``secure = True``: the model then takes its secure-path prefill (full (H, n, n)
    softmax with a public mask, probabilities handed to the policy), on torch tensors."""

    secure = True


@pytest.mark.parametrize("name", POLICIES)
def test_plain_prefill_fast_path_matches_materialised_path(tiny, name):
    cfg, w = tiny
    pol = make_policy(name) if name == "full" else make_policy(name, budget=0.3)
    fast, cache = run_model(cfg, w, pol)
    model, ref_cache = Transformer(cfg, w, MaterialisedBackend(), pol), KVCache(cfg.n_layers)
    tokens = torch.randint(0, cfg.vocab_size, (205,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = [model.prefill(tokens[:200], ref_cache)] + [model.decode(t, ref_cache) for t in tokens[200:]]
    assert torch.allclose(fast, torch.cat(ref), atol=1e-4)
    assert [k.shape for k in cache.k] == [k.shape for k in ref_cache.k]


def test_registry():
    assert set(POLICIES) <= set(REGISTRY)
    for name in POLICIES:
        assert make_policy(name).name == name


def test_strata_selection_is_the_max_of_each_stratum():
    """topk="strata": row r of the selection is the best-scoring candidate of public stratum r (ties: first)."""
    from mpcache.layout import strata_layout

    pol = make_policy("mpcache", budget=0.2, topk="strata")
    ctx = decode_ctx(600, seed=3)
    g = as_selection(pol.select(ctx)).gather
    S = pol.cluster_size
    C = g.strata
    keys = ctx.k[:, S : S + C * S].reshape(HKV, C, S, D)
    rep = 0.6 * keys.max(2).values + 0.4 * keys.min(2).values  # (Hkv, C, D)
    q = ctx.q.reshape(HKV, G, D)
    scores = torch.einsum("hgd,hcd->hgc", q, rep).max(1).values  # max over the group's heads
    layout, valid = strata_layout(C, g.n_blocks_selected, g.interleave)
    s = scores[:, layout].masked_fill(~valid, float("-inf"))
    assert torch.equal(g.onehot.argmax(-1), s.argmax(-1))


@pytest.mark.parametrize("head_reduce", ["max", "sum"])
def test_strata_decode_summaries_made_in_the_tournament_match_direct(head_reduce):
    """Over a growing cache (strata selection): a cluster is summarised in the step's tournament once complete
    (ops.strata_select ``also``), never scored before it is, and every step the kept summaries equal a direct
    recomputation; the selection is the max of each stratum; the anchors' max is handed to the attention."""
    from mpcache.layout import strata_layout

    pol = make_policy("mpcache", budget=0.1, topk="strata", head_reduce=head_reduce)
    S = pol.cluster_size
    g0 = torch.Generator().manual_seed(5)
    K = torch.randn(HKV, 700, D, generator=g0)
    state: dict = {}
    for step in range(9):
        L = 690 + step
        ctx = decode_ctx(L, seed=step, state=state, K=K)
        ctx.anchor = (4, 8)
        ctx.qk = torch.einsum("hgd,hld->hgl", ctx.q.reshape(HKV, G, D) / D**0.5, ctx.k)
        sel = pol.select(ctx)
        g = sel.gather
        c_full = (L - S) // S
        fine = state[f"mpcache/fine{S}"]
        blocks = K[:, S : S + c_full * S].reshape(HKV, c_full, S, D)
        assert fine.count == c_full and g.strata <= c_full
        assert torch.equal(fine.max, blocks.amax(2)) and torch.equal(fine.min, blocks.amin(2))
        rep = 0.6 * blocks[:, : g.strata].amax(2) + 0.4 * blocks[:, : g.strata].amin(2)
        per_head = torch.einsum("hgd,hcd->hgc", ctx.q.reshape(HKV, G, D) / D**0.5, rep)
        scores = per_head.amax(1) if head_reduce == "max" else per_head.sum(1)
        layout, valid = strata_layout(g.strata, g.n_blocks_selected, g.interleave)
        assert torch.equal(g.onehot.argmax(-1), scores[:, layout].masked_fill(~valid, float("-inf")).argmax(-1))
        qk = sel.qk
        want = torch.cat([qk[..., :4], qk[..., L - 8 :]], -1).amax(-1, keepdim=True)
        assert g.keeps_ends(4, 8, L) and torch.equal(sel.offset, want)


@pytest.mark.parametrize("strata", [True, False], ids=["compact", "dense"])
def test_attention_in_place_equals_gathered_rows(strata):
    """The MPC decode path that never moves K/V (scores against every row, the selected blocks' scores gathered by
    the one-hot, probabilities scattered back by its transpose, p·V over every row) gives the attention of the
    gathered rows; scatter_blocks is the transpose of select_blocks (zeros at unselected blocks)."""
    from mpcache.model import attention
    from mpcache.mpc.ops import strata_top1_onehot_reference
    from mpcache.policies.base import Gather

    cfg = tiny_config("llama")
    model = Transformer(cfg, init_random_weights(cfg, seed=0), B)
    g = torch.Generator().manual_seed(5)
    Hkv, hd, blk, C, k = cfg.n_kv_heads, cfg.head_dim, 4, 12, 3
    L = blk + C * blk + 5
    kk, vv = torch.randn(Hkv, L, hd, generator=g), torch.randn(Hkv, L, hd, generator=g)
    q = torch.randn(cfg.n_heads, 1, hd, generator=g)
    scores = torch.randn(Hkv, C, generator=g)
    if strata:
        onehot = strata_top1_onehot_reference(scores, k).float()
        gather = Gather(ranges=nonempty((0, blk), (blk + C * blk, L)), onehot=onehot, start=blk, block=blk, strata=C)
    else:
        onehot = torch.nn.functional.one_hot(scores.topk(k, dim=-1).indices, C).float()
        gather = Gather(ranges=nonempty((0, blk), (blk + C * blk, L)), onehot=onehot, start=blk, block=blk)
    assert gather.covers(L)
    want, _ = model._attend(q, gather.apply(kk, B), gather.apply(vv, B))
    got = attention.attend_selected(B, model.heads, q, gather, kk, vv, anchor=model.DECODE_ANCHOR)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    y = torch.randn(Hkv, k, 7, generator=g)
    blocks = torch.randn(Hkv, C, 7, generator=g)
    # <scatter(y), blocks> == <y, select(blocks)>: the adjoint
    lhs = (gather.scatter_blocks(y, B) * blocks).sum()
    rhs = (y * gather.select_blocks(blocks, B)).sum()
    assert torch.allclose(lhs, rhs, atol=1e-4)
    picked = gather.scatter_blocks(y, B).abs().sum(-1) > 0
    assert int(picked.sum()) == Hkv * k


def test_interleaved_strata_hold_every_candidate_once_with_neighbours_apart():
    """strata_layout(..., interleave=True): every candidate in exactly one valid slot, rows increasing, strata sizes
    within one, and candidates c, c + 1 never in one stratum (while k > 1); the Gather's slot map inverts it."""
    from mpcache.layout import strata_layout
    from mpcache.policies.base import Gather

    for m, k in ((23, 5), (146, 13), (40, 40), (7, 1), (1000, 97)):
        idx, valid = strata_layout(m, k, interleave=True)
        assert sorted(idx[valid].tolist()) == list(range(m))
        assert all(bool((row[1:] > row[:-1]).all()) for row, ok in zip(idx, valid) for row in [row[ok]])
        sizes = valid.sum(1)
        assert int(sizes.max() - sizes.min()) <= 1
        stratum = torch.empty(m, dtype=torch.long)
        stratum[idx[valid]] = torch.arange(k)[:, None].expand_as(idx)[valid]
        if k > 1:
            assert bool((stratum[1:] != stratum[:-1]).all())
        g = Gather(onehot=torch.zeros(1, k, int(idx.shape[1])), start=0, block=1, strata=m, interleave=True)
        _, first = g._slots()
        assert torch.equal(idx.reshape(-1)[first], torch.arange(m))
