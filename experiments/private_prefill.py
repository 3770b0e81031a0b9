"""The private prefill of a long secret prompt, measured end to end (issue "Seconds, not only bytes").

Runs the main job itself, ``mpirun -n N python -m parties generate --no-plaintext --max-new-tokens 1`` (a private
run: the prompt never leaves the client except as shares), on a prompt of each requested length cut from the
embedded Austen text, and reads the client's ``summary.json``: the prefill's bytes (max over parties), rounds and
seconds, the offline phase's seconds, and each party's peak resident memory. Bytes and rounds are exact (the
ledger); seconds and memory are this machine's.

    python experiments/private_prefill.py --lengths 434,1024
    python experiments/private_prefill.py --lengths 1024 --ranks 3 -- --provider ttp

Arguments after ``--`` go to ``parties generate`` unchanged (trust model, policy, ...). Writes
results/private_prefill/<UTC time>-<commit>/{table.csv, results.md, runs/}; never overwrites.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prompt_of(n_tokens: int) -> str:
    """About ``n_tokens`` tokens of the Austen text (SmolLM2's tokenizer), cut at a token boundary."""
    from mpcache import data
    from mpcache.model.weights import load_public

    tok = load_public("smollm2")[1]  # the public part only: config and tokenizer
    ids = tok.encode(data.austen_text())[:n_tokens]
    return tok.decode(ids)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def run_one(n: int, ranks: int, extra: list[str], out: Path, timeout: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    prompt = out / "prompt.txt"
    prompt.write_text(prompt_of(n), encoding="utf-8")
    mpirun = str(Path(sys.executable).parent / "mpirun")
    cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "parties", "generate", "--prompt-file", str(prompt)]
    cmd += ["--max-new-tokens", "1", "--no-plaintext", "--out", str(out / "run"), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    (out / "stderr.txt").write_text(p.stderr[-20000:])
    if p.returncode != 0:
        raise SystemExit(f"parties generate failed for {n} tokens ({p.returncode}):\n{p.stderr[-3000:]}")
    s = json.loads((out / "run" / "summary.json").read_text())
    pre = s["prefill"]
    return {
        "prompt_tokens": s["prompt_tokens"],
        "trust_model": s.get("trust_model", ""),
        "prefill_MB_per_party": round(max(pre["bytes_sent"]) / 1e6, 1),
        "prefill_rounds": pre["rounds"],
        "prefill_s": round(pre["seconds"], 1),
        "offline_s": round(s["offline"]["seconds"], 1),
        "peak_rss_MB_per_party": " / ".join(str(round(b / 2**20)) for b in s["peak_rss_bytes"]),
        "modelled_lan_s": round(pre.get("modelled_lan_s", 0.0), 1),
        "job_wall_s": round(wall, 1),
    }


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="434,1024", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks (2PC: 2; 2PC + dealer or 3PC: 3)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--out", default=str(REPO / "results" / "private_prefill"))
    args = ap.parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) / f"{stamp}-{git_commit()}"
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        print(f"private prefill of {n} tokens ...", file=sys.stderr, flush=True)
        rows.append(run_one(n, args.ranks, extra, out / "runs" / str(n), args.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = list(rows[0])
    md = [f"# Private prefill (`parties generate --no-plaintext`, {args.ranks} ranks, {' '.join(extra) or 'defaults'})"]
    md += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out}/table.csv, results.md")


if __name__ == "__main__":
    main()
