"""Ablation of MPCache's optimisations: each switched in turn, cost per decode token and retrieval accuracy.

Issue 5, experiment 3. Variants are ``MPCachePolicy`` switches (one flag each, mpcache/policies/mpcache.py) on
top of the defaults (chosen on the dev split: no static stage, 4-row clusters, max over a group's heads, no
layer sharing) and ``--topk`` (the stratified tournament by default, as the 2PC sweep):

==============  =============================================  ===============================================
variant         switch                                         what it ablates
==============  =============================================  ===============================================
mpcache         (defaults)                                     —
static_on       ``static=True``                                look-once static eviction at the prefill end
no_hierarchy    ``hierarchy=False``                            the two-level (coarse -> fine) selection
exact_bound     ``linear=False``                               α-linearised score -> exact Quest bound
share_layers    ``share_layers=True``                          cross-layer sharing of the selection
topk_rank       ``topk="rank"``                                exact pairwise-rank top-k instead of strata
paper           static, 16-row clusters, sharing, summed heads  the paper's cost point
==============  =============================================  ===============================================

Costs: ``measured`` from bench.csv (``--from``, or ``--run`` to launch ``parties bench`` with these variants;
small lengths on this machine) and/or ``predicted`` by a dry run of the protocols (``--predict``; network-only
latency). Accuracy: teacher-forced passkey exact match from experiments/fidelity.py runs whose policy labels are
the variant names (``--fidelity`` run folders or CSVs, or ``--run-fidelity`` to launch a small dev run).

    python experiments/ablation.py --predict 1024,8192 --fidelity results/fidelity-ablation/<run>
    python experiments/ablation.py --run --model tiny-llama --text random --seq-lens 64,128 --budget 0.3
    python experiments/ablation.py --run-fidelity --fidelity-lengths 1024 --predict 1024

Writes results/ablation/<UTC time>-<commit>/: config.json, costs.csv, accuracy.csv, ablation.csv (joined),
results.md, ablation.png. Never overwrites.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.decode_scaling import (
    COST_FIELDS,
    md_table,
    new_run_dir,
    predict_points,
    read_costs,
    run_bench,
    write_csv,
)

VARIANTS: dict[str, dict] = {
    "mpcache": {},
    "static_on": {"static": True},
    "no_hierarchy": {"hierarchy": False},
    "exact_bound": {"linear": False},
    "share_layers": {"share_layers": True},
    "topk_rank": {"topk": "rank"},
    "paper": {"static": True, "cluster_size": 16, "share_layers": True, "head_reduce": "sum"},
}


def variant_kwargs(names: list[str], topk: str) -> dict[str, dict]:
    """{label: MPCachePolicy kwargs}, ``topk`` filled in unless the variant sets it."""
    return {v: {"topk": topk, **VARIANTS[v]} for v in names}


def read_accuracy(paths: list[str], metric: str = "passkey_exact") -> list[dict]:
    """Mean ``metric`` per (policy label, length, budget) from fidelity run folders (results.csv, else
    samples.csv) or CSV files."""
    out = []
    expanded = []
    for p in map(Path, paths):  # a folder of fidelity runs -> each run in it
        runs = sorted(q for q in p.iterdir() if (q / "samples.csv").exists()) if p.is_dir() else []
        expanded += runs if p.is_dir() and not (p / "samples.csv").exists() and runs else [p]
    for p in expanded:
        if p.is_dir():
            p = p / "results.csv" if (p / "results.csv").exists() else p / "samples.csv"
        with open(p) as f:
            raw = list(csv.DictReader(f))
        if raw and "stderr" in raw[0]:  # results.csv: already aggregated
            out += [
                {
                    "policy": r["policy"],
                    "length": int(r["length"]),
                    "budget": r["budget"],
                    "metric": metric,
                    "value": float(r["value"]),
                    "n": int(r["n"]),
                    "source": str(p),
                }
                for r in raw
                if r["metric"] == metric
            ]
            continue
        agg = defaultdict(list)
        for r in raw:
            if r["metric"] == metric:
                agg[(r["policy"], int(r["length"]), r["budget"])].append(float(r["value"]))
        out += [
            {
                "policy": k[0],
                "length": k[1],
                "budget": k[2],
                "metric": metric,
                "value": sum(v) / len(v),
                "n": len(v),
                "source": str(p),
            }
            for k, v in sorted(agg.items())
        ]
    return out


def ablation_rows(costs: list[dict], acc: list[dict], variants: list[str], baseline: str = "mpcache") -> list[dict]:
    """One row per (variant, cost source, length) with cost ratios against ``baseline`` and the variant's
    accuracy at every fidelity length (``passkey_exact@<len>`` and its prompt count)."""
    base = {(r["source"], r["setting"], r["seq_len"]): r for r in costs if r["policy"] == baseline}
    acc_by = defaultdict(dict)
    for a in acc:
        acc_by[a["policy"]][a["length"]] = a
    acc_lens = sorted({a["length"] for a in acc})
    rows = []
    for v in variants:
        cv = sorted((r for r in costs if r["policy"] == v), key=lambda r: (r["source"], r["setting"], r["seq_len"]))
        for r in cv or [None]:
            row = {"variant": v, "switch": json.dumps(VARIANTS.get(v, {}), sort_keys=True)}
            if r is not None:
                b = base.get((r["source"], r["setting"], r["seq_len"]))
                row |= {
                    "source": r["source"],
                    "setting": r["setting"],
                    "seq_len": r["seq_len"],
                    "MB": r["bytes_per_token"] / 1e6,
                    "rounds": r["rounds_per_token"],
                    "LAN_s": r["lan_s"],
                    "WAN_s": r["wan_s"],
                    "static_MB": r["static_bytes"] / 1e6 if r.get("static_bytes") not in (None, "") else None,
                    "MB_vs_base": r["bytes_per_token"] / b["bytes_per_token"] if b else None,
                    "rounds_vs_base": r["rounds_per_token"] / b["rounds_per_token"] if b else None,
                }
            for n in acc_lens:
                a = acc_by[v].get(n)
                row[f"passkey_exact@{n}"] = a["value"] if a else None
                row[f"n@{n}"] = a["n"] if a else None
            rows.append(row)
    return rows


def columns(rows: list[dict]) -> list[str]:
    acc = sorted(
        {k for r in rows for k in r if k.startswith(("passkey_exact@", "n@"))},
        key=lambda k: (int(k.split("@")[1]), k.startswith("n@")),
    )
    return [
        "variant",
        "switch",
        "source",
        "setting",
        "seq_len",
        "MB",
        "MB_vs_base",
        "rounds",
        "rounds_vs_base",
        "LAN_s",
        "WAN_s",
        "static_MB",
        *acc,
    ]


FMT = {
    "MB": "{:,.2f}".format,
    "rounds": "{:,.0f}".format,
    "LAN_s": "{:,.2f}".format,
    "WAN_s": "{:,.2f}".format,
    "static_MB": "{:,.2f}".format,
    "MB_vs_base": "{:.2f}x".format,
    "rounds_vs_base": "{:.2f}x".format,
}


def results_markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    fmt = FMT | {c: "{:.2f}".format for c in cols if c.startswith("passkey_exact@")}
    return (
        "Each MPCache optimisation switched in turn. Cost per decode token (whole model, max party; `vs base` = "
        "variant / mpcache, < 1 cheaper); `measured` = parties bench (benchmark convention), `predicted` = "
        "dry run of the protocols (LAN/WAN network only). Accuracy: teacher-forced passkey exact match (plaintext "
        "fidelity run, n prompts).\n\n" + md_table(rows, cols, fmt) + "\n"
    )


def plot(rows: list[dict], path: Path) -> None:
    """Bars per variant: MB/token and rounds/token relative to mpcache (one group per cost point), and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    points = sorted({(r["source"], r["setting"], r["seq_len"]) for r in rows if r.get("source")})
    acc_keys = sorted({k for r in rows for k in r if k.startswith("passkey_exact@")})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(points))
    for ax, col, title in (
        (axes[0], "MB_vs_base", "MB / token vs mpcache"),
        (axes[1], "rounds_vs_base", "rounds / token vs mpcache"),
    ):
        for j, pt in enumerate(points):
            vals = [
                next(
                    (
                        r[col] or 0
                        for r in rows
                        if r["variant"] == v and (r.get("source"), r.get("setting"), r.get("seq_len")) == pt
                    ),
                    0,
                )
                for v in variants
            ]
            ax.bar([i + j * width for i in range(len(variants))], vals, width, label=f"{pt[2]} ({pt[0]}, {pt[1]})")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.set_xticks(
            [i + width * (len(points) - 1) / 2 for i in range(len(variants))], variants, rotation=30, fontsize=8
        )
    if points:
        axes[0].legend(fontsize=7)
    w2 = 0.8 / max(1, len(acc_keys))
    for j, k in enumerate(acc_keys):
        vals = [next((r[k] for r in rows if r["variant"] == v and r.get(k) is not None), 0) for v in variants]
        axes[2].bar([i + j * w2 for i in range(len(variants))], vals, w2, label=k)
    axes[2].set_title("passkey exact match")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xticks(
        [i + w2 * (len(acc_keys) - 1) / 2 for i in range(len(variants))], variants, rotation=30, fontsize=8
    )
    if acc_keys:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_fidelity(
    out: Path, kw: dict[str, dict], lengths: str, budget: float, samples: int, depths: str, model: str
) -> Path:
    """A small dev-split passkey run of experiments/fidelity.py with the variants as labels; returns its folder."""
    pols = ",".join(["full"] + [f"{v}=mpcache" for v in kw])
    cmd = [
        sys.executable,
        str(REPO / "experiments" / "fidelity.py"),
        "--model",
        model,
        "--split",
        "dev",
        "--lengths",
        lengths,
        "--budgets",
        str(budget),
        "--policies",
        pols,
        "--policy-kwargs",
        json.dumps(kw),
        "--tasks",
        "passkey",
        "--samples",
        str(samples),
        "--depths",
        depths,
        "--out",
        str(out),
        "--no-plot",
    ]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return max(p for p in out.iterdir() if p.is_dir())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--from", dest="sources", default="", help="bench.csv / costs.csv with the variants as labels")
    p.add_argument("--run", action="store_true", help="launch parties bench (2PC) with the variants")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", default="austen", choices=["austen", "random"])
    p.add_argument("--seq-lens", default="512,1024", help="lengths of --run")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--topk", default="strata", choices=["rank", "strata", "auto"])
    p.add_argument("--predict", default="", help="comma-separated lengths of predicted cost points")
    p.add_argument("--predict-model", default="smollm2", help="model shape of --predict")
    p.add_argument("--fidelity", default="", help="comma-separated fidelity run folders / results or samples CSVs")
    p.add_argument("--run-fidelity", action="store_true", help="launch a small dev passkey run of fidelity.py")
    p.add_argument("--fidelity-lengths", default="1024")
    p.add_argument("--fidelity-samples", type=int, default=2)
    p.add_argument("--fidelity-depths", default="0.1,0.5,0.9")
    p.add_argument("--out", default="results/ablation")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    if not (a.sources or a.run or a.predict or a.fidelity or a.run_fidelity):
        p.error("nothing to do: give --from, --run, --predict, --fidelity or --run-fidelity")
    kw = variant_kwargs(variants, a.topk)
    out = new_run_dir(a.out, {"args": vars(a), "variant_kwargs": kw})
    sources = [s for s in a.sources.split(",") if s]
    if a.run:
        sources.append(
            str(
                run_bench(
                    out / "bench",
                    2,
                    [
                        "--model",
                        a.model,
                        "--seq-lens",
                        a.seq_lens,
                        "--policies",
                        ",".join(f"{v}=mpcache" for v in variants),
                        "--policy-kwargs",
                        json.dumps(kw),
                        "--budget",
                        str(a.budget),
                        "--topk",
                        a.topk,
                        "--steps",
                        "1",
                        "--text",
                        a.text,
                    ],
                )
            )
        )
    costs = [r for r in read_costs(sources) if r["policy"] in variants]
    if a.predict:
        cases = [
            (a.predict_model, v, "mpcache", kw[v], a.budget, int(n), 2, "tfp")
            for n in a.predict.split(",")
            for v in variants
        ]
        costs += predict_points(cases, "predict ablation")
    write_csv(out / "costs.csv", costs, COST_FIELDS)
    fid = [f for f in a.fidelity.split(",") if f]
    if a.run_fidelity:
        fid.append(
            str(
                run_fidelity(
                    out / "fidelity", kw, a.fidelity_lengths, a.budget, a.fidelity_samples, a.fidelity_depths, a.model
                )
            )
        )
    acc = read_accuracy(fid)
    write_csv(out / "accuracy.csv", acc, ["policy", "length", "budget", "metric", "value", "n", "source"])
    rows = ablation_rows(costs, acc, variants)
    write_csv(out / "ablation.csv", rows, columns(rows))
    md = results_markdown(rows)
    (out / "results.md").write_text(md)
    plot(rows, out / "ablation.png")
    print(md)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
