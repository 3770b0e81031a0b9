"""Quality of KV-cache eviction policies against the full cache, in plaintext (the fidelity table and figure).

For each prompt length × policy × budget, on real text (Jane Austen's novels, see mpcache/data.py):

* **passkey** — a 5-digit key hidden at several depths of the filler; the answer turn is opened with
  "The pass key is ", the key's tokens are teacher-forced and the argmax checked at each one:
  ``passkey_exact`` (all right; equal to greedy exact match) and ``passkey_token_acc`` (fraction right), also
  per depth (``passkey_exact@0.5``).
* **ppl** — perplexity of ``ppl_tokens`` tokens of text after an n-token context, teacher-forced.
* **gen** — greedy generation of ``gen_tokens`` tokens after the same context, compared with the full cache's
  own greedy run: ``gen_agree_prefix`` (fraction of positions before the first divergence) and ``gen_agree``
  (fraction of positions equal).

Teacher forcing = prefill the prompt, then decode the given tokens one by one. The full-cache run of every
prompt is done once and reused as the reference; policies that do nothing at the prefill (the dynamic ones,
e.g. Quest) start from a copy of its prefilled cache instead of prefilling again.

    python experiments/fidelity.py                                   # the defaults below (hours on one core)
    python experiments/fidelity.py --lengths 1024 --budgets 0.1 --policies full,streaming,mpcache --samples 3
    python experiments/fidelity.py --split dev ...                    # choose defaults on dev, report eval

Writes results/fidelity/<UTC time>-<model>-<split>/ (a new folder each run): config.json (resolved knobs,
seeds and keys, git commit), samples.csv (one row per prompt/policy/metric, appended as it goes),
results.csv (one row per length/policy/budget/metric: mean, stderr, n), results.md and the PNGs of
experiments/plot_fidelity.py. SmolLM2's weights are the Q4_1 GGUF dequantized to float32: say so when
reporting.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import importlib
import json
import math
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from mpcache.backends import PlainBackend
from mpcache.data import austen_text, continuation_task, passkey_cases, passkey_sample, split_text
from mpcache.model.transformer import KVCache, Transformer
from mpcache.model.weights import load_model
from mpcache.policies import make_policy
from mpcache.policies.base import CachePolicy


@dataclass
class Knobs:
    model: str = "smollm2"  # load_model spec ("tiny-llama" for smoke runs)
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])  # prompt tokens (8192 if time allows)
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])  # each policy's budget (fraction)
    # Policy labels; "label=name" runs registry policy `name` under another label (with --policy-kwargs).
    policies: list[str] = field(
        default_factory=lambda: ["full", "streaming", "h2o", "snapkv", "tova", "quest", "mpcache"]
    )
    policy_kwargs: dict = field(default_factory=dict)  # {label: {field: value}} extra policy settings
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # needle depths
    samples: int = 3  # seeds per length: each gives one passkey prompt per depth and one text continuation
    gen_tokens: int = 64  # greedy tokens compared with the full cache
    ppl_tokens: int = 64  # teacher-forced tokens scored for perplexity
    tasks: list[str] = field(default_factory=lambda: ["passkey", "ppl", "gen"])
    split: str = "eval"  # "dev" to choose defaults, "eval" to report (disjoint seeds and text regions)
    text: str = "austen"  # "austen", or a path to a UTF-8 text file (tests)
    model_seed: int = 0  # seeds the tiny random models only
    threads: int = 1  # torch threads: 1, the machine is shared (2 threads with other load is ~25x slower)
    out: str = "results/fidelity"
    plot: bool = True  # run experiments/plot_fidelity.py on the results


# ------------------------------------------------------------------------------------------------- arguments
def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> Knobs:
    k = Knobs()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=k.model)
    p.add_argument("--lengths", type=_list(int), default=k.lengths, help="e.g. 1024,2048,4096")
    p.add_argument("--budgets", type=_list(float), default=k.budgets, help="e.g. 0.05,0.1,0.2")
    p.add_argument("--policies", type=_list(str), default=k.policies, help="e.g. full,streaming,mpcache")
    p.add_argument(
        "--policy-kwargs",
        type=json.loads,
        default=k.policy_kwargs,
        help='JSON {label: {field: value}}, e.g. \'{"mpc_nostatic": {"static": false}}\'',
    )
    p.add_argument("--depths", type=_list(float), default=k.depths)
    p.add_argument("--samples", type=int, default=k.samples)
    p.add_argument("--gen-tokens", type=int, default=k.gen_tokens)
    p.add_argument("--ppl-tokens", type=int, default=k.ppl_tokens)
    p.add_argument("--tasks", type=_list(str), default=k.tasks, help="subset of passkey,ppl,gen")
    p.add_argument("--split", choices=("dev", "eval"), default=k.split)
    p.add_argument("--text", default=k.text)
    p.add_argument("--model-seed", type=int, default=k.model_seed)
    p.add_argument("--threads", type=int, default=k.threads)
    p.add_argument("--out", default=k.out)
    p.add_argument("--no-plot", dest="plot", action="store_false")
    knobs = Knobs(**vars(p.parse_args(argv)))
    bad = set(knobs.tasks) - {"passkey", "ppl", "gen"}
    if bad:
        p.error(f"unknown tasks {sorted(bad)}")
    if "full" not in [_label_name(s)[1] for s in knobs.policies]:
        knobs.policies = ["full"] + knobs.policies  # the reference (gen agreement, shared prefills)
    return knobs


def _label_name(spec: str) -> tuple[str, str]:
    label, _, name = spec.partition("=")
    return (label, name or label)


# ------------------------------------------------------------------------------------------------- runs
@dataclass
class Config:
    """One policy setting to evaluate: a label, a budget (None for the full cache) and the policy value."""

    label: str
    budget: float | None
    policy: CachePolicy
    per_prompt: bool = False  # SqueezeAttention's per-prompt layer budgets (plaintext only): layer_budgets="prompt"

    def for_prompt(self, cfg, weights, ids: list[int]) -> CachePolicy:
        """The policy for one prompt: with ``per_prompt``, layer budgets from the prompt's own similarities."""
        if not self.per_prompt:
            return self.policy
        from mpcache.policies.squeeze import prompt_budgets

        lb = prompt_budgets(cfg, weights, ids, self.policy.keep, floor=self.policy.min_layer_budget())
        return dataclasses.replace(self.policy, layer_budgets=lb)

    @property
    def shares_full_prefill(self) -> bool:
        # A policy that leaves the prefill alone gets the same cache as the full one: reuse its copy.
        return type(self.policy).prefill is CachePolicy.prefill and not self.per_prompt


