"""Communication and latency per decode token vs cached length: full vs MPCache, 2PC and 3PC, LAN and WAN.

The paper's headline figure (issue 5, experiment 1). Cost points come from three sources, always labelled:

* ``measured`` — ``python -m parties bench`` rows (bench.csv): secure decode steps over a plaintext-built,
  secret-shared KV cache (the BENCHMARK CONVENTION of mpcache/bench.py, not an end-to-end secure run);
  whole-model costs scaled exactly from the measured blocks; seconds = measured compute on this 2-core box
  (scaled), LAN/WAN = that + rounds x RTT + bytes / bandwidth (mpcache/latency.py).
* ``predicted`` — a dry run of the private generation (mpcache/mpc/dryrun.py, tested == measured per scope):
  the steady-state decode token (token 2 of a generation; token 1 also builds the cluster summaries) after an
  L-token prompt. Compute time is not modelled, so its LAN/WAN seconds are NETWORK ONLY (a lower bound).

    # read existing runs (fast)
    python experiments/decode_scaling.py --from results/bench-2pc/bench.csv
    # add predicted 3PC points (and 2PC where nothing was measured)
    python experiments/decode_scaling.py --from results/bench-2pc/bench.csv --predict 512,2048,8192 --worlds 2,3
    # launch the bench itself (small: tiny model)
    python experiments/decode_scaling.py --run --model tiny-llama --text random --seq-lens 64,128 --worlds 2,3

Writes results/decode_scaling/<UTC time>-<commit>/: config.json, costs.csv (every point), ratios.csv and
results.md (full vs policy side by side per setting and length), decode_scaling.png. Never overwrites.

This module also holds the small helpers the other experiment scripts share (run folders, bench.csv reading,
predicted points, mpirun launch): they are about one concept, "a decode cost point".
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

# one decode cost point (a row of costs.csv); bench.csv rows are normalised to it
COST_FIELDS = (
    "source",
    "model",
    "setting",
    "policy",
    "budget",
    "kwargs",
    "seq_len",
    "bytes_per_token",
    "rounds_per_token",
    "seconds_per_token",
    "lan_s",
    "wan_s",
    "static_bytes",
    "attended_frac",
)


@dataclass
class Knobs:
    sources: list[str]  # bench.csv / costs.csv files to read (--from)
    run: bool = False  # launch `parties bench` for each world size
    worlds: list[int] = None  # 2 = 2PC arithmetic, 3 = 3PC replicated
    model: str = "smollm2"  # bench / predictor model
    seq_lens: list[int] = None  # lengths of --run
    policies: str = "full,mpcache"  # shown policies (and --run's --policies, label=name allowed)
    budget: float = 0.1  # budget of every non-full policy
    topk: str = "strata"  # bench --topk (the 2PC sweep used strata)
    steps: int = 1  # measured decode steps per bench case
    text: str = "austen"  # bench prompt text
    predict: list[int] = None  # lengths for predicted points (each world, each policy), [] = none
    provider: str = "tfp"
    out: str = "results/decode_scaling"


# ---- shared helpers ------------------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "experiments", "mpcache", "parties"], check=False, cwd=REPO
        ).returncode
        return sha + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def new_run_dir(root: str, config: dict) -> Path:
    """results/<name>/<UTC time>-<commit>/ with config.json; never an existing folder."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    commit = git_commit()
    base = Path(root) if Path(root).is_absolute() else REPO / root
    out = base / f"{stamp}-{commit.replace('+', '-')}"
    i = 1
    while out.exists():
        out, i = base / f"{stamp}-{commit.replace('+', '-')}-{i}", i + 1
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"commit": commit, "argv": sys.argv, **config}, indent=1, default=str))
    return out


