"""Predicted per-token MPC cost of a whole model and cache policy at any cached length, without running it.

Runs the real private generation (mpcache/generation.py: the model, the cache policies and every protocol) as
each party in turn, dry (mpcache/mpc/dryrun.py): shape-only shares on torch's meta device, a communicator that
moves nothing, the same ledger (checked == measured in tests/test_costs.py). No weights, no data, no
communication; the time grows with the number of protocol calls (layers, tokens), not with the shapes.

    python -m experiments.predict_cost --model llama-7b-shape --policy full,mpcache --seq-lens 1024,8192
    python -m experiments.predict_cost --model tiny-llama --protocol replicated --new-tokens 3   # dealer-free 3PC
    python -m experiments.predict_cost --model smollm2 --profile edge=0.1:80

Per (policy, cached length): the prefill over ``L`` prompt tokens is traced (the secure prefill, not the
plaintext shortcut), then ``--new-tokens`` tokens; the table reports the mean over the steady decode tokens
(token/2 ..; token/1, the first decode step, apart: it also pays one-time work such as MPCache's cluster summaries)
of online bytes sent per party (max over parties), online rounds (max over parties), the dealer's bytes apart
(``--provider ttp``: requests + answers, no rounds: the pipelined dealer is off the critical path,
mpcache/mpc/dealer.py) and modelled latency ``rounds x RTT + max bytes / bandwidth`` of the online traffic (compute
time not included: 0).
Writes results/predict_cost/<UTC time>-<commit>/{table.csv, table.md}; never overwrites.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpcache.config import ModelConfig

LLAMA_7B = ModelConfig(
    arch="llama",
    vocab_size=32000,
    hidden_size=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=32,
    head_dim=128,
    intermediate_size=11008,
    max_position=1 << 17,
    name="llama-7b-shape",
)


def model_config(name: str) -> ModelConfig:
    """Configs only (no weights are loaded): llama-7b-shape, tiny-llama, tiny-gpt2, smollm2 (SmolLM2-135M),
    paper-gpt2 (the MPCache paper's MPC decode shape)."""
    from mpcache.model.weights import tiny_config

    if name == "llama-7b-shape":
        return LLAMA_7B
    if name in ("tiny-llama", "tiny-gpt2"):
        import dataclasses

        return dataclasses.replace(tiny_config(name.split("-")[1]), max_position=1 << 17)
    if name == "paper-gpt2":  # the MPCache paper's decode shape (mpcache/model/weights.py PAPER_GPT2)
        return tiny_config("paper")
    if name == "smollm2":
        return ModelConfig(
            arch="llama",
            vocab_size=49152,
            hidden_size=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            head_dim=64,
            intermediate_size=1536,
            max_position=1 << 17,
            rope_theta=100000.0,
            name="smollm2-135m-shape",
        )
    raise SystemExit(f"unknown --model {name!r}: llama-7b-shape, smollm2, tiny-llama, tiny-gpt2, paper-gpt2")


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def kind_totals(ledgers: list[dict], prefix: str, kind: str) -> list[dict]:
    """Per party: bytes sent/received and rounds of ``kind`` ("online" or "dealer") in scope ``prefix`` and below."""
    out = []
    for led in ledgers:
        t = {"bytes_sent": 0, "bytes_recv": 0, "rounds": 0}
        for c in led["counts"]:
            if c["kind"] == kind and (c["scope"] == prefix or c["scope"].startswith(prefix + "/")):
                for k in t:
                    t[k] += c[k]
        out.append(t)
    return out


def predict_row(
    cfg, policy_name: str, budget: float, L: int, setting, n_new: int, profiles, label: str | None = None, kwargs=None
) -> dict:
    """One table row: per decode token (mean over the steady tokens 2.. when there are any, else token 1), the ONLINE
    bytes sent (max over parties) and rounds (max over parties) -- what the latency model prices -- and, apart, the
    dealer's bytes (``--provider ttp``: party 0's requests and the answers it receives, summed over parties; no
    rounds: off the critical path, mpcache/mpc/dealer.py). Token 1, the first decode step, is reported apart
    (``first_decode_*``): it also pays one-time work -- MPCache summarises every cluster of the compacted prompt
    there (SmolLM2 at 2k, dry: 4.6 GB and 2,738 rounds, against 84 MB and 2,408 rounds for token 2)."""
    from mpcache.mpc.dryrun import predict_generation
    from mpcache.policies import make_policy

    kwargs = dict(kwargs or {})
    pol = make_policy(policy_name) if policy_name == "full" else make_policy(policy_name, budget=budget, **kwargs)
    t0 = time.perf_counter()
    ledgers, _ = predict_generation(cfg, pol, setting, L, n_new)
    toks = list(range(2, n_new)) or list(range(1, n_new)) or [0]  # token 0 comes from the prefill; 1 is apart
    online = [kind_totals(ledgers, f"token/{t}", "online") for t in toks]
    dealer = [kind_totals(ledgers, f"token/{t}", "dealer") for t in toks]
    mean = {
        "bytes_sent": sum(max(p["bytes_sent"] for p in tok) for tok in online) / len(toks),
        "rounds": sum(max(p["rounds"] for p in tok) for tok in online) / len(toks),
        "dealer_bytes": sum(sum(p["bytes_sent"] + p["bytes_recv"] for p in tok) for tok in dealer) / len(toks),
        "dealer_rounds": sum(max(p["rounds"] for p in tok) for tok in dealer) / len(toks),
    }
    pre = kind_totals(ledgers, "prefill", "online")
    first = kind_totals(ledgers, "token/1", "online") if n_new >= 2 else None
    pre_dealer = kind_totals(ledgers, "prefill", "dealer")
    row = {
        "model": cfg.name,
        "policy": label or policy_name,
        "budget": budget if policy_name != "full" else 1.0,
        "cached_len": L,
        "setting": setting.label,
        "online_bytes_per_party_per_token": int(mean["bytes_sent"]),
        "online_MB_per_token": round(mean["bytes_sent"] / 1e6, 3),
        "online_rounds_per_token": round(mean["rounds"], 1),
        "dealer_bytes_per_token": int(mean["dealer_bytes"]),
        "dealer_MB_per_token": round(mean["dealer_bytes"] / 1e6, 3),
        "dealer_rounds_per_token": round(mean["dealer_rounds"], 1),
        "first_decode_MB": round(max(p["bytes_sent"] for p in first) / 1e6, 3) if first else None,
        "first_decode_rounds": max(p["rounds"] for p in first) if first else None,
        "prefill_online_MB": round(max(p["bytes_sent"] for p in pre) / 1e6, 1),
        "prefill_rounds": max(p["rounds"] for p in pre),
        "prefill_dealer_MB": round(sum(p["bytes_sent"] + p["bytes_recv"] for p in pre_dealer) / 1e6, 1),
        "trace_s": round(time.perf_counter() - t0, 2),
    }
    from mpcache.latency import modelled_seconds

    for name, prof in profiles.items():  # the critical path: online rounds and bytes (dealer traffic overlaps)
        row[f"{name}_s_per_token"] = round(modelled_seconds(0.0, mean["rounds"], mean["bytes_sent"], prof), 3)
    return row


def main(argv=None) -> int:
    from mpcache.latency import PROFILES, parse_profile
    from mpcache.mpc.dryrun import Setting

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-7b-shape")
    p.add_argument(
        "--policy",
        default="full,mpcache",
        help="comma-separated policy names, or LABEL=NAME with LABEL's settings in --policy-kwargs (e.g. ahead=mpcache)",
    )
    p.add_argument(
        "--policy-kwargs", default="{}", help='JSON {LABEL: {field: value}}, e.g. {"ahead": {"lookahead": true}}'
    )
    p.add_argument("--budget", type=float, default=0.1, help="kept fraction for budget policies")
    p.add_argument("--seq-lens", default="1024,8192", help="comma-separated cached (prompt) lengths")
    p.add_argument("--protocol", default="arithmetic", choices=["arithmetic", "replicated"])
    p.add_argument(
        "--provider",
        default=None,
        choices=["tfp", "ttp", "none"],
        help="default: none (dealer-free) for replicated, tfp for arithmetic; replicated + tfp: the insecure 3PC "
        "baseline (dry run only)",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=3,
        help="tokens generated (token 0 comes from the prefill, token 1 is reported apart: >= 3 for a steady mean)",
    )
    p.add_argument("--profile", action="append", default=[], help="extra network profile NAME=GBPS:RTT_MS")
    p.add_argument("--out-dir", default="results/predict_cost")
    a = p.parse_args(argv)
    cfg = model_config(a.model)
    provider = a.provider or ("none" if a.protocol == "replicated" else "tfp")
    setting = Setting(3 if a.protocol == "replicated" else 2, a.protocol, provider)
    profiles = dict(PROFILES)
    for spec in a.profile:
        prof = parse_profile(spec)
        profiles[prof.name] = prof
    rows = []
    for L in [int(x) for x in a.seq_lens.split(",")]:
        for pol in a.policy.split(","):
            label, _, name = pol.rpartition("=")
            kw = json.loads(a.policy_kwargs).get(label or name, {})
            rows.append(predict_row(cfg, name, a.budget, L, setting, a.new_tokens, profiles, label or None, kw))
            print(f"  traced {pol} L={L} in {rows[-1]['trace_s']} s", file=sys.stderr)
    cols = list(rows[0])
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / a.out_dir / f"{stamp}-{git_commit()}"
    out.mkdir(parents=True, exist_ok=False)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    show = [
        "policy",
        "cached_len",
        "online_MB_per_token",
        "online_rounds_per_token",
        "dealer_MB_per_token",
        *[f"{n}_s_per_token" for n in profiles],
        "first_decode_MB",
        "first_decode_rounds",
    ]
    md = [
        (
            f"Predicted decode cost per token: {cfg.name}, {setting.label}, budget {a.budget} "
            f"(dry run of the protocols; fixed-operand weights and K/V; compute time excluded)"
        ),
        "",
        "| " + " | ".join(show) + " |",
        "|" + "---|" * len(show),
    ]
    md += ["| " + " | ".join(str(r[c]) for c in show) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    print(f"wrote {out}/table.csv, table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