def build_configs(knobs: Knobs) -> list[Config]:
    out = []
    for spec in knobs.policies:
        label, name = _label_name(spec)
        try:  # policy files register themselves on import; import the one named, if it is its own module
            importlib.import_module(f"mpcache.policies.{name}")
        except ModuleNotFoundError:
            pass
        kw = dict(knobs.policy_kwargs.get(label, {}))
        per_prompt = kw.get("layer_budgets") == "prompt"  # SqueezeAttention per prompt (see Config.for_prompt)
        if per_prompt:
            kw.pop("layer_budgets")
        if name == "full":
            out.append(Config(label, None, make_policy(name, **kw)))
        else:
            out += [Config(label, b, make_policy(name, budget=b, **kw), per_prompt) for b in knobs.budgets]
    return out


class Runner:
    """Prefill / teacher forcing / greedy generation of one model under one policy at a time."""

    def __init__(self, cfg, weights):
        self.cfg, self.weights, self.backend = cfg, weights, PlainBackend()

    def prefill(self, policy: CachePolicy, ids: list[int]):
        model = Transformer(self.cfg, self.weights, self.backend, policy)
        cache = KVCache(self.cfg.n_layers)
        logits = model.prefill(ids, cache)
        return model, cache, logits

    @staticmethod
    def force(model, cache, logits, targets: list[int]) -> tuple[list[bool], list[float]]:
        """Teacher-force ``targets`` after a prefill whose last logits are ``logits``: (argmax right?, NLL) per
        target."""
        right, nll = [], []
        for i, t in enumerate(targets):
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            right.append(int(lp.argmax()) == t)
            nll.append(float(-lp[t]))
            if i + 1 < len(targets):
                logits = model.decode(t, cache)
        return right, nll

    @staticmethod
    def greedy(model, cache, logits, n: int) -> list[int]:
        out = []
        for i in range(n):
            out.append(int(logits[0].argmax()))
            if i + 1 < n:
                logits = model.decode(out[-1], cache)
        return out


def _agreement(ref: list[int], got: list[int]) -> tuple[float, float]:
    n = len(ref)
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), n)
    return first / n, sum(a == b for a, b in zip(ref, got)) / n


def _attended_frac(policy: CachePolicy, n: int) -> float:
    f = getattr(policy, "attended_fraction", None)  # at the first decode step
    return float("nan") if f is None else float(f(n, 0))


# ------------------------------------------------------------------------------------------------- output
def new_run_dir(out: str, knobs: Knobs) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = Path(out) / f"{stamp}-{Path(knobs.model).name}-{knobs.split}"
    d, i = base, 1
    while d.exists():  # never overwrite a run
        d, i = base.with_name(f"{base.name}.{i}"), i + 1
    d.mkdir(parents=True)
    return d


def git_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


