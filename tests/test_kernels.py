"""kernels/: every Triton kernel against its torch reference, on odd, non-power-of-two shapes.

On the CPU the kernels run on the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before the
kernels are defined). The shapes are small because the interpreter costs milliseconds per program and loop step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels._triton as kt
from kernels.cluster_scores import (
    cluster_scores,
    cluster_scores_exact_reference,
    cluster_scores_reference,
    cluster_scores_triton,
)
from kernels.cluster_summary import cluster_summary, cluster_summary_reference, cluster_summary_triton, parent_summary
from kernels.sparse_decode_attention import (
    dense_decode_attention_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
    sparse_decode_attention_triton,
)

# Tolerance for fp32 sums that the kernel and torch evaluate in different orders (scores: D <= 64 products;
# attention: up to 257 softmax terms). Reordering a sum of n fp32 terms moves it by about sqrt(n) * eps relative
# to the size of the terms (eps = 1.2e-7), i.e. ~1e-6 for n <= 257 with O(1) randn inputs; the worst-case bound
# n * eps is ~3e-5. rtol = 1e-5 covers large results (the exact Quest scores reach ~100, where one ulp is 7.6e-6);
# atol = 1e-5 covers results near 0, where the terms cancel. Max/min are exact, so summaries use torch.equal.
FP32 = {"rtol": 1e-5, "atol": 1e-5}

REPO = Path(__file__).resolve().parents[1]

# Rows >= L hold this value. If a kernel ever read them, max/min and softmax results would be visibly wrong.
POISON = 1e4


def keys(Hkv: int, L: int, D: int, pad: int = 3, seed: int = 0) -> torch.Tensor:
    """(Hkv, L + pad, D) randn keys; the `pad` rows past L are poison (alternating +-POISON)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(Hkv, L + pad, D, generator=g)
    K[:, L:] = POISON * (1 - 2 * (torch.arange(pad * D).reshape(pad, D) % 2))
    return K


# --------------------------------------------------------------------------------------------------------------
# cluster_summary / parent_summary
# --------------------------------------------------------------------------------------------------------------
SUMMARY_SHAPES = [  # (L, D, S)
    pytest.param(37, 64, 16, id="L37-D64-S16"),
    pytest.param(100, 48, 32, id="L100-D48-S32"),
    pytest.param(257, 64, 16, id="L257-D64-S16"),
    pytest.param(257, 48, 32, id="L257-D48-S32"),
    pytest.param(64, 48, 16, id="L64-D48-S16-no_tail"),
    pytest.param(5, 64, 16, id="L5-D64-S16-one_partial"),
]