def write_csv(path: Path, rows: list[dict], columns=None) -> None:
    columns = list(columns or (rows[0] if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def md_table(rows: list[dict], columns: list[str], fmt: dict | None = None) -> str:
    """A markdown table; ``fmt[col]`` formats a value (None / "" -> —)."""
    fmt = fmt or {}
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("—" if v is None or v == "" else (fmt[c](v) if c in fmt else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def setting_label(world_size: int, protocol: str, provider: str) -> str:
    return f"{world_size}PC {protocol}/{provider}"


def _num(x):
    if x in (None, ""):
        return None
    try:
        v = float(x)
    except ValueError:
        return x
    return int(v) if v.is_integer() and "." not in str(x) and "e" not in str(x).lower() else v


def read_costs(paths: list[str]) -> list[dict]:
    """Cost points from bench.csv files (budget, model and policy kwargs from the bench.json beside, when there)
    or from a costs.csv written by these scripts."""
    rows = []
    for p in paths:
        p = Path(p)
        with open(p) as f:
            raw = list(csv.DictReader(f))
        if raw and "source" in raw[0]:  # our own costs.csv
            rows += [
                {k: _num(v) if k not in ("kwargs", "policy", "setting", "source", "model") else v for k, v in r.items()}
                for r in raw
            ]
            continue
        meta = {}
        if (p.parent / "bench.json").exists():
            meta = json.loads((p.parent / "bench.json").read_text())
        args = meta.get("args", {})
        kw = json.loads(args.get("policy_kwargs") or "{}")
        for r in raw:
            d = {k: _num(v) for k, v in r.items()}
            rows.append(
                {
                    "source": "measured",
                    "model": meta.get("model", args.get("model", "")),
                    "setting": setting_label(int(d["world_size"]), r["protocol"], r["provider"]),
                    "policy": r["policy"],
                    "budget": "" if r["policy"] == "full" else args.get("budget", ""),
                    "kwargs": json.dumps(kw.get(r["policy"], {}), sort_keys=True),
                    **{k: d.get(k) for k in COST_FIELDS[6:]},
                    "bench": str(p),
                }
            )
    return rows


def predict_point(
    model: str,
    label: str,
    name: str,
    kwargs: dict,
    budget: float | None,
    seq_len: int,
    world: int,
    provider: str = "tfp",
    mpc: dict | None = None,
) -> dict:
    """One predicted cost point: the steady-state decode token (token 2) after a ``seq_len``-token prompt
    (``mpc``: MpcConfig fields over the setting's defaults, e.g. ``{"softmax_baseline": "stock"}``)."""
    from experiments.predict_cost import model_config
    from mpcache.generation import per_token_costs
    from mpcache.latency import PROFILES
    from mpcache.mpc.config import MpcConfig
    from mpcache.mpc.dryrun import predict_generation
    from mpcache.policies import make_policy

    cfg = model_config(model)
    protocol = "replicated" if world == 3 else "arithmetic"
    setting = MpcConfig(n_parties=world, protocol=protocol, provider=provider, **(mpc or {}))
    kw = dict(kwargs)
    if name != "full":
        kw.setdefault("budget", budget)
    pol = make_policy(name, **kw)
    n_new = 3
    ledgers, _ = predict_generation(cfg, pol, setting, seq_len, n_new)
    tok = per_token_costs(ledgers, n_new, PROFILES)[0][2]
    nbytes = max(tok["bytes_sent"])
    att = pol.attended_tokens(seq_len, 2) if hasattr(pol, "attended_tokens") else seq_len
    return {
        "source": "predicted",
        "model": cfg.name,
        "setting": setting_label(world, protocol, provider),
        "policy": label,
        "budget": "" if name == "full" else budget,
        "kwargs": json.dumps({k: v for k, v in kwargs.items() if k != "budget"}, sort_keys=True),
        "seq_len": seq_len,
        "bytes_per_token": nbytes,
        "rounds_per_token": tok["rounds"],
        "seconds_per_token": 0.0,
        "lan_s": tok["modelled_lan_s"] - tok["seconds"],
        "wan_s": tok["modelled_wan_s"] - tok["seconds"],
        "static_bytes": "",
        "attended_frac": att / (seq_len + 2),
    }


def predict_points(cases: list[tuple], desc: str = "predict") -> list[dict]:
    """``cases``: (model, label, name, kwargs, budget, seq_len, world, provider) tuples, with a progress bar."""
    from tqdm import tqdm

    return [predict_point(*c) for c in tqdm(cases, desc=desc, unit="point", file=sys.stderr)]


def parse_policies(spec: str) -> list[tuple[str, str]]:
    """``full,mpcache,paper=mpcache`` -> [(label, registry name)]."""
    out = []
    for item in spec.split(","):
        label, _, name = item.strip().partition("=")
        out.append((label, name or label))
    return out


def run_bench(out_dir: Path, world: int, bench_args: list[str], provider: str = "tfp") -> Path:
    """Launch ``mpirun -n world python -m parties bench ... --out out_dir`` (3 = replicated, dealer-free: no
    provider; 2 = 2PC with ``provider``: TFP by default here, a labelled benchmark mode whose online bytes and rounds
    equal the dealer's exactly, without a dealer rank); returns bench.csv."""
    venv = REPO / ".venv" / "bin"
    mpirun = str(venv / "mpirun") if (venv / "mpirun").exists() else "mpirun"
    python = str(venv / "python") if (venv / "python").exists() else sys.executable
    protocol = "replicated" if world == 3 else "arithmetic"
    cmd = [
        mpirun,
        "-n",
        str(world),
        python,
        "-m",
        "parties",
        "bench",
        *bench_args,
        "--protocol",
        protocol,
        *(["--provider", provider] if protocol == "arithmetic" else []),
        "--out",
        str(out_dir),
    ]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "OMPI_MCA_rmaps_base_oversubscribe": "1"}
    subprocess.run(cmd, cwd=REPO, check=True, env=env)  # its own tqdm bar shows progress on stderr
    return out_dir / "bench.csv"


# ---- experiment 1 ----------------------------------------------------------------------------------------------
def ratio_rows(costs: list[dict], baseline: str = "full") -> list[dict]:
    """Per (source, setting, seq_len, policy != baseline): baseline and policy side by side, with ratios."""
    base = {(r["source"], r["setting"], r["seq_len"]): r for r in costs if r["policy"] == baseline}
    out = []
    for r in costs:
        b = base.get((r["source"], r["setting"], r["seq_len"]))
        if r["policy"] == baseline or b is None:
            continue
        row = {"source": r["source"], "setting": r["setting"], "seq_len": r["seq_len"], "policy": r["policy"]}
        for key, name in (
            ("bytes_per_token", "MB"),
            ("rounds_per_token", "rounds"),
            ("lan_s", "LAN_s"),
            ("wan_s", "WAN_s"),
        ):
            scale = 1e6 if name == "MB" else 1
            row[f"full_{name}"] = b[key] / scale
            row[f"policy_{name}"] = r[key] / scale
            row[f"{name}_ratio"] = b[key] / r[key] if r[key] else None
        out.append(row)
    out.sort(key=lambda x: (x["source"], x["setting"], x["policy"], x["seq_len"]))
    return out


RATIO_COLS = [
    "source",
    "setting",
    "seq_len",
    "policy",
    "full_MB",
    "policy_MB",
    "MB_ratio",
    "full_rounds",
    "policy_rounds",
    "rounds_ratio",
    "full_LAN_s",
    "policy_LAN_s",
    "LAN_s_ratio",
    "full_WAN_s",
    "policy_WAN_s",
    "WAN_s_ratio",
]
_F2 = "{:,.2f}".format
RATIO_FMT = (
    {c: _F2 for c in RATIO_COLS[4:]}
    | {"full_rounds": "{:,.0f}".format, "policy_rounds": "{:,.0f}".format}
    | {c: (lambda v: f"{v:.2f}x") for c in RATIO_COLS if c.endswith("ratio")}
)


def results_markdown(costs: list[dict], ratios: list[dict]) -> str:
    md = [
        (
            "Per decode token, whole model, bytes = max over parties of bytes sent; ratio = full / policy "
            "(> 1: the policy is cheaper). `measured` = parties bench (plaintext-built, secret-shared KV cache: "
            "benchmark convention; LAN/WAN include measured compute on 2 shared cores); `predicted` = a dry run of the protocols "
            "(LAN/WAN network only)."
        ),
        "",
        md_table(ratios, RATIO_COLS, RATIO_FMT),
    ]
    return "\n".join(md) + "\n"


def length_axes(ax, title: str, log_y: bool = True) -> None:
    """A cost-vs-cached-length panel: log2 x axis, log y, light grid."""
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("cached tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot(costs: list[dict], path: Path, policies: list[str] | None = None) -> None:
    """2x2 panels (MB, rounds, LAN s, WAN s per token vs cached length), one line per policy x setting x source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    keys = sorted(
        {(r["policy"], r["setting"], r["source"]) for r in costs if policies is None or r["policy"] in policies}
    )
    for ax, (col, title, scale) in zip(
        axes.flat,
        (
            ("bytes_per_token", "MB sent / token (max party)", 1e6),
            ("rounds_per_token", "rounds / token", 1),
            ("lan_s", "LAN s / token (3 Gbps, 0.3 ms)", 1),
            ("wan_s", "WAN s / token (400 Mbps, 40 ms)", 1),
        ),
    ):
        for pol, setting, source in keys:
            pts = sorted(
                (r["seq_len"], r[col] / scale)
                for r in costs
                if (r["policy"], r["setting"], r["source"]) == (pol, setting, source) and r[col] != ""
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    ls="-" if source == "measured" else "--",
                    label=f"{pol}, {setting} ({source})",
                )
        length_axes(ax, title)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="sources", default="", help="comma-separated bench.csv / costs.csv files")
    p.add_argument("--run", action="store_true", help="launch parties bench for each of --worlds")
    p.add_argument("--worlds", default="2", help="2 (2PC arithmetic) and/or 3 (3PC replicated), comma-separated")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seq-lens", default="512,1024,2048", help="lengths of --run")
    p.add_argument("--policies", default="full,mpcache")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--topk", default="strata", choices=["rank", "strata", "auto"])
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--text", default="austen", choices=["austen", "random"])
    p.add_argument("--predict", default="", help="comma-separated lengths of predicted points (each world)")
    p.add_argument("--provider", default="tfp", choices=["tfp", "ttp"])
    p.add_argument("--out", default="results/decode_scaling")
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
    knobs = Knobs(
        sources=[s for s in a.sources.split(",") if s],
        run=a.run,
        worlds=ints(a.worlds),
        model=a.model,
        seq_lens=ints(a.seq_lens),
        policies=a.policies,
        budget=a.budget,
        topk=a.topk,
        steps=a.steps,
        text=a.text,
        predict=ints(a.predict),
        provider=a.provider,
        out=a.out,
    )
    if not (knobs.sources or knobs.run or knobs.predict):
        p.error("nothing to do: give --from, --run or --predict")
    out = new_run_dir(knobs.out, {"knobs": asdict(knobs)})
    sources = list(knobs.sources)
    if knobs.run:
        for w in knobs.worlds:
            sources.append(
                str(
                    run_bench(
                        out / f"bench-{w}pc",
                        w,
                        [
                            "--model",
                            knobs.model,
                            "--seq-lens",
                            ",".join(map(str, knobs.seq_lens)),
                            "--policies",
                            knobs.policies,
                            "--budget",
                            str(knobs.budget),
                            "--topk",
                            knobs.topk,
                            "--steps",
                            str(knobs.steps),
                            "--text",
                            knobs.text,
                        ],
                        knobs.provider,
                    )
                )
            )
    labels = [lab for lab, _ in parse_policies(knobs.policies)]
    costs = [r for r in read_costs(sources) if r["policy"] in labels]
    if knobs.predict:
        names = dict(parse_policies(knobs.policies))
        cases = [
            (
                knobs.model,
                lab,
                names[lab],
                {"topk": knobs.topk} if names[lab] != "full" else {},
                knobs.budget,
                n,
                w,
                knobs.provider,
            )
            for w in knobs.worlds
            for n in knobs.predict
            for lab in labels
        ]
        costs += predict_points(cases, "predict decode cost")
    write_csv(out / "costs.csv", costs, COST_FIELDS)
    ratios = ratio_rows(costs)
    write_csv(out / "ratios.csv", ratios, RATIO_COLS)
    md = results_markdown(costs, ratios)
    (out / "results.md").write_text(md)
    plot(costs, out / "decode_scaling.png")
    print(md)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
