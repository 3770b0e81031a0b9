"""Plot a fidelity run: quality vs budget, one line per policy, one panel per prompt length (reads only).

    python experiments/plot_fidelity.py results/fidelity/<run>            # writes <run>/<metric>.png

Reads <run>/results.csv written by experiments/fidelity.py; computes nothing. The full cache (no budget) is a
dashed horizontal line.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRICS = {  # metric -> (axis label, log scale)
    "passkey_exact": ("passkey exact match", False),
    "passkey_token_acc": ("passkey key-token accuracy", False),
    "ppl": ("continuation perplexity", True),
    "gen_agree_prefix": ("greedy agreement (to 1st divergence)", False),
    "gen_agree": ("greedy agreement (all positions)", False),
}


def read(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def plot_metric(rows: list[dict], metric: str, out: Path) -> bool:
    rows = [r for r in rows if r["metric"] == metric]
    if not rows:
        return False
    ylabel, log = METRICS[metric]
    lengths = sorted({int(r["length"]) for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))  # csv order
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), sharey=True, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        at = [r for r in rows if int(r["length"]) == length]
        for i, pol in enumerate(policies):
            pts = sorted(
                (float(r["budget"]), float(r["value"]), float(r["stderr"] or "nan"))
                for r in at
                if r["policy"] == pol and r["budget"] != ""
            )
            full = [r for r in at if r["policy"] == pol and r["budget"] == ""]
            if full:
                ax.axhline(float(full[0]["value"]), color="k", ls="--", lw=1, label=f"{pol} (no eviction)")
            if pts:
                x, y, e = zip(*pts)
                e = [0.0 if math.isnan(v) else v for v in e]  # NaN stderr (one sample) -> no bar
                ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, color=f"C{i}", label=pol)
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("budget (fraction of the cache)")
        ax.set_xscale("log")
        budgets = sorted({float(r["budget"]) for r in at if r["budget"] != ""})
        if budgets:
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(8, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a results/fidelity/<run> folder")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset of " + ",".join(METRICS))
    a = p.parse_args(argv)
    rows = read(a.run)
    written = []
    for m in a.metrics.split(","):
        out = a.run / f"{m}.png"
        if plot_metric(rows, m, out):
            written.append(out)
    print("\n".join(str(w) for w in written))
    return written


if __name__ == "__main__":
    main()
