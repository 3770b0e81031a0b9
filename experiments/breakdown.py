"""Per-op-class breakdown of one decode token's MPC cost: full vs MPCache at 2k and 8k (issue 5, experiment 2).

Reads a party's ledger (``rank0.json`` of ``python -m parties bench``; bench.json beside it gives the model's
layer count and the policies, to scale the measured blocks to the whole model exactly as mpcache/bench.py does)
or predicts one with a dry run of the protocols (``--predict``, labelled ``predicted``; compute time 0).

Scope path -> op class (the path below ``bench/<policy>/<seq_len>/token/<t>/``, first rule that matches;
``L<i>`` is a transformer block):

=====================================  =================================================================
class                                  scopes
=====================================  =================================================================
linear layers                          ``L<i>/qkv/matmul``, ``L<i>/attn_out/matmul``, ``L<i>/mlp/matmul``,
                                       ``lm_head/matmul`` (weight products, fixed-operand Beaver)
attention (q·K, p·V, new K/V row)      ``L<i>/qk/*``, ``L<i>/av/*``, ``L<i>/fix_kv/*``
softmax                                ``L<i>/softmax/*``
selection scoring                      ``L<i>/selection/*`` except top-k (cluster scores, head max/sum)
top-k                                  ``L<i>/selection/topk/*``
gather                                 ``L<i>/gather/*`` (one-hot x clustered K/V)
norms/activations                      ``L<i>/norm/*``, ``L<i>/mlp/silu/*``, ``L<i>/mlp`` (gate x up),
                                       ``lm_head/rsqrt`` (final RMSNorm)
embedding/argmax/head                  ``embed/*``, ``argmax/*`` (the vocabulary argmax), ``reveal`` (the token's
                                       opening to the client), ``token_input`` (the client's one-hot),
                                       ``lm_head`` itself, ``token/<t>`` itself (sharing the input token)
other                                  anything else (reported, so a new scope is never silently lost)
=====================================  =================================================================

    python experiments/breakdown.py --ledger results/bench-2pc/rank0.json --policies full,mpcache --seq-lens 2048,8192
    python experiments/breakdown.py --predict 2048,8192 --model smollm2            # dry run, no MPI
    python experiments/breakdown.py --run --model tiny-llama --text random --seq-lens 64,128
    python experiments/breakdown.py --ledger runs/generate/rank0.json      # a `parties generate` run's decode tokens

Seconds per class are wall time (exclusive of nested classes) split by the ledger's per-round profile into local
compute, waiting for the peer and copies of the exchanges (``compute_local_s`` + ``wait_s`` + ``copy_s`` =
``compute_s``, the wall seconds the latency model takes as its measured compute; ledgers written before the profile
existed report the whole as compute).

Writes results/breakdown/<UTC time>-<commit>/: config.json, breakdown.csv (one row per policy x length x class),
results.md (pivot: MB and rounds per class), breakdown.png (stacked bars). Never overwrites.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.decode_scaling import md_table, new_run_dir, parse_policies, run_bench, write_csv

CLASSES = (
    "linear layers",
    "attention (q·K, p·V, new K/V row)",
    "softmax",
    "selection scoring",
    "top-k",
    "gather",
    "norms/activations",
    "embedding/argmax/head",
    "other",
)
# (regex on the path below token/<t>/, class); first match wins
RULES = [
    (r"L\d+/(qkv|attn_out|mlp)/matmul(/.*)?$", "linear layers"),
    (r"lm_head/matmul(/.*)?$", "linear layers"),
    (r"L\d+/(qk|av|fix_kv)(/.*)?$", "attention (q·K, p·V, new K/V row)"),
    (r"L\d+/softmax(/.*)?$", "softmax"),
    (r"L\d+/selection/topk(/.*)?$", "top-k"),
    (r"L\d+/selection(/.*)?$", "selection scoring"),
    (r"L\d+/gather(/.*)?$", "gather"),
    (r"L\d+/(norm|mlp)(/.*)?$", "norms/activations"),
    (r"lm_head/(rsqrt|norm)(/.*)?$", "norms/activations"),
    (r"(embed|argmax|reveal|token_input|lm_head)(/.*)?$", "embedding/argmax/head"),
    (r"$", "embedding/argmax/head"),  # token/<t> itself: the input token's sharing
]
_RULES = [(re.compile(p), c) for p, c in RULES]
FIELDS = ("bytes", "rounds", "seconds", "wait", "copy")


def classify(rel: str) -> str:
    """Op class of a scope path relative to ``token/<t>/``."""
    for pat, cls in _RULES:
        if pat.match(rel):
            return cls
    return "other"


def _exclusive_seconds(seconds: dict, prefix: str) -> dict:
    """Time spent in each scope below ``prefix`` minus its direct children's (ledger seconds are inclusive)."""
    below = {p: s for p, s in seconds.items() if p.startswith(prefix + "/")}
    out = dict(below)
    for p, s in below.items():
        parent = p.rsplit("/", 1)[0]
        if parent in out:
            out[parent] -= s
    return out