@pytest.mark.parametrize("tail", ["valid", "window"])
@pytest.mark.parametrize("L, D, S", SUMMARY_SHAPES)
def test_cluster_summary_matches_reference(L, D, S, tail):
    K = keys(3, L, D)
    rmax, rmin = cluster_summary_triton(K, S, L=L, tail=tail)
    ref_max, ref_min = cluster_summary_reference(K, S, L=L, tail=tail)
    assert rmax.shape == (3, -(-L // S), D)
    assert torch.equal(rmax, ref_max) and torch.equal(rmin, ref_min)
    assert rmax.abs().max() < POISON  # padding rows were never read


@pytest.mark.parametrize(
    "L, S",
    [(37, 16), (100, 16), (257, 16), (100, 32), (96, 16)],
    ids=["L37-S16", "L100-S16", "L257-S16", "L100-S32", "L96-S16-no_tail"],
)
def test_cluster_summary_reference_matches_definition(L, S):
    """The vectorised reference equals a literal per-cluster loop (both tail rules)."""
    K = keys(2, L, 48)
    for tail in ("valid", "window"):
        rmax, rmin = cluster_summary_reference(K, S, L=L, tail=tail)
        for c in range(-(-L // S)):
            start = c * S if (tail == "valid" or (c + 1) * S <= L) else max(L - S, 0)
            rows = K[:, start : min(start + S, L)]
            assert torch.equal(rmax[:, c], rows.amax(1)) and torch.equal(rmin[:, c], rows.amin(1))


@pytest.mark.parametrize(
    "L, S",
    [(37, 16), (100, 16), (257, 16), (96, 16), (100, 8)],
    ids=["L37-S16-odd_C", "L100-S16-odd_C", "L257-S16-odd_C", "L96-S16-even_C", "L100-S8-odd_C"],
)
def test_parent_summary_equals_direct_summary_at_2S(L, S):
    K = keys(3, L, 48)
    child_max, child_min = cluster_summary(K, S, L=L)
    parent_max, parent_min = parent_summary(child_max, child_min)
    direct_max, direct_min = cluster_summary(K, 2 * S, L=L)
    assert torch.equal(parent_max, direct_max) and torch.equal(parent_min, direct_min)


# --------------------------------------------------------------------------------------------------------------
# cluster_scores
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [False, True], ids=["linear", "exact"])
@pytest.mark.parametrize(
    "C, D, alpha",
    [
        pytest.param(1, 64, 0.6, id="C1-D64"),
        pytest.param(7, 48, 0.6, id="C7-D48"),
        pytest.param(17, 64, 0.6, id="C17-D64"),
        pytest.param(33, 48, 0.6, id="C33-D48-two_blocks"),
        pytest.param(17, 48, 0.25, id="C17-D48-alpha0.25"),
    ],
)
def test_cluster_scores_matches_reference(C, D, alpha, exact):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, D, generator=g) * 3  # a KV group's query: the sum of G = 3 heads
    a, b = torch.randn(2, 3, C, D, generator=g)
    rmax, rmin = torch.maximum(a, b), torch.minimum(a, b)
    s = cluster_scores_triton(q, rmax, rmin, alpha=alpha, exact=exact)
    ref = cluster_scores_exact_reference(q, rmax, rmin) if exact else cluster_scores_reference(q, rmax, rmin, alpha)
    assert s.shape == (3, C) and s.dtype == torch.float32
    torch.testing.assert_close(s, ref, **FP32)


def test_exact_score_bounds_every_key_in_the_cluster():
    """The Quest score is an upper bound on q . k over the keys of the cluster (sanity check of the spec)."""
    K = keys(3, 100, 48)
    q = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    rmax, rmin = cluster_summary_reference(K, 16, L=100)
    bound = cluster_scores_exact_reference(q, rmax, rmin)  # (Hkv, C)
    dots = torch.einsum("hd,hld->hl", q, K[:, :100])
    best = torch.nn.functional.pad(dots, (0, 12), value=float("-inf")).reshape(3, 7, 16).amax(-1)
    assert (best <= bound + 1e-4).all()


# --------------------------------------------------------------------------------------------------------------
# sparse_decode_attention
# --------------------------------------------------------------------------------------------------------------
def attention_inputs(Hkv: int, G: int, L: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Hkv * G, D, generator=g)
    return q, keys(Hkv, L, D, seed=seed + 1), keys(Hkv, L, D, seed=seed + 2)


def random_selection(Hkv: int, C: int, k: int, with_last: bool, seed: int = 0) -> torch.Tensor:
    """(Hkv, k) distinct cluster ids per KV head; with_last forces in the (possibly partial) last cluster."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(Hkv):
        ids = torch.randperm(C - 1, generator=g)[: k - 1] if with_last else torch.randperm(C, generator=g)[:k]
        rows.append(torch.cat([ids, torch.tensor([C - 1])]) if with_last else ids)
    return torch.stack(rows)


ATTENTION_CASES = [  # (Hkv, G, D, L, S, k, with_last, num_splits)
    pytest.param(3, 3, 64, 37, 16, 2, True, 1, id="Hkv3-G3-D64-L37-S16-k2-last-split1"),
    pytest.param(3, 3, 48, 100, 16, 3, True, 2, id="Hkv3-G3-D48-L100-S16-k3-last-split2"),
    pytest.param(3, 3, 64, 257, 32, 4, False, 3, id="Hkv3-G3-D64-L257-S32-k4-split3"),
    pytest.param(3, 3, 48, 257, 16, 6, True, 4, id="Hkv3-G3-D48-L257-S16-k6-last-split4"),
    pytest.param(2, 4, 48, 100, 32, 2, True, 2, id="Hkv2-G4-D48-L100-S32-k2-last-split2"),
    pytest.param(3, 1, 64, 100, 16, 3, False, 2, id="Hkv3-G1-D64-L100-S16-k3-split2"),
]


@pytest.mark.parametrize("Hkv, G, D, L, S, k, with_last, num_splits", ATTENTION_CASES)
def test_sparse_decode_attention_matches_reference(Hkv, G, D, L, S, k, with_last, num_splits):
    q, K, V = attention_inputs(Hkv, G, L, D)
    sel = random_selection(Hkv, -(-L // S), k, with_last)
    o = sparse_decode_attention_triton(q, K, V, sel, S, L=L, num_splits=num_splits)
    ref = sparse_decode_attention_reference(q, K, V, sel, S, L=L)
    assert o.shape == q.shape
    torch.testing.assert_close(o, ref, **FP32)
    assert o.abs().max() < 10  # no poison row (|V| = 1e4) leaked into the average


# (dtype, tolerance): both sides compute in fp32 from the same rounded inputs, so the only new error is the final
# rounding of o to the storage dtype: half an ulp, 2**-11 (fp16) or 2**-8 (bf16) relative, for |o| <= ~3.
@pytest.mark.parametrize(
    "dtype, tol",
    [
        pytest.param(torch.float16, {"rtol": 1e-3, "atol": 2e-3}, id="fp16"),
        pytest.param(torch.bfloat16, {"rtol": 8e-3, "atol": 1.6e-2}, id="bf16"),
    ],
)
def test_sparse_decode_attention_low_precision_inputs(dtype, tol):
    q, K, V = (x.to(dtype) for x in attention_inputs(3, 3, 100, 48, seed=5))
    sel = random_selection(3, 7, 3, with_last=True)
    o = sparse_decode_attention_triton(q, K, V, sel, 16, L=100, num_splits=2)
    assert o.dtype == dtype
    torch.testing.assert_close(o, sparse_decode_attention_reference(q, K, V, sel, 16, L=100), **tol)


@pytest.mark.parametrize(
    "Hkv, G, D, L, S",
    [
        pytest.param(3, 3, 64, 37, 16, id="Hkv3-G3-D64-L37-S16"),
        pytest.param(3, 3, 48, 257, 32, id="Hkv3-G3-D48-L257-S32"),
        pytest.param(3, 3, 48, 100, 16, id="Hkv3-G3-D48-L100-S16"),
    ],
)
def test_sparse_with_all_clusters_equals_dense(Hkv, G, D, L, S):
    q, K, V = attention_inputs(Hkv, G, L, D, seed=3)
    C = -(-L // S)
    sel = torch.stack([torch.randperm(C, generator=torch.Generator().manual_seed(h)) for h in range(Hkv)])
    dense = dense_decode_attention_reference(q, K, V, L)
    torch.testing.assert_close(sparse_decode_attention_reference(q, K, V, sel, S, L=L), dense, **FP32)
    torch.testing.assert_close(sparse_decode_attention(q, K, V, sel, S, L=L), dense, **FP32)


def test_split_count_does_not_change_the_result():
    q, K, V = attention_inputs(3, 3, 100, 48, seed=4)
    sel = random_selection(3, 7, 5, with_last=True)
    outs = [sparse_decode_attention_triton(q, K, V, sel, 16, L=100, num_splits=n) for n in (1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **FP32)


# --------------------------------------------------------------------------------------------------------------
# Dispatch and input checks
# --------------------------------------------------------------------------------------------------------------
def test_dispatch_uses_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(kt, "INTERPRET", False)
    q, K, V = attention_inputs(3, 3, 37, 48)
    sel = random_selection(3, 3, 2, with_last=True)
    assert torch.equal(
        sparse_decode_attention(q, K, V, sel, 16, L=37), sparse_decode_attention_reference(q, K, V, sel, 16, L=37)
    )
    summary = cluster_summary(K, 16, L=37)
    assert all(torch.equal(a, b) for a, b in zip(summary, cluster_summary_reference(K, 16, L=37)))
    assert torch.equal(cluster_scores(q[:3], *summary), cluster_scores_reference(q[:3], *summary))


def test_bad_arguments_raise_value_error():
    K = keys(3, 37, 48)
    with pytest.raises(ValueError, match="tail"):
        cluster_summary(K, 16, tail="pad")
    with pytest.raises(ValueError, match="L must be"):
        cluster_summary(K, 16, L=100)
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode_attention(torch.randn(4, 48), K, K, torch.zeros(3, 1, dtype=torch.long), 16)


# --------------------------------------------------------------------------------------------------------------
# Compile-only: every kernel lowers to a cubin for an H100 (sm_90), no GPU needed (ptxas ships with triton).
# --------------------------------------------------------------------------------------------------------------
ATTN_BLOCKS = {"BLOCK_G": 4, "BLOCK_S": 16, "BLOCK_D": 64}
PARTS = {"M_PART": "*fp32", "L_PART": "*fp32", "ACC_PART": "*fp32"}
COMPILE_CASES = {  # id -> (module, kernel, pointer types, constexprs, float args); every other argument is i32
    "cluster_summary-fp32": (
        "cluster_summary",
        "_cluster_summary_kernel",
        {"K": "*fp32", "RMAX": "*fp32", "RMIN": "*fp32"},
        {"TAIL_WINDOW": False, "BLOCK_S": 16, "BLOCK_D": 64},
        [],
    ),
    "cluster_summary-window-fp16": (
        "cluster_summary",
        "_cluster_summary_kernel",
        {"K": "*fp16", "RMAX": "*fp16", "RMIN": "*fp16"},
        {"TAIL_WINDOW": True, "BLOCK_S": 32, "BLOCK_D": 128},
        [],
    ),
    **{
        f"cluster_scores-{mode}": (
            "cluster_scores",
            "_cluster_scores_kernel",
            {"Q": "*fp32", "RMAX": "*fp32", "RMIN": "*fp32", "OUT": "*fp32"},
            {"EXACT": mode == "exact", "BLOCK_C": 32, "BLOCK_D": 64},
            ["alpha"],
        )
        for mode in ("linear", "exact")
    },
    **{
        f"sparse_decode_split-{dt}": (
            "sparse_decode_attention",
            "_sparse_decode_split_kernel",
            dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", SEL="*i64", **PARTS),
            ATTN_BLOCKS,
            ["qk_scale"],
        )
        for dt in ("fp32", "fp16", "bf16")
    },
    "merge_splits-fp16": (
        "sparse_decode_attention",
        "_merge_splits_kernel",
        dict(OUT="*fp16", **PARTS),
        {"BLOCK_SPLITS": 64, "BLOCK_D": 64},
        [],
    ),
}

# Runs in a fresh interpreter WITHOUT TRITON_INTERPRET: under the interpreter, triton.language's own @jit helpers
# (tl.max, tl.sum, ...) are interpreter objects, and the GPU code generator cannot lower calls to them.
COMPILE_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

results = {}
for case_id, (module, name, pointers, constexprs, floats) in json.load(sys.stdin).items():
    fn = getattr(importlib.import_module("kernels." + module), name)
    signature = {a: "constexpr" if a in constexprs else pointers.get(a) or ("fp32" if a in floats else "i32")
                 for a in fn.arg_names}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        results[case_id] = len(compiled.asm["cubin"])
    except Exception as e:  # reported per kernel by the test
        results[case_id] = f"{type(e).__name__}: {e}"
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def sm90_cubins():
    """id -> cubin size in bytes (or the compile error), for every entry of COMPILE_CASES."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the current default, set to silence triton 3.9's FutureWarning
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        input=json.dumps(COMPILE_CASES),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(not kt.HAVE_TRITON, reason="triton is not importable, so there is nothing to compile")
@pytest.mark.parametrize("case_id", list(COMPILE_CASES))
def test_kernel_compiles_for_sm90(case_id, sm90_cubins):
    result = sm90_cubins[case_id]
    assert isinstance(result, int) and result > 0, result
