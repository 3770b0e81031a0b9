"""How far a decode row's max logit exceeds the max over its anchor columns (plaintext, real model and text).

The secure decode softmax (``mpcache.mpc.ops.softmax(anchor=(a, b))``) offsets its exp by the max over the first a
and last b attended columns (the attention sinks and the newest rows) instead of the row's max. It is the same
function while the excess ``D = row max - anchor max`` stays inside the exp's and the reciprocal's range
(``ops.ANCHOR_MAX_EXCESS``); this script measures D on SmolLM2-135M over passkey prompts (Austen filler, the eval
split), for every decode step that emits the key, every layer and every query head, over the rows each policy
attends (``--policies``; a budget policy's attended rows in its attended order: sinks, selected blocks, newest
rows), and the max abs probability error of the float models (anchored vs row-max offset) against the exact
softmax on those rows.

    python experiments/anchor_excess.py --lengths 1024,4096 --seeds 2 --policies full,mpcache

Writes results/anchor_excess/<UTC time>-<commit>/{rows.csv, results.md}; never overwrites.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def excess_rows(n: int, seeds: int, depths, anchor=None, policy: str = "full") -> list[dict]:
    import torch

    from mpcache import data
    from mpcache.backends.plain import PlainBackend
    from mpcache.model.transformer import KVCache, Transformer
    from mpcache.model.weights import load_model
    from mpcache.mpc import ops
    from mpcache.policies import make_policy

    torch.set_num_threads(1)
    anchor = anchor or Transformer.DECODE_ANCHOR
    cfg, w, tok = load_model("smollm2")
    B = PlainBackend()
    captured: list = []
    plain_softmax = B.softmax

    def softmax(x, dim=-1, mask=None, anchor=None, offset=None):
        if mask is None:  # the decode rows (the prefill's rows are masked), anchored or not
            captured.append(x.reshape(-1, x.shape[-1]).double())
        return plain_softmax(x, dim=dim, mask=mask)

    B.softmax = softmax
    pol = make_policy(policy) if policy == "full" else make_policy(policy, budget=0.1)
    model = Transformer(cfg, w, B, policy=pol)
    filler = data.split_text(data.austen_text(), "eval")
    out = []
    for seed in range(seeds):
        for depth in depths:
            s = data.passkey_sample(tok, filler, n, depth, 10007 + seed, seed)
            cache = KVCache(cfg.n_layers)
            model.prefill(s.prompt_ids, cache)
            captured.clear()
            for t in s.answer_ids:
                model.decode(t, cache)
            d_all, err_anchor, err_max = [], 0.0, 0.0
            for x in captured:
                a = ops._anchor_columns(x, anchor).max(-1, keepdim=True).values
                d_all.append((x.max(-1, keepdim=True).values - a).flatten())
                exact = torch.softmax(x, -1)
                err_anchor = max(err_anchor, (ops.softmax_reference(x, anchor=anchor) - exact).abs().max().item())
                err_max = max(err_max, (ops.softmax_reference(x) - exact).abs().max().item())
            d = torch.cat(d_all)
            out.append(
                {
                    "policy": policy,
                    "length": n,
                    "seed": seed,
                    "depth": depth,
                    "rows": d.numel(),
                    "D_max": round(d.max().item(), 3),
                    "D_p99.9": round(d.quantile(0.999).item(), 3),
                    "D_p99": round(d.quantile(0.99).item(), 3),
                    "frac_D_gt_4": round((d > 4).double().mean().item(), 5),
                    "frac_D_gt_8": round((d > 8).double().mean().item(), 5),
                    "frac_D_gt_limit": round((d > ops.ANCHOR_MAX_EXCESS).double().mean().item(), 6),
                    "err_anchored_model": f"{err_anchor:.2e}",
                    "err_rowmax_model": f"{err_max:.2e}",
                }
            )
            print(out[-1], flush=True)
    return out


def fixed_point_rows(m: int = 412, excesses=(4, 8, 10, 12, 13, 16), n_rows: int = 1000) -> list[dict]:
    """The anchored softmax's float model with every intermediate rounded to CrypTen's 2^-16 grid (exps, the
    scaled sum, its reciprocal, the products), on N(0, 1) rows of ``m`` entries with one entry ``D`` above the
    anchors' max: max abs error vs the exact softmax and the range of the rows' probability sums."""
    import math

    import torch

    from mpcache.model.transformer import Transformer
    from mpcache.mpc import ops
    from mpcache.mpc.config import MpcConfig

    def q(x):
        return torch.round(x * 65536) / 65536

    g = torch.Generator().manual_seed(0)
    out = []
    for D in excesses:
        x = torch.randn(n_rows, m, generator=g, dtype=torch.float64)
        anchor, iters, order = Transformer.DECODE_ANCHOR, MpcConfig().anchor_exp_iters, MpcConfig().anchor_exp_order
        cols = list(range(anchor[0])) + list(range(m - anchor[1], m))
        x[:, m // 2] = x[:, cols].max(-1).values + D
        a = ops._anchor_columns(x, anchor).max(-1, keepdim=True).values
        e = q(ops.exp_limit_reference(x - a, iters=iters, order=order))
        c = 1 / math.sqrt(m)
        r = q(1 / q(e.sum(-1, keepdim=True) * c))
        p = q(q(e * r) * c)
        err = (p - torch.softmax(x, -1)).abs().max().item()
        tot = p.sum(-1)
        out.append(
            {
                "m": m,
                "D": D,
                "max_abs_err": f"{err:.2e}",
                "sum_p_min": round(tot.min().item(), 4),
                "sum_p_max": round(tot.max().item(), 4),
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--policies", default="full", help="comma-separated; budget policies at 0.1 (their attended rows)")
    p.add_argument("--out", default="results/anchor_excess")
    a = p.parse_args(argv)
    rows = []
    for pol in a.policies.split(","):
        for n in [int(x) for x in a.lengths.split(",")]:
            rows += excess_rows(n, a.seeds, [float(x) for x in a.depths.split(",")], policy=pol)
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    out = REPO / a.out / f"{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')}-{commit}"
    out.mkdir(parents=True, exist_ok=False)
    with open(out / "rows.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    fx = fixed_point_rows()
    md += [
        "",
        "Fixed-point emulation of the anchored softmax (412 entries, one entry D above the anchors):",
        "",
        "| " + " | ".join(fx[0]) + " |",
        "|" + "---|" * len(fx[0]),
    ]
    md += ["| " + " | ".join(str(r[c]) for c in fx[0]) + " |" for r in fx]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