def layer_weights(policy_label: str, bench_meta: dict | None, bench_layers: int, model_layers: int) -> list[float]:
    """How many of the model's blocks each measured block stands for (its cost class's count in the model over
    its count among the measured blocks; mpcache.bench.scale_costs)."""
    classes_b = classes_m = None
    if bench_meta:
        try:
            from mpcache.bench import layer_classes
            from mpcache.policies import make_policy

            args = bench_meta["args"]
            names = dict(parse_policies(args["policies"]))
            name = names[policy_label]
            kw = dict(json.loads(args.get("policy_kwargs") or "{}").get(policy_label, {}))
            if name != "full":
                kw.setdefault("budget", int(args["budget"]) if args["budget"] > 1 else args["budget"])
                kw.setdefault("topk", args.get("topk", "auto"))
            pol = make_policy(name, **kw)
            classes_b, classes_m = layer_classes(pol, bench_layers), layer_classes(pol, model_layers)
        except (KeyError, ValueError, TypeError, ImportError):
            classes_b = None
    if classes_b is None:  # every block alike
        return [model_layers / bench_layers] * bench_layers
    return [classes_m.count(c) / classes_b.count(c) for c in classes_b]


def class_costs(ledger: dict, base: str, tokens: list[int], weights: list[float] | None = None) -> dict:
    """Per op class, mean over ``tokens`` of bytes sent / rounds / exclusive compute seconds of one party, for
    the scopes ``{base}/token/<t>/...`` (``base`` may be ""), blocks ``L<i>`` weighted by ``weights[i]``."""
    acc = {c: dict.fromkeys(FIELDS, 0.0) for c in CLASSES}
    pre = f"{base}/token" if base else "token"
    for t in tokens:
        tp = f"{pre}/{t}"
        excl = _exclusive_seconds(ledger.get("seconds", {}), tp)
        excl_w = _exclusive_seconds(ledger.get("wait_seconds", {}), tp)  # the per-round profile (may be absent)
        excl_c = _exclusive_seconds(ledger.get("copy_seconds", {}), tp)
        rows = defaultdict(lambda: dict.fromkeys(FIELDS, 0.0))
        for c in ledger["counts"]:
            if c["scope"] == tp or c["scope"].startswith(tp + "/"):
                r = rows[c["scope"][len(tp) + 1 :]]  # "" = the token's own scope (its input)
                r["bytes"] += c["bytes_sent"]
                r["rounds"] += c["rounds"]
        for p, s in excl.items():
            rows[p[len(tp) + 1 :]]["seconds"] += s
        for p, s in excl_w.items():
            rows[p[len(tp) + 1 :]]["wait"] += s
        for p, s in excl_c.items():
            rows[p[len(tp) + 1 :]]["copy"] += s
        for rel, r in rows.items():
            m = re.match(r"L(\d+)/", rel)
            w = weights[int(m.group(1))] if (m and weights) else 1.0
            cls = classify(rel)
            for f in FIELDS:
                acc[cls][f] += w * r[f] / len(tokens)
    return acc


def breakdown_rows(acc: dict, policy: str, seq_len: int, source: str, profiles=None) -> list[dict]:
    from mpcache.latency import PROFILES, modelled_seconds

    profiles = profiles or PROFILES
    tot_b = sum(v["bytes"] for v in acc.values()) or 1
    tot_r = sum(v["rounds"] for v in acc.values()) or 1
    out = []
    for cls in CLASSES:
        v = acc[cls]
        if cls == "other" and not (v["bytes"] or v["rounds"]):
            continue
        row = {
            "source": source,
            "policy": policy,
            "seq_len": seq_len,
            "op_class": cls,
            "MB": v["bytes"] / 1e6,
            "bytes_share": v["bytes"] / tot_b,
            "rounds": v["rounds"],
            "rounds_share": v["rounds"] / tot_r,
            "compute_s": v["seconds"],
            "compute_local_s": max(v["seconds"] - v["wait"] - v["copy"], 0.0),
            "wait_s": v["wait"],
            "copy_s": v["copy"],
        }
        for name, prof in profiles.items():
            row[f"{name}_s"] = modelled_seconds(v["seconds"], v["rounds"], v["bytes"], prof)
        out.append(row)
    return out


