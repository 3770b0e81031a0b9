"""``parties bench`` (the long-context decode benchmark) under real mpirun: whole-model costs scaled from a few
measured blocks equal an all-block run exactly; secure selections agree with plaintext; the CSV has the columns
the issue asks for; bad arguments fail with a clear message."""

import csv
import json

import pytest
from conftest import run_mpi

pytestmark = pytest.mark.mpi

COLUMNS = {"policy", "seq_len", "world_size", "protocol", "bytes_per_token", "rounds_per_token", "seconds_per_token"}


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    """A 4-block random LLaMA-shaped checkpoint (safetensors folder): enough blocks for layer-sharing classes."""
    import dataclasses

    from mpcache.model.weights import init_random_weights, save_safetensors_folder, tiny_config

    cfg = dataclasses.replace(tiny_config("llama"), n_layers=4, name="tiny-llama-4")
    path = tmp_path_factory.mktemp("ckpt") / "tiny4"
    save_safetensors_folder(cfg, init_random_weights(cfg, seed=3), path)
    return str(path)


def _bench(tmp_path, name, model, layers, *extra):
    out = tmp_path / name
    run_mpi(
        2,
        [
            "-m",
            "parties",
            "bench",
            "--provider",
            "tfp",
            "--model",
            model,
            "--seq-lens",
            "48,80",
            "--text",
            "random",
            "--budget",
            "0.3",
            "--layers",
            layers,
            "--steps",
            "1",
            "--out",
            str(out),
            *extra,
        ],
        timeout=600,
    )
    with open(out / "bench.csv") as f:
        return list(csv.DictReader(f)), json.loads((out / "bench.json").read_text())


def test_bench_scales_exactly_and_agrees_with_plaintext(tmp_path, four_layer_model):
    kw = json.dumps({"shared": {"share_layers": True, "share_start": 1, "share_group": 2}})
    pols = ["--policies", "full,mpcache,shared=mpcache,quest,h2o", "--topk", "strata", "--policy-kwargs", kw]
    scaled, meta = _bench(tmp_path, "scaled", four_layer_model, "auto", *pols)
    full, _ = _bench(tmp_path, "all", four_layer_model, "all", *pols)
    assert COLUMNS <= set(scaled[0]), scaled[0].keys()
    # the benchmark convention (the client holds plaintext weights for the prefix) is named in every output
    assert all(r["convention"].startswith("benchmark convention") for r in scaled)
    assert meta["convention"] == scaled[0]["convention"]
    by = {(r["policy"], r["seq_len"]): r for r in full}
    for r in scaled:
        # share_start=1, groups of 2: blocks 0..2 (own, own, follower) hold every class; the 4th is scaled
        assert r["bench_layers"] == "3", r
        f = by[(r["policy"], r["seq_len"])]
        assert f["bench_layers"] == "4"
        # every block of a class has the same public shapes: the scaled whole-model cost is exact
        assert float(r["bytes_per_token"]) == float(f["bytes_per_token"]), (r, f)
        assert float(r["rounds_per_token"]) == float(f["rounds_per_token"]), (r, f)
        if r["policy"] != "full":
            # the same clusters/tokens as the plaintext policy on the same inputs (random weights: no near-ties)
            assert float(r["selection_agreement"]) == 1.0, r
        assert float(r["logit_err"]) < 0.05, r
    # a follower block pays no selection: sharing makes a token cheaper than the unshared policy
    per = {(r["policy"], r["seq_len"]): r for r in scaled}
    assert float(per[("shared", "80")]["bytes_per_token"]) < float(per[("mpcache", "80")]["bytes_per_token"])
    # the only openings besides the benchmark's check scope: the generated tokens, to the client
    assert {tuple(x) for x in meta["reveals"]} <= {
        ("token", 1),
        ("selection (bench check)", None),
        ("logits (bench check)", None),
    }


@pytest.fixture(scope="module")
def silu_gpt2_model(tmp_path_factory):
    """A tiny GPT-2 checkpoint with the MPCache paper's SiLU MLP (HF ``activation_function: silu``)."""
    import dataclasses

    from mpcache.model.weights import init_random_weights, save_safetensors_folder, tiny_config

    cfg = dataclasses.replace(tiny_config("gpt2"), act="silu", name="tiny-gpt2-silu")
    path = tmp_path_factory.mktemp("ckpt") / "gpt2silu"
    save_safetensors_folder(cfg, init_random_weights(cfg, seed=5), path)
    return str(path)


def test_bench_stock_softmax_baseline(tmp_path, silu_gpt2_model):
    """``--baseline-softmax ours,stock``: the full cache twice (ours, and CrypTen's stock softmax as
    ``full-stock``: the paper's kind of baseline), MPCache with ours, ratios against both baselines. The stock
    softmax's max tree makes it dearer and growing with the row; ours is constant in rounds."""
    rows, meta = _bench(
        tmp_path,
        "stock",
        silu_gpt2_model,
        "auto",
        "--policies",
        "full,mpcache",
        "--baseline-softmax",
        "ours,stock",
        "--topk",
        "strata",
    )
    by = {(r["policy"], int(r["seq_len"])): r for r in rows}
    assert {p for p, _ in by} == {"full", "full-stock", "mpcache"}
    for n in (48, 80):
        stock, ours = by[("full-stock", n)], by[("full", n)]
        assert float(stock["rounds_per_token"]) > float(ours["rounds_per_token"])
        assert float(stock["bytes_per_token"]) > float(ours["bytes_per_token"])
        assert float(stock["logit_err"]) < 0.05  # short rows: CrypTen's softmax is still accurate
    assert float(by[("full-stock", 80)]["rounds_per_token"]) > float(by[("full-stock", 48)]["rounds_per_token"])
    assert by[("full", 80)]["rounds_per_token"] == by[("full", 48)]["rounds_per_token"]
    md = (tmp_path / "stock" / "bench.md").read_text()
    assert "Ratios (full / policy)" in md and "Ratios (full-stock / policy) (CrypTen stock softmax" in md
    assert meta["model"] == "tiny-gpt2-silu"


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--baseline-softmax", "bogus"], "--baseline-softmax takes"),
        (["--baseline-softmax", "stock", "--policies", "mpcache"], "needs the full policy"),
        (["--seq-lens", "100000"], "outside"),
        (["--policies", "full,nosuch"], "bad policy"),
        (["--policy-kwargs", "{not json"], "not valid JSON"),
        (["--layers", "0"], "--layers"),
    ],
)
def test_bench_bad_arguments_are_explained(tmp_path, extra, needle):
    args = [
        "-m",
        "parties",
        "bench",
        "--provider",
        "tfp",
        "--model",
        "tiny-llama",
        "--seq-lens",
        "48",
        "--text",
        "random",
        "--out",
        str(tmp_path / "x"),
    ]
    p = run_mpi(2, args + extra, timeout=120, check=False)
    assert p.returncode != 0
    assert needle in p.stdout + p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