SAMPLE_FIELDS = ["length", "policy", "budget", "task", "seed", "depth", "metric", "value"]
RESULT_FIELDS = ["length", "policy", "budget", "metric", "value", "stderr", "n"]
MAIN_METRICS = ["passkey_exact", "passkey_token_acc", "ppl", "gen_agree_prefix", "gen_agree"]


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean, standard error and count per (length, policy, budget, metric); ``ppl`` = exp(mean NLL)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["length"], r["policy"], r["budget"], r["metric"]), []).append(float(r["value"]))
        if r["metric"] == "passkey_exact":
            d = f"passkey_exact@{float(r['depth']):g}"
            groups.setdefault((r["length"], r["policy"], r["budget"], d), []).append(float(r["value"]))
    out = []
    for (length, pol, budget, metric), v in groups.items():
        v = [x for x in v if not math.isnan(x)] or [float("nan")]
        n = len(v)
        mean = sum(v) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1) / n) if n > 1 else float("nan")
        cell = {"length": length, "policy": pol, "budget": budget}
        out.append({**cell, "metric": metric, "value": mean, "stderr": se, "n": n})
        if metric == "nll":  # perplexity of the pooled tokens; its stderr by the delta method
            out.append({**cell, "metric": "ppl", "value": math.exp(mean), "stderr": math.exp(mean) * se, "n": n})
    return sorted(out, key=lambda r: (int(r["length"]), r["policy"], str(r["budget"]), r["metric"]))