def from_bench_ledger(path: str, policies: list[str] | None, seq_lens: list[int] | None) -> list[dict]:
    """Breakdown rows of every (policy, seq_len) case of a bench ledger (rank{r}.json)."""
    path = Path(path)
    ledger = json.loads(path.read_text())
    meta = json.loads((path.parent / "bench.json").read_text()) if (path.parent / "bench.json").exists() else None
    cases = defaultdict(set)
    for c in ledger["counts"]:
        m = re.match(r"bench/([^/]+)/(\d+)/token/(\d+)/", c["scope"])
        if m:
            cases[(m.group(1), int(m.group(2)))].add(int(m.group(3)))
    info = {}
    if meta:
        for r in meta.get("rows", []):
            info[(r["policy"], int(r["seq_len"]))] = (int(r["bench_layers"]), int(r["model_layers"]))
    out = []
    if not cases:  # a `parties generate` ledger: its decode tokens (token 0 is the prefill's)
        toks = sorted({int(m.group(1)) for c in ledger["counts"] if (m := re.match(r"token/(\d+)/", c["scope"]))})
        toks = [t for t in toks if t > 0]
        if toks:
            out += breakdown_rows(class_costs(ledger, "", toks), "generate", 0, "measured")
        return out
    for (pol, n), toks in sorted(cases.items(), key=lambda x: (x[0][1], x[0][0])):
        if (policies and pol not in policies) or (seq_lens and n not in seq_lens):
            continue
        bl, ml = info.get((pol, n), (None, None))
        if bl is None:
            bl = 1 + max(
                int(m.group(1))
                for c in ledger["counts"]
                if (m := re.match(rf"bench/{re.escape(pol)}/{n}/token/\d+/L(\d+)/", c["scope"]))
            )
            ml = bl
        w = layer_weights(pol, meta, bl, ml)
        out += breakdown_rows(class_costs(ledger, f"bench/{pol}/{n}", sorted(toks), w), pol, n, "measured")
    return out


def predicted(
    model: str, policies: list[tuple[str, str]], budget: float, topk: str, seq_lens: list[int], world: int = 2
) -> list[dict]:
    """Breakdown of the steady-state decode token (token 2) predicted by the cost tracer, rank 0."""
    from tqdm import tqdm

    from experiments.predict_cost import model_config
    from mpcache.mpc.dryrun import Setting, predict_generation
    from mpcache.policies import make_policy

    cfg = model_config(model)
    out = []
    for n in tqdm(seq_lens, desc="predict breakdown", unit="length", file=sys.stderr):
        for label, name in policies:
            pol = make_policy(name) if name == "full" else make_policy(name, budget=budget, topk=topk)
            led, _ = predict_generation(
                cfg, pol, Setting(world, "replicated" if world == 3 else "arithmetic", "tfp"), n, 3
            )
            out += breakdown_rows(class_costs(led[0], "", [2]), label, n, "predicted")
    return out


