"""SqueezeAttention's public calibration of a model: per-layer importance on public text, stored with the model.

    python -m experiments.squeeze_calibrate --model smollm2                 # ~1 min on one core
    python -m experiments.squeeze_calibrate --model tiny-llama --length 256 --samples 2

Runs the model in plaintext on ``--samples`` windows of ``--length`` tokens of public text (Jane Austen, the
``dev`` split: disjoint from the fidelity table's ``eval`` text), averages each layer's cos(x, x + attn(x)) and
writes the calibration JSON (similarities, k-means groups, p, the model's config digest) to
``$MPCACHE_CACHE_DIR/squeeze/<model name>.json`` (default ``~/.cache/mpcache/squeeze/``) or ``--out-dir``.
``layer_budgets="calibrated"`` (any budget policy) and the ``squeeze-*`` policies read it at load and refuse a
missing file or one made for another model (mpcache/policies/squeeze.py).
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpcache.data import austen_text, split_text
from mpcache.model.weights import load_model
from mpcache.policies.squeeze import SQUEEZE_P, allocate, calibrate, save_calibration


@dataclass
class Knobs:
    model: str = "smollm2"  # load_model spec
    length: int = 1024  # tokens per calibration window
    samples: int = 4  # windows of public text (averaged)
    p: float = SQUEEZE_P  # the least important group's share of its uniform budget
    seed: int = 0  # picks the windows; the tiny random models' weight seed too
    out_dir: str | None = None


def public_windows(tok, n: int, samples: int, seed: int) -> list[list[int]]:
    """``samples`` windows of n token ids from the dev split of the public text (offsets from ``seed``)."""
    text = split_text(austen_text(), "dev")
    rng = random.Random(f"squeeze-calibration-{seed}")
    out = []
    for _ in range(samples):
        off = rng.randrange(max(1, len(text) - 8 * n - 1000))
        ids = tok.encode(text[off : off + 8 * n + 1000])
        while len(ids) < n:
            ids = ids + ids
        out.append(ids[:n])
    return out


def main(argv: list[str] | None = None) -> dict:
    k = Knobs()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=k.model)
    p.add_argument("--length", type=int, default=k.length)
    p.add_argument("--samples", type=int, default=k.samples)
    p.add_argument("--p", type=float, default=k.p)
    p.add_argument("--seed", type=int, default=k.seed)
    p.add_argument("--out-dir", default=k.out_dir)
    k = Knobs(**vars(p.parse_args(argv)))
    torch.set_num_threads(1)
    cfg, weights, tok = load_model(k.model, seed=k.seed)
    n = min(k.length, cfg.max_position)
    cal = calibrate(
        cfg,
        weights,
        public_windows(tok, n, k.samples, k.seed),
        p=k.p,
        source=f"austen dev split, {k.samples} x {n} tokens, seed {k.seed}",
    )
    path = save_calibration(cal, cfg, k.out_dir)
    print(f"wrote {path}")
    print("similarities:", " ".join(f"{s:.3f}" for s in cal["similarities"]))
    print("groups:      ", " ".join(str(g) for g in cal["groups"]))
    print("budgets at 0.1:", " ".join(f"{b:.3f}" for b in allocate(cal["similarities"], 0.1, k.p, 1, cal["groups"])))
    return cal


if __name__ == "__main__":
    main()
