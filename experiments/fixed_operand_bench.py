"""Fixed-operand Beaver triples vs stock matmuls: per-token bytes, rounds and seconds of a private generation.

Runs the same private greedy generation once per mode under ``mpirun`` (stock: every weight matmul opens
``x - a`` and ``W - B``; fixed: ``W - B`` opened once offline, ``x - a`` per use, see mpcache/mpc/fixed_operand.py)
and tabulates offline / prefill / mean decode costs per party, measured by the session ledger.

    python experiments/fixed_operand_bench.py                           # SmolLM2, 2PC TFP, 3 new tokens (~5 min)
    python experiments/fixed_operand_bench.py --model tiny-llama --modes fixed stock --protocol replicated

Writes results/fixed_operand_bench/<UTC time>-<commit>/{<mode>/rank{r}.json, <mode>.json, result.json}; never
overwrites. ``--party`` is the internal per-process entry point that the driver launches under mpirun.
"""

from __future__ import annotations

import argparse
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


@dataclass
class Knobs:
    model: str = "smollm2"  # SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), or tiny-llama / tiny-gpt2
    prompt: str = "The capital of France is"  # short, no chat template: the decode steps are what we compare
    max_new_tokens: int = 3  # token 0 comes from the prefill; tokens 1.. are decode steps
    protocol: str = "arithmetic"  # arithmetic (2PC additive + Beaver) or replicated (3PC)
    provider: str = "tfp"  # tfp or ttp (adds a dealer rank)
    modes: list[str] = field(default_factory=lambda: ["stock", "fixed"])
    seed: int = 0  # weight seed of the tiny models
    out_dir: str = "results/fixed_operand_bench"
    timeout_s: int = 1800  # per mpirun


def parse_args(argv=None) -> tuple[Knobs, argparse.Namespace]:
    knobs = Knobs()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Knobs):
        default = getattr(knobs, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            p.add_argument(flag, nargs="+", default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--party", action="store_true", help=argparse.SUPPRESS)  # internal: one MPI process
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    return Knobs(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Knobs)}), a


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- one MPI process -----------------------------------------------------------------------------------------
def party(knobs: Knobs, mode: str, run_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    from mpcache.generation import per_token_costs, plaintext_generate, private_generate, write_json
    from mpcache.model.weights import expected_shapes, load_model
    from mpcache.mpc.session import CLIENT, SERVER, open_session, serve_dealer

    cfg, weights, tok = load_model(knobs.model, seed=knobs.seed)
    public = {
        "model": cfg.to_dict(),
        "weight_shapes": {k: list(v) for k, v in expected_shapes(cfg).items()},
        "mode": mode,
        "max_new_tokens": knobs.max_new_tokens,
    }
    sess = open_session(knobs.protocol, knobs.provider, "cpu", public, timeout_s=600)
    if sess.is_dealer:
        return serve_dealer(sess)
    ids = tok.encode(knobs.prompt) if sess.rank == CLIENT else None
    t0 = time.perf_counter()
    tokens, _, B = private_generate(
        sess, cfg, weights if sess.rank == SERVER else None, ids, knobs.max_new_tokens, fixed_weights=mode == "fixed"
    )
    wall = time.perf_counter() - t0
    out = Path(run_dir) / mode
    out.mkdir(parents=True, exist_ok=True)
    sess.ledger.write(out / f"rank{sess.rank}.json")
    ledgers = sess.comm.gather(sess.ledger.to_dict(), root=SERVER)
    client = sess.comm.bcast({"tokens": tokens, "ids": ids} if sess.rank == CLIENT else None, root=CLIENT)
    if sess.rank == SERVER:
        per_token, phases = per_token_costs(ledgers, knobs.max_new_tokens)
        pt, _, _ = plaintext_generate(cfg, weights, client["ids"], knobs.max_new_tokens)
        write_json(
            out.with_suffix(".json"),
            {
                "mode": mode,
                "matmul_paths": B.matmul_paths,
                "prompt_tokens": len(client["ids"]),
                "tokens": client["tokens"],
                "text": tok.decode(client["tokens"]),
                "plaintext_tokens": pt,
                "tokens_agree": pt == client["tokens"],
                "wall_seconds": wall,
                "per_token": per_token,
                **phases,
            },
        )
    sess.close()


# ---- driver --------------------------------------------------------------------------------------------------
def summarise(r: dict) -> dict:
    dec = [t for t in r["per_token"] if t["token"] > 0]

    def mean(key, f=lambda v: v):
        return sum(f(t[key]) for t in dec) / max(len(dec), 1)

    return {
        "offline_MB": max(r["offline"]["bytes_sent"]) / 1e6,
        "offline_rounds": r["offline"]["rounds"],
        "offline_s": r["offline"]["seconds"],
        "prefill_MB": max(r["prefill"]["bytes_sent"]) / 1e6,
        "prefill_rounds": r["prefill"]["rounds"],
        "prefill_s": r["prefill"]["seconds"],
        "decode_MB": mean("bytes_sent", max) / 1e6,
        "decode_rounds": mean("rounds"),
        "decode_s": mean("seconds"),
        "decode_lan_s": mean("modelled_lan_s"),
        "decode_wan_s": mean("modelled_wan_s"),
    }


def main(argv=None) -> int:
    knobs, a = parse_args(argv)
    if a.party:
        from mpcache.mpc.session import run_party

        return run_party(party, knobs, a.mode, a.run_dir)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = REPO / knobs.out_dir / f"{stamp}-{git_commit()}"
    run_dir.mkdir(parents=True, exist_ok=False)
    n = (3 if knobs.protocol == "replicated" else 2) + (knobs.provider == "ttp")
    mpirun = str(Path(sys.executable).parent / "mpirun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = {"config": dataclasses.asdict(knobs), "commit": git_commit(), "n_processes": n, "modes": {}}
    for mode in knobs.modes:
        cmd = [mpirun, "-n", str(n), sys.executable, __file__, "--party", "--mode", mode, "--run-dir", str(run_dir)]
        for f in dataclasses.fields(Knobs):
            v = getattr(knobs, f.name)
            cmd += ["--" + f.name.replace("_", "-"), *map(str, v if isinstance(v, list) else [v])]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=knobs.timeout_s, check=False)
        if p.returncode != 0:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
            return p.returncode
        r = json.loads((run_dir / f"{mode}.json").read_text())
        result["modes"][mode] = {
            "launch_seconds": time.perf_counter() - t0,
            **summarise(r),
            "tokens_agree": r["tokens_agree"],
            "text": r["text"],
            "matmul_paths": r["matmul_paths"],
            "prompt_tokens": r["prompt_tokens"],
        }
        print(
            f"[{mode}] done in {time.perf_counter() - t0:.0f} s: {r['text']!r} (agree: {r['tokens_agree']})", flush=True
        )
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    cols = [
        "offline_MB",
        "offline_rounds",
        "prefill_MB",
        "prefill_rounds",
        "prefill_s",
        "decode_MB",
        "decode_rounds",
        "decode_s",
        "decode_lan_s",
        "decode_wan_s",
    ]
    print("mode   " + " ".join(f"{c:>14}" for c in cols))
    for mode, s in result["modes"].items():
        print(f"{mode:<6} " + " ".join(f"{s[c]:>14.2f}" for c in cols))
    print(f"written: {run_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