def pivot(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per op class, one column per (source, policy, length): "MB (share) / rounds"."""
    cases = sorted({(r["source"], r["seq_len"], r["policy"]) for r in rows})
    cols = [f"{p} @ {n}" + (" (pred.)" if s == "predicted" else "") for s, n, p in cases]
    out = []
    for cls in [c for c in CLASSES if any(r["op_class"] == c for r in rows)] + ["total"]:
        row = {"op class": cls}
        for (s, n, p), col in zip(cases, cols):
            sel = [
                r
                for r in rows
                if (r["source"], r["seq_len"], r["policy"]) == (s, n, p) and (cls == "total" or r["op_class"] == cls)
            ]
            if sel:
                mb, rd = sum(r["MB"] for r in sel), sum(r["rounds"] for r in sel)
                share = "" if cls == "total" else f" ({sum(r['bytes_share'] for r in sel):.0%})"
                row[col] = f"{mb:,.2f}{share} / {rd:,.0f}"
        out.append(row)
    return out, ["op class", *cols]


def time_pivot(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per op class, one column per measured (policy, length): "wall s = compute + wait + copy"."""
    cases = sorted({(r["seq_len"], r["policy"]) for r in rows if r["source"] == "measured"})
    cols = [f"{p} @ {n}" for n, p in cases]
    out = []
    for cls in [c for c in CLASSES if any(r["op_class"] == c for r in rows)] + ["total"]:
        row = {"op class": cls}
        for (n, p), col in zip(cases, cols):
            sel = [
                r
                for r in rows
                if r["source"] == "measured"
                and (r["seq_len"], r["policy"]) == (n, p)
                and (cls == "total" or r["op_class"] == cls)
            ]
            if sel:
                w, c, wt, cp = (sum(r[k] for r in sel) for k in ("compute_s", "compute_local_s", "wait_s", "copy_s"))
                row[col] = f"{w:.3f} = {c:.3f} + {wt:.3f} + {cp:.3f}"
        out.append(row)
    return out, ["op class", *cols]


def results_markdown(rows: list[dict]) -> str:
    table, cols = pivot(rows)
    md = (
        "Per decode token, whole model, one party (rank 0): MB sent (share of the token's bytes) / rounds, per "
        "op class (mapping in experiments/breakdown.py). `pred.` = dry run of the protocols (mpcache/mpc/dryrun.py).\n\n"
        + md_table(table, cols)
        + "\n"
    )
    if any(r["source"] == "measured" for r in rows):
        table, cols = time_pivot(rows)
        md += (
            "\nMeasured seconds per decode token, same party: wall = local compute + waiting for the peer + "
            "copies of the exchanges (the ledger's per-round profile).\n\n" + md_table(table, cols) + "\n"
        )
    return md


def plot(rows: list[dict], path: Path) -> None:
    """Stacked bars per (policy, length): MB, rounds and WAN seconds per op class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["source"], r["seq_len"], r["policy"]) for r in rows})
    names = [f"{p}\n{n}" + ("\n(pred.)" if s == "predicted" else "") for s, n, p in cases]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (col, title) in zip(
        axes, (("MB", "MB sent / token"), ("rounds", "rounds / token"), ("wan_s", "WAN s / token"))
    ):
        bottom = [0.0] * len(cases)
        for cls in CLASSES:
            vals = [
                sum(r[col] for r in rows if (r["source"], r["seq_len"], r["policy"]) == c and r["op_class"] == cls)
                for c in cases
            ]
            if any(vals):
                ax.bar(names, vals, bottom=bottom, label=cls)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ledger", default="", help="comma-separated bench rank{r}.json files")
    p.add_argument("--policies", default="full,mpcache", help="labels to show (label=name for --run/--predict)")
    p.add_argument("--seq-lens", default="2048,8192", help="lengths to show (and of --run)")
    p.add_argument("--run", action="store_true", help="launch parties bench (2PC) at --seq-lens first")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--text", default="austen", choices=["austen", "random"])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--topk", default="strata", choices=["rank", "strata", "auto"])
    p.add_argument("--predict", default="", help="comma-separated lengths of predicted breakdowns")
    p.add_argument("--out", default="results/breakdown")
    a = p.parse_args(argv)
    if not (a.ledger or a.run or a.predict):
        p.error("nothing to do: give --ledger, --run or --predict")
    pols = parse_policies(a.policies)
    lens = [int(x) for x in a.seq_lens.split(",") if x]
    out = new_run_dir(a.out, {"args": vars(a)})
    ledgers = [x for x in a.ledger.split(",") if x]
    if a.run:
        run_bench(
            out / "bench",
            2,
            [
                "--model",
                a.model,
                "--seq-lens",
                a.seq_lens,
                "--policies",
                a.policies,
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
        ledgers.append(str(out / "bench" / "rank0.json"))
    rows = []
    for led in ledgers:
        rows += from_bench_ledger(led, [lab for lab, _ in pols], lens)
    if a.predict:
        rows += predicted(a.model, pols, a.budget, a.topk, [int(x) for x in a.predict.split(",")])
    write_csv(out / "breakdown.csv", rows)
    md = results_markdown(rows)
    (out / "results.md").write_text(md)
    plot(rows, out / "breakdown.png")
    print(md)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
