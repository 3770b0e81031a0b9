"""SqueezeAttention: how far the public calibration's layer budgets are from the per-prompt ones (plaintext).

    python -m experiments.squeeze_gap --model smollm2 --lengths 1024,2048 --samples 8     # ~2 min on one core

For each eval prompt (the fidelity table's passkey prompts and text windows), the per-prompt similarities and
groups (the paper's own allocation) against the stored calibration (``python -m experiments.squeeze_calibrate``):
the share of prompts whose groups (hence budgets) are identical, the mean L1 distance between the per-layer budget
vectors (as a fraction of the total budget), and the largest similarity deviation. The accuracy gap itself is in
the fidelity table (``squeeze-h2o`` vs ``sqh2o-prompt=squeeze-h2o`` with ``layer_budgets="prompt"``).
Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpcache.data import austen_text, continuation_task, passkey_cases, passkey_sample, split_text
from mpcache.model.weights import load_model
from mpcache.policies.squeeze import allocate, kmeans_1d, layer_similarities, load_calibration


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--samples", type=int, default=8, help="prompts per length (half passkey, half text)")
    p.add_argument("--budget", type=float, default=0.1)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg, w, tok = load_model(a.model)
    cal = load_calibration(cfg)
    cal_b = allocate(cal["similarities"], a.budget, cal["p"], 1, cal["groups"])
    text = split_text(austen_text(), "eval")
    cases = passkey_cases("eval", a.samples)
    rows = []
    print(f"calibration: {cal['source']}; groups {cal['groups']}")
    print("| length | prompts | same groups | mean L1(budgets) / total | max abs(sim - calibrated sim) |")
    print("|---|---|---|---|---|")
    for n in [int(x) for x in a.lengths.split(",")]:
        same, l1, dev = 0, 0.0, 0.0
        for i, c in enumerate(cases):
            if i % 2 == 0:
                ids = passkey_sample(tok, text, n, [0.3, 0.6, 0.9][i % 3], c.key, c.seed).prompt_ids
            else:
                ids, _ = continuation_task(
                    tok, text, n, 1, random.Random(f"continuation-{c.seed}").randrange(len(text))
                )
            sims = layer_similarities(cfg, w, ids)
            groups = kmeans_1d(sims)
            b = allocate(sims, a.budget, cal["p"], 1, groups)
            same += groups == cal["groups"]
            l1 += sum(abs(x - y) for x, y in zip(b, cal_b)) / (a.budget * cfg.n_layers)
            dev = max(dev, max(abs(float(s) - t) for s, t in zip(sims, cal["similarities"])))
        rows.append({"length": n, "prompts": len(cases), "same": same, "l1": l1 / len(cases), "dev": dev})
        print(f"| {n} | {len(cases)} | {same}/{len(cases)} | {l1 / len(cases):.3f} | {dev:.3f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
