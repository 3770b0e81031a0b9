"""Accuracy against MPC cost per decode token, one point per policy x budget: the trade-off a budget is chosen from.

Issue 5, experiment 4. Accuracy comes from experiments/fidelity.py runs (plaintext; ``--fidelity`` run folders
or results/samples CSVs; metric ``--metric``, passkey exact match by default); the cost of the same
(policy, budget, length) from bench.csv / costs.csv files (``--from``: ``measured``, preferred) or a dry run
of the protocols (``--predict``: every point that has no measured cost is ``predicted``, network-only latency).
Give ``--cost-seq-len`` to cost every point at one length (e.g. 8192) while accuracy stays at its own length.

    python experiments/budget_sweep.py --fidelity results/fidelity/20261123T051404Z-smollm2-eval --predict
    python experiments/budget_sweep.py --fidelity F --from results/bench-2pc/bench.csv      # measured only

Writes results/budget_sweep/<UTC time>-<commit>/: config.json, costs.csv, budget_sweep.csv (joined points),
results.md, budget_sweep.png (accuracy vs MB/token and vs WAN s/token, one line per policy). Never overwrites.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.ablation import read_accuracy
from experiments.decode_scaling import (
    COST_FIELDS,
    md_table,
    new_run_dir,
    predict_points,
    read_costs,
    write_csv,
)


def _budget(x) -> float | None:
    return None if x in (None, "", "None") else round(float(x), 6)


def sweep_rows(acc: list[dict], costs: list[dict], cost_seq_len: int | None = None) -> list[dict]:
    """Join accuracy points with the cost of the same (policy, budget, length); measured before predicted."""
    rank = {"measured": 0, "predicted": 1}
    best: dict = {}
    for c in costs:
        key = (c["policy"], _budget(c["budget"]) if c["policy"] != "full" else None, int(c["seq_len"]))
        if key not in best or rank.get(c["source"], 2) < rank.get(best[key]["source"], 2):
            best[key] = c
    rows = []
    for a in acc:
        n = cost_seq_len or a["length"]
        b = _budget(a["budget"]) if a["policy"] != "full" else None
        c = best.get((a["policy"], b, n))
        rows.append(
            {
                "policy": a["policy"],
                "budget": b,
                "length": a["length"],
                a["metric"]: a["value"],
                "n": a["n"],
                "cost_seq_len": n,
                "cost_source": c["source"] if c else None,
                "MB": c["bytes_per_token"] / 1e6 if c else None,
                "rounds": c["rounds_per_token"] if c else None,
                "LAN_s": c["lan_s"] if c else None,
                "WAN_s": c["wan_s"] if c else None,
                "attended_frac": c["attended_frac"] if c else None,
            }
        )
    rows.sort(key=lambda r: (r["length"], r["policy"] != "full", r["policy"], r["budget"] or 0))
    return rows


def results_markdown(rows: list[dict], metric: str) -> str:
    cols = ["length", "policy", "budget", metric, "n", "cost_seq_len", "cost_source", "MB", "rounds", "LAN_s", "WAN_s"]
    fmt = {
        metric: "{:.3f}".format,
        "MB": "{:,.2f}".format,
        "rounds": "{:,.0f}".format,
        "LAN_s": "{:,.2f}".format,
        "WAN_s": "{:,.2f}".format,
    }
    return (
        f"One point per policy x budget: {metric} (plaintext fidelity, n prompts) against the MPC cost of a "
        "decode token at `cost_seq_len` (whole model, max party; `measured` = parties bench, `predicted` = "
        "dry run of the protocols, LAN/WAN network only).\n\n" + md_table(rows, cols, fmt) + "\n"
    )


def plot(rows: list[dict], path: Path, metric: str) -> None:
    """Accuracy vs MB/token and vs WAN s/token; one line per (policy, length), budgets annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, col, label in ((axes[0], "MB", "MB sent / decode token"), (axes[1], "WAN_s", "WAN s / decode token")):
        for pol, n in sorted({(r["policy"], r["length"]) for r in rows}):
            pts = sorted(
                (r[col], r[metric], r["budget"])
                for r in rows
                if (r["policy"], r["length"]) == (pol, n) and r[col] is not None
            )
            if not pts:
                continue
            xs, ys, _ = zip(*pts)
            ax.plot(xs, ys, marker="*" if pol == "full" else "o", ms=10 if pol == "full" else 5, label=f"{pol} @ {n}")
            for x, y, b in pts:
                if b is not None:
                    ax.annotate(f"{b:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fidelity", required=True, help="comma-separated fidelity run folders / CSVs")
    p.add_argument("--metric", default="passkey_exact", help="fidelity metric (passkey_exact, ppl, gen_agree, ...)")
    p.add_argument("--from", dest="sources", default="", help="bench.csv / costs.csv files (measured first)")
    p.add_argument("--predict", action="store_true", help="predict every point without a measured cost")
    p.add_argument("--model", default="smollm2", help="model shape of --predict")
    p.add_argument(
        "--topk", default="", help="topk of predicted budget policies ('' = the policy default, as fidelity.py used)"
    )
    p.add_argument("--world", type=int, default=2, choices=[2, 3])
    p.add_argument("--cost-seq-len", type=int, default=None, help="cost every point at this length")
    p.add_argument("--policies", default="", help="only these policy labels")
    p.add_argument("--lengths", default="", help="only these fidelity lengths")
    p.add_argument("--out", default="results/budget_sweep")
    a = p.parse_args(argv)
    out = new_run_dir(a.out, {"args": vars(a)})
    acc = read_accuracy([f for f in a.fidelity.split(",") if f], a.metric)
    if a.policies:
        acc = [x for x in acc if x["policy"] in a.policies.split(",")]
    if a.lengths:
        acc = [x for x in acc if x["length"] in {int(n) for n in a.lengths.split(",")}]
    costs = read_costs([s for s in a.sources.split(",") if s])
    if a.predict:
        have = {
            (c["policy"], _budget(c["budget"]) if c["policy"] != "full" else None, int(c["seq_len"])) for c in costs
        }
        todo = sorted(
            {
                (x["policy"], _budget(x["budget"]) if x["policy"] != "full" else None, a.cost_seq_len or x["length"])
                for x in acc
            }
            - have,
            key=lambda t: (t[2], t[0], t[1] or 0),
        )
        from mpcache.policies.base import REGISTRY

        todo = [t for t in todo if t[0] in REGISTRY]  # "label=name" variants: give their costs --from
        cases = [
            (a.model, pol, pol, {"topk": a.topk} if a.topk and pol != "full" else {}, b, n, a.world, "tfp")
            for pol, b, n in todo
        ]
        costs += predict_points(cases, "predict sweep")
    write_csv(out / "costs.csv", costs, COST_FIELDS)
    rows = sweep_rows(acc, costs, a.cost_seq_len)
    write_csv(out / "budget_sweep.csv", rows)
    md = results_markdown(rows, a.metric)
    (out / "results.md").write_text(md)
    plot(rows, out / "budget_sweep.png", a.metric)
    print(md)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