def write_markdown(results: list[dict], path: Path, knobs: Knobs, note: str) -> None:
    idx = {(r["length"], r["policy"], r["budget"], r["metric"]): r for r in results}
    rows = sorted(
        {(r["length"], r["policy"], r["budget"]) for r in results},
        key=lambda x: (int(x[0]), knobs_order(knobs, x[1]), float(x[2] or 1)),
    )
    extra = ["attended_frac", "sec_passkey", "sec_text"]  # seconds per prompt, per config
    cols = [m for m in MAIN_METRICS + extra if any(r["metric"] == m for r in results)]
    lines = [
        f"# Fidelity ({knobs.model}, split={knobs.split})",
        "",
        note,
        "",
        "| length | policy | budget | " + " | ".join(cols) + " |",
        "|---" * (3 + len(cols)) + "|",
    ]
    for length, pol, budget in rows:
        cells = []
        for m in cols:
            r = idx.get((length, pol, budget, m))
            cells.append(
                ""
                if r is None
                else (f"{r['value']:.2f}" if m in ("ppl", "sec_passkey", "sec_text") else f"{r['value']:.3f}")
            )
        lines.append(f"| {length} | {pol} | {budget if budget != '' else '—'} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def knobs_order(knobs: Knobs, label: str) -> int:
    labels = [_label_name(s)[0] for s in knobs.policies]
    return labels.index(label) if label in labels else len(labels)


def evaluate(knobs: Knobs, cfg, weights, prompts: list[tuple], configs: list[Config], writer, fh) -> list[dict]:
    """Run every config on every prompt (the full cache first: it is the reference); one CSV row per metric."""
    from tqdm import tqdm

    rows: list[dict] = []

    def emit(length, conf, task, seed, depth, metric, value):
        r = {
            "length": length,
            "policy": conf.label,
            "budget": "" if conf.budget is None else conf.budget,
            "task": task,
            "seed": seed,
            "depth": depth,
            "metric": metric,
            "value": value,
        }
        rows.append(r)
        writer.writerow(r)

    runner = Runner(cfg, weights)
    full = next(c for c in configs if c.budget is None and type(c.policy) is CachePolicy)
    order = [full] + [c for c in configs if c is not full]
    bar = tqdm(total=len(prompts) * len(order), desc="fidelity", unit="run", dynamic_ncols=True)
    with torch.inference_mode():
        for length, task, seed, depth, ids, targets, needle_depth in prompts:
            n = len(ids)
            ref_cache = ref_logits = ref_gen = None
            for conf in order:
                bar.set_postfix_str(f"L={length} {task} seed={seed} {conf.label}@{conf.budget}")
                t0 = time.time()
                if conf is not full and conf.shares_full_prefill:
                    model = Transformer(cfg, weights, runner.backend, conf.policy)
                    cache, logits = copy.deepcopy(ref_cache), ref_logits
                else:
                    model, cache, logits = runner.prefill(conf.for_prompt(cfg, weights, ids), ids)
                t_prefill = time.time() - t0
                if conf is full:
                    ref_cache, ref_logits = copy.deepcopy(cache), logits
                emit(length, conf, task, seed, depth, "kept_frac", cache.length / n)
                emit(length, conf, task, seed, depth, "attended_frac", _attended_frac(conf.policy, n))
                if task == "passkey":
                    right, _ = runner.force(model, cache, logits, targets)
                    emit(length, conf, task, seed, depth, "passkey_exact", float(all(right)))
                    emit(length, conf, task, seed, depth, "passkey_token_acc", sum(right) / len(right))
                    emit(length, conf, task, seed, depth, "needle_depth", needle_depth)
                else:
                    if "gen" in knobs.tasks:
                        gen_cache = copy.deepcopy(cache) if "ppl" in knobs.tasks else cache
                        got = runner.greedy(model, gen_cache, logits, knobs.gen_tokens)
                        del gen_cache
                        if conf is full:
                            ref_gen = got
                        pre, agree = _agreement(ref_gen, got)
                        emit(length, conf, task, seed, depth, "gen_agree_prefix", pre)
                        emit(length, conf, task, seed, depth, "gen_agree", agree)
                    if "ppl" in knobs.tasks:
                        _, nll = runner.force(model, cache, logits, targets[: knobs.ppl_tokens])
                        for x in nll:  # one row per token so that ppl = exp(mean NLL over all tokens)
                            emit(length, conf, task, seed, depth, "nll", x)
                emit(length, conf, task, seed, depth, f"sec_prefill_{task}", t_prefill)
                emit(length, conf, task, seed, depth, f"sec_{task}", time.time() - t0)
                fh.flush()  # a killed run keeps what it measured
                del cache
                bar.update(1)
    bar.close()
    return rows


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Path:
    knobs = parse_args(argv)
    torch.set_num_threads(knobs.threads)

    t_load = time.time()
    cfg, weights, tok = load_model(knobs.model, seed=knobs.model_seed)
    t_load = time.time() - t_load
    text = austen_text() if knobs.text == "austen" else Path(knobs.text).read_text(encoding="utf-8")
    text = split_text(text, knobs.split)
    configs = build_configs(knobs)
    cases = passkey_cases(knobs.split, knobs.samples)
    offsets = [random.Random(f"continuation-{c.seed}").randrange(len(text)) for c in cases]
    n_new = max(knobs.ppl_tokens if "ppl" in knobs.tasks else 0, knobs.gen_tokens if "gen" in knobs.tasks else 0)
    run_dir = new_run_dir(knobs.out, knobs)
    meta = {
        "knobs": dataclasses.asdict(knobs),
        "git": git_info(),
        "model": cfg.to_dict(),
        "model_digest": cfg.digest(),
        "weights_note": "SmolLM2-135M-Instruct Q4_1 GGUF dequantized to float32" if "smollm2" in knobs.model else "",
        "passkey_cases": [dataclasses.asdict(c) for c in cases],
        "continuation_offsets": offsets,
        "configs": [{"label": c.label, "budget": c.budget, "policy": repr(c.policy)} for c in configs],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(),
        "load_seconds": t_load,
    }
    (run_dir / "config.json").write_text(json.dumps(meta, indent=2, default=str))

    # prompts first (cheap), so the progress bar knows the total
    prompts = []  # (length, task, seed, nominal depth, ids, targets, measured needle depth)
    for length in knobs.lengths:
        if "passkey" in knobs.tasks:
            for c in cases:
                for d in knobs.depths:  # room for the answer tokens inside the model's context
                    s = passkey_sample(tok, text, min(length, cfg.max_position - 16), d, c.key, c.seed)
                    prompts.append((length, "passkey", c.seed, d, s.prompt_ids, s.answer_ids, s.depth))
        if {"ppl", "gen"} & set(knobs.tasks):
            n_ctx = min(length, cfg.max_position - n_new)
            for c, off in zip(cases, offsets):
                ctx, cont = continuation_task(tok, text, n_ctx, max(knobs.ppl_tokens, 1), off)
                prompts.append((length, "text", c.seed, "", ctx, cont, None))

    with open(run_dir / "samples.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, SAMPLE_FIELDS)
        writer.writeheader()
        rows = evaluate(knobs, cfg, weights, prompts, configs, writer, fh)

    results = aggregate(rows)
    with open(run_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, RESULT_FIELDS)
        w.writeheader()
        w.writerows(results)
    parts = {
        "passkey": f"passkey: {knobs.samples} seeds × {len(knobs.depths)} depths per cell",
        "ppl": f"ppl: {knobs.ppl_tokens} tokens × {knobs.samples} texts",
        "gen": f"gen agreement: {knobs.gen_tokens} greedy tokens × {knobs.samples} texts",
    }
    note = "; ".join(parts[t] for t in knobs.tasks) + ". " + meta["weights_note"]
    write_markdown(results, run_dir / "results.md", knobs, note)
    meta["finished"] = datetime.datetime.now(datetime.UTC).isoformat()
    (run_dir / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    if knobs.plot:
        r = subprocess.run(
            [sys.executable, str(REPO / "experiments" / "plot_fidelity.py"), str(run_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            print(f"plotting failed (results are saved): {r.stderr.strip()[-500:]}", file=sys.stderr)
    print(f"wrote {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
