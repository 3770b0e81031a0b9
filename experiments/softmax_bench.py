"""Lean secure softmax vs CrypTen's stock ``MPCTensor.softmax``, side by side in one MPI run.

For each row length (default 1,024 and 8,192 columns; 9 rows = SmolLM2's query heads) and each input kind
(``flat``: N(0, 1) attention-like logits; ``peaked``: the same plus +10 at one random column per row), every
variant runs on the same secret-shared input: bytes sent per party (max over parties), rounds (ledger, rank 0),
seconds (wall clock of the call on rank 0) and max abs error vs ``torch.softmax`` in float64. Variants:

* ``stock``: CrypTen's ``softmax`` (``max(dim)`` with argmax + tie-break, limit exp, its own reciprocal);
* ``ours``: mpcache.mpc.ops.softmax as it was (pairwise tree max on CrypTen's comparison, Newton reciprocal);
* ``lean``, ``lean_gs``, ``r4``, ``r448``, ...: the round/byte reductions of ops.py, one switch at a time
  (see VARIANTS); ``default``: ops.softmax with its current defaults (the row max by ``max_schedule``, as the
  prefill uses it); ``anchored``: the decode rows' softmax (``anchor=(4, 8)``: the exp's offset is the max of
  the 4 leading and 8 trailing columns; the peaked inputs put their +10 at a random column, mostly not an
  anchor, so they exercise an excess D ~ 10 over the anchors).

The exp approximation's error (float model of ``exp_limit`` vs exp, and the secure exp vs its model) is
measured too and written with the rest.

    python experiments/softmax_bench.py                                   # 2PC TFP (~2 min)
    python experiments/softmax_bench.py --protocol replicated             # 3PC replicated (3 processes)
    python experiments/softmax_bench.py --cols 1024 --rows 2 --variants stock default

Writes <out>/<UTC time>-<commit>-<protocol>/{config.json, results.json, results.csv, results.md}; never
overwrites. ``--party`` is the internal per-process entry point that the driver launches under mpirun.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make the repository's packages importable

# name -> keyword arguments of ops.softmax (None = CrypTen's stock softmax)
VARIANTS = {
    "stock": None,
    "ours": {"radix": 2, "lean": False, "recip": "newton", "exp_fit": None},
    "lean": {"radix": 2, "lean": True, "recip": "newton", "exp_fit": None},
    "lean_gs": {"radix": 2, "lean": True, "recip": "goldschmidt", "exp_fit": None},
    "r2x4": {"radix": (2, 4), "lean": True, "recip": "goldschmidt", "exp_fit": None},
    "r4": {"radix": 4, "lean": True, "recip": "goldschmidt", "exp_fit": None},
    "r4416": {"radix": (4, 4, 4, 16), "lean": True, "recip": "goldschmidt", "exp_fit": None},
    "r4464": {"radix": (4, 4, 64), "lean": True, "recip": "goldschmidt", "exp_fit": None},
    "r8": {"radix": 8, "lean": True, "recip": "goldschmidt", "exp_fit": None},
    "r4416_fit": {"radix": (4, 4, 4, 16), "lean": True, "recip": "goldschmidt", "exp_fit": 8.0},
    "default": {},  # row max by the latency-minimising schedule (prefill rows)
    "anchored": {"anchor": (4, 8)},  # decode rows: offset = max of 4 leading + 8 trailing columns
}


@dataclass
class Knobs:
    cols: list[int] = field(default_factory=lambda: [1024, 8192])
    rows: int = 9  # SmolLM2-135M: 9 query heads
    kinds: list[str] = field(default_factory=lambda: ["flat", "peaked"])
    peak: float = 10.0  # added to one column per row of the peaked inputs
    variants: list[str] = field(default_factory=lambda: ["stock", "ours", "lean", "r4416", "default", "anchored"])
    protocol: str = "arithmetic"  # arithmetic (2PC additive + Beaver) or replicated (3PC)
    provider: str = "tfp"  # tfp or ttp (adds a dealer rank)
    seed: int = 0
    out: str = "results/softmax_bench"
    timeout_s: int = 1800


def parse_args(argv=None) -> tuple[Knobs, argparse.Namespace]:
    knobs = Knobs()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Knobs):
        default = getattr(knobs, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            p.add_argument(flag, nargs="+", type=type(default[0]), default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--party", action="store_true", help=argparse.SUPPRESS)  # internal: one MPI process
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}: choose from {list(VARIANTS)}")
    return Knobs(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Knobs)}), a


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_input(kind: str, rows: int, cols: int, peak: float, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed * 1000003 + cols * 7 + (kind == "peaked"))
    x = torch.randn(rows, cols, generator=g)
    if kind == "peaked":
        x[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] += peak
    elif kind != "flat":
        raise ValueError(f"unknown input kind {kind!r}")
    return torch.round(x * 2**16) / 2**16  # on the fixed-point grid: no encoding error


def exp_error_table(fit_range=None) -> dict:
    """Float model of exp_limit vs exp on [-14, 0] (below -14, exp < 1e-6 < 1/16 ulp at 16 fractional bits)."""
    import torch

    from mpcache.mpc import ops
    from mpcache.mpc.config import MpcConfig

    x = torch.linspace(-14, 0, 14001, dtype=torch.float64)
    ref, ex = ops.exp_limit_reference(x, fit_range=fit_range), x.exp()
    out = {"iters": MpcConfig().exp_iters, "fit_range": fit_range, "max_abs_err_[-14,0]": (ref - ex).abs().max().item()}
    for lo in (-1, -2, -5, -10, -14):
        sel = x >= lo
        out[f"max_rel_err_[{lo},0]"] = ((ref[sel] - ex[sel]).abs() / ex[sel]).max().item()
    return out


# ---- one MPI process -----------------------------------------------------------------------------------------
def party(knobs: Knobs, run_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    from mpcache.mpc import ops
    from mpcache.mpc.config import MpcConfig
    from mpcache.mpc.session import open_session, serve_dealer

    sess = open_session(knobs.protocol, knobs.provider, "cpu", {"bench": "softmax"}, timeout_s=600)
    if sess.is_dealer:
        return serve_dealer(sess)
    import crypten

    rows = []

    def measure(f):
        sess.comm.Barrier()
        before = sess.ledger.totals(kind="online")
        t0 = time.perf_counter()
        y = f()
        sess.comm.Barrier()
        secs = time.perf_counter() - t0
        after = sess.ledger.totals(kind="online")
        d = {k: after[k] - before[k] for k in ("bytes_sent", "rounds")}
        return y, d, secs

    # the exp: secure vs float model on [-14, 0] (what the softmax feeds it after the max)
    xe = torch.round(torch.linspace(-14, 0, 1401) * 2**16) / 2**16
    exp_info = {}
    for fit in (None, MpcConfig().softmax_exp_fit):
        ye, ce, _ = measure(lambda fit=fit: ops.exp_limit(crypten.cryptensor(xe, src=0), fit_range=fit))
        ye = ye.get_plain_text().double()
        model = ops.exp_limit_reference(xe, fit_range=fit)
        exp_info["limit" if fit is None else f"fit{fit:g}"] = {
            **exp_error_table(fit),
            "secure_vs_model_max_abs": (ye - model).abs().max().item(),
            "secure_vs_exp_max_abs": (ye - xe.double().exp()).abs().max().item(),
            "rounds": ce["rounds"],
            "bytes_per_elem": ce["bytes_sent"] / xe.numel(),
        }
    for cols in knobs.cols:
        for kind in knobs.kinds:
            x = make_input(kind, knobs.rows, cols, knobs.peak, knobs.seed)
            exact = torch.softmax(x.double(), -1)
            for name in knobs.variants:
                kw = VARIANTS[name]
                xs = crypten.cryptensor(x, src=0)
                if kw is None:
                    y, c, secs = measure(lambda xs=xs: xs.softmax(-1))
                else:
                    y, c, secs = measure(lambda xs=xs, kw=kw: ops.softmax(xs, **kw))
                y = y.get_plain_text().double()
                err = (y - exact).abs().max().item()
                if kw is not None:
                    model_err = (y - ops.softmax_reference(x, **kw)).abs().max().item()
                else:
                    model_err = float("nan")
                sent = sess.comm.allgather(c["bytes_sent"])
                row = {
                    "cols": cols,
                    "kind": kind,
                    "variant": name,
                    "bytes_per_party": max(sent),
                    "rounds": c["rounds"],
                    "seconds": secs,
                    "max_abs_err": err,
                    "err_vs_model": model_err,
                    "config": "stock CrypTen" if kw is None else json.dumps(kw),
                }
                rows.append(row)
                if sess.rank == 0:
                    print(
                        f"[{cols:>5} {kind:<6} {name:<8}] {row['bytes_per_party'] / 1e6:8.2f} MB "
                        f"{row['rounds']:4d} rounds {secs:6.2f} s  err {err:.2e}",
                        flush=True,
                    )
    if sess.rank == 0:
        (Path(run_dir) / "results.json").write_text(json.dumps({"rows": rows, "exp": exp_info}, indent=1))
    sess.close()


# ---- driver --------------------------------------------------------------------------------------------------
CSV_COLS = [
    "cols",
    "kind",
    "variant",
    "bytes_per_party",
    "rounds",
    "seconds",
    "max_abs_err",
    "err_vs_model",
    "lan_comm_s",
    "wan_comm_s",
    "bytes_ratio_stock_over",
    "rounds_ratio_stock_over",
    "config",
]


def add_ratios(rows: list[dict]) -> None:
    from mpcache.latency import PROFILES, modelled_seconds

    for r in rows:  # communication only (compute 0): rounds x RTT + bytes / bandwidth
        for prof in ("lan", "wan"):
            r[f"{prof}_comm_s"] = modelled_seconds(0.0, r["rounds"], r["bytes_per_party"], PROFILES[prof])
    stock = {(r["cols"], r["kind"]): r for r in rows if r["variant"] == "stock"}
    for r in rows:
        s = stock.get((r["cols"], r["kind"]))
        r["bytes_ratio_stock_over"] = s["bytes_per_party"] / r["bytes_per_party"] if s else float("nan")
        r["rounds_ratio_stock_over"] = s["rounds"] / r["rounds"] if s else float("nan")


def markdown(rows: list[dict], exp: dict, knobs: Knobs, n: int, commit: str) -> str:
    head = (
        f"Softmax over {knobs.rows} rows, {knobs.protocol} {knobs.provider} ({n} processes), commit {commit}; "
        "bytes sent per party (max over parties), rounds and seconds on rank 0; error = max abs vs "
        "torch.softmax (float64); LAN/WAN ms = modelled communication time (rounds x RTT + bytes / bandwidth, "
        "mpcache/latency.py: 3 Gbps/0.3 ms, 400 Mbps/40 ms); ratios = stock / variant."
    )
    lines = [
        head,
        "",
        (
            "| cols | input | variant | MB/party | rounds | s | max abs err | LAN ms | WAN ms | stock/var bytes "
            "| stock/var rounds |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cols']} | {r['kind']} | {r['variant']} | {r['bytes_per_party'] / 1e6:.2f} | "
            f"{r['rounds']} | {r['seconds']:.2f} | {r['max_abs_err']:.1e} | {r['lan_comm_s'] * 1e3:.1f} | "
            f"{r['wan_comm_s'] * 1e3:.0f} | "
            f"{r['bytes_ratio_stock_over']:.2f} | {r['rounds_ratio_stock_over']:.2f} |"
        )
    lines += [
        "",
        "Variants: "
        + "; ".join(f"`{k}` = {'stock CrypTen' if VARIANTS[k] is None else VARIANTS[k]}" for k in knobs.variants),
        "",
    ]
    for name, e in exp.items():
        base = "1 + x/2^8" if e["fit_range"] is None else f"the minimax base on [-{e['fit_range']:g}, 0]"
        lines.append(
            f"- exp_limit `{name}` ({e['iters']} squarings of {base}), float model vs exp: "
            + ", ".join(f"{k} {v:.2g}" for k, v in e.items() if k.startswith("max_"))
            + f"; secure vs model max abs {e['secure_vs_model_max_abs']:.2g}, secure vs exp max abs "
            f"{e['secure_vs_exp_max_abs']:.2g} ({e['rounds']} rounds, {e['bytes_per_elem']:.0f} B/element)."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    knobs, a = parse_args(argv)
    if a.party:
        from mpcache.mpc.session import run_party

        return run_party(party, knobs, a.run_dir)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    commit = git_commit()
    run_dir = (
        REPO / knobs.out if not Path(knobs.out).is_absolute() else Path(knobs.out)
    ) / f"{stamp}-{commit}-{knobs.protocol}-{knobs.provider}"
    run_dir.mkdir(parents=True, exist_ok=False)
    n = (3 if knobs.protocol == "replicated" else 2) + (knobs.provider == "ttp")
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "knobs": dataclasses.asdict(knobs),
                "commit": commit,
                "n_processes": n,
                "variants": {k: VARIANTS[k] for k in knobs.variants},
            },
            indent=1,
        )
    )
    mpirun = str(Path(sys.executable).parent / "mpirun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [mpirun, "-n", str(n), sys.executable, __file__, "--party", "--run-dir", str(run_dir)]
    for f in dataclasses.fields(Knobs):
        v = getattr(knobs, f.name)
        cmd += ["--" + f.name.replace("_", "-"), *map(str, v if isinstance(v, list) else [v])]
    t0 = time.perf_counter()
    print(
        f"running {len(knobs.cols) * len(knobs.kinds) * len(knobs.variants)} softmax calls under mpirun -n {n} ...",
        flush=True,
    )
    p = subprocess.run(cmd, cwd=REPO, env=env, text=True, timeout=knobs.timeout_s, check=False)
    if p.returncode != 0:
        return p.returncode
    res = json.loads((run_dir / "results.json").read_text())
    rows = res["rows"]
    add_ratios(rows)
    with open(run_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_COLS})
    md = markdown(rows, res["exp"], knobs, n, commit)
    (run_dir / "results.md").write_text(md)
    print(md)
    print(f"done in {time.perf_counter() - t0:.0f} s; written: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
