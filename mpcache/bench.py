"""Long-context decode benchmark under MPC (``python -m parties bench``).

**Benchmark convention, not an end-to-end secure run.** A secure prefill over thousands of tokens is beyond a
2-core CPU, so — as the MPCache authors' own benchmark does — the prompt's forward pass is run in PLAINTEXT (by
the client, which for this benchmark also reads the checkpoint), and its per-layer K/V cache (plus the
attention probabilities a static policy reads at the end of the prefill) is secret-shared as the client's
input. Everything after that runs on shares and is measured: the policy's static eviction (a secure top-k and
an oblivious compaction), then decode steps through the model's real layer shape with the real weights
(fixed-operand weights, the default), each with the policy's dynamic selection, a one-hot gather, attention,
the MLP, the LM head and the vocabulary argmax, and the token opened to the client.

Only ``layers`` of the model's blocks are run (the first ones, with their real weights and real K/V); the
whole-model cost per token is scaled exactly: every block of a class (a block that computes its own selection,
or a follower that reuses its leader's under MPCache's layer sharing) has the same public shapes, hence the same
bytes and rounds, so ``whole = head + sum over the model's blocks of the measured cost of the block's class``
(checked against an all-layer run in tests/test_bench.py). Seconds are scaled the same way (an estimate).

Decode inputs are teacher-forced (the next tokens of the text, shared by the client), so the secure run and its
plaintext twin see the same inputs and their selections can be compared (``check``: the selections and the
logits are opened in a separate ``check`` scope, after the measured steps — test/benchmark only).
``seq_len`` is the number of cached rows the last measured step attends over before eviction (the prompt has
``seq_len - warmup - steps`` tokens; the warm-up step builds the cluster summaries once, like a prefill would).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from .backends.plain import PlainBackend
from .config import ModelConfig
from .model.transformer import KVCache, Transformer
from .policies.base import CachePolicy, Gather, PrefillContext, as_selection

CSV_COLUMNS = (
    "policy",
    "seq_len",
    "world_size",
    "protocol",
    "provider",
    "bytes_per_token",
    "rounds_per_token",
    "seconds_per_token",
    "layer_bytes",
    "layer_rounds",
    "layer_seconds",
    "head_bytes",
    "head_rounds",
    "static_bytes",
    "static_rounds",
    "static_seconds",
    "attended",
    "attended_frac",
    "lan_s",
    "wan_s",
    "selection_agreement",
    "logit_err",
    "bench_layers",
    "model_layers",
    "steps",
    "trust_model",
)


class Recording(CachePolicy):
    """Delegates to ``inner`` and records every Gather it returns: ``log[(phase, step, layer)] = Gather``."""

    def __init__(self, inner: CachePolicy):
        self.inner, self.log, self.step = inner, {}, "static"
        self.name = inner.name

    def prefill(self, ctx):
        g = self.inner.for_layer(ctx.layer).prefill(ctx)
        self.log[("static", ctx.layer)] = g
        return g

    def select(self, ctx):
        sel = self.inner.for_layer(ctx.layer).select(ctx)
        self.log[(self.step, ctx.layer)] = as_selection(sel).gather
        return sel

    def bind(self, cfg):
        # the inner policy comes bound to the WHOLE model (its per-layer budgets): the bench runs its first blocks
        return self

    def check_prompt(self, n_prompt: int) -> None:
        self.inner.check_prompt(n_prompt)

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        return self.inner.attended_tokens(n_prompt, step)

    def attended_by_layer(self, n_prompt: int, step: int, n_layers: int) -> list[int]:
        return self.inner.attended_by_layer(n_prompt, step, n_layers)


def layer_classes(policy: CachePolicy, n_layers: int) -> list[str]:
    """The cost class of each block: "own" (computes its selection) or "follower" (reuses its leader's); with
    per-layer budgets (SqueezeAttention) each distinct budget is its own class ("own@0.03", "own@0.73")."""
    leader = getattr(policy, "leader", None)
    if leader is None or not getattr(policy, "share_layers", False):
        classes = ["own"] * n_layers
    else:
        classes = ["own" if leader(i) == i else "follower" for i in range(n_layers)]
    lb = getattr(policy, "layer_budgets", None)
    if isinstance(lb, tuple):
        classes = [f"{c}@{lb[i]:g}" for i, c in enumerate(classes)]
    return classes


def bench_layers_needed(policy: CachePolicy, n_layers: int) -> int:
    """The fewest leading blocks that contain every cost class of the model (1 without layer sharing)."""
    classes = layer_classes(policy, n_layers)
    need = {c: classes.index(c) for c in set(classes)}
    return max(need.values()) + 1


def truncated(cfg: ModelConfig, weights: dict | None, layers: int):
    """The first ``layers`` blocks of the model (real shapes and weights), with its embedding and head."""
    cfg_k = dataclasses.replace(cfg, n_layers=layers)
    if weights is None:
        return cfg_k, None
    keep = {k: v for k, v in weights.items() if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    return cfg_k, keep


@dataclass
class PlainPrefix:
    """The client's plaintext prefill of the first blocks: per-layer K/V, the attention a static policy reads."""

    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    attn_fn: list = field(default_factory=list)


class _Capture(CachePolicy):
    def __init__(self, prefix: PlainPrefix):
        self.p = prefix

    def prefill(self, ctx):
        self.p.k.append(ctx.k)
        self.p.v.append(ctx.v)
        self.p.attn_fn.append(ctx.attn_fn if ctx.attn_fn is not None else (lambda s, e, a=ctx.attn: a[:, s:e]))


def plaintext_prefix(cfg_k: ModelConfig, weights: dict, ids: list[int]) -> PlainPrefix:
    prefix = PlainPrefix()
    Transformer(cfg_k, weights, PlainBackend(), _Capture(prefix)).prefill(ids, KVCache(cfg_k.n_layers))
    return prefix


class SharedPrefillContext(PrefillContext):
    """A PrefillContext on shares whose attention rows come from the client's plaintext prefill, secret-shared
    on demand (client input; public shapes). ``q`` is not provided (no policy's static stage reads it)."""

    def __init__(self, B, layer, n_layers, k, v, state, shared, share_fn):
        super().__init__(B, layer, n_layers, None, k, v, None, state, shared)
        self._share = share_fn

    def attn_rows(self, start: int, end: int):
        return self._share(("rows", self.layer, start, end))

    def attn_colsum(self, chunk: int = 256):
        return self._share(("colsum", self.layer))


def selection_sets(g: Gather | None, reveal) -> list | None:
    """Per KV head, the sorted candidate blocks a Gather selects (None for no selection)."""
    if g is None or g.onehot is None:
        return None
    oh = reveal(g.onehot)
    picked = oh.argmax(-1)  # (Hkv, k)
    if g.strata:
        from .layout import strata_layout

        layout, _ = strata_layout(g.strata, g.n_blocks_selected, g.interleave)
        picked = layout[torch.arange(layout.shape[0]), picked]
    return [sorted(picked[h].tolist()) for h in range(picked.shape[0])]


def agreement(secure: dict, plain: dict) -> float | None:
    """Mean over (phase, layer, KV head) of |secure picks ∩ plaintext picks| / |picks|."""
    rates = []
    for key, ps in plain.items():
        ss = secure.get(key)
        if ps is None or ss is None:
            continue
        for a, b in zip(ss, ps):
            rates.append(len(set(a) & set(b)) / max(1, len(b)))
    return sum(rates) / len(rates) if rates else None


def run_case(
    sess,
    B,
    cfg: ModelConfig,
    w_shared: dict,
    plain_w: dict | None,
    policy: CachePolicy,
    label: str,
    seq_len: int,
    ids: list[int] | None,
    layers: int,
    warmup: int,
    steps: int,
    check: bool,
) -> dict:
    """One (policy, seq_len) case on shares; returns the measured per-scope costs on this party (and, on the
    server with ``check``, the agreement with plaintext). ``ids`` (client only): prompt + teacher-forced tokens."""
    from .mpc.session import CLIENT

    n_prompt = seq_len - warmup - steps
    cfg_k, _ = truncated(cfg, None, layers)
    rec = Recording(policy)
    model = Transformer(cfg_k, w_shared, B, rec, scope=sess.scope)
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    prefix = plaintext_prefix(cfg_k, plain_w, ids[:n_prompt]) if sess.rank == CLIENT else None

    def share(x, shape):
        return B.share(x if sess.rank == CLIENT else None, src=CLIENT, shape=shape)

    def share_attn(req):
        if req[0] == "rows":
            _, i, s, e = req
            x = prefix.attn_fn[i](s, e) if prefix else None
            return share(x, (H, e - s, n_prompt))
        _, i = req
        x = None
        if prefix:
            x = sum(prefix.attn_fn[i](a, min(n_prompt, a + 256)).sum(dim=1) for a in range(0, n_prompt, 256))
        return share(x, (H, n_prompt))

    def onehot_token(pos):
        x = None
        if sess.rank == CLIENT:
            x = torch.nn.functional.one_hot(torch.tensor([ids[pos]]), cfg.vocab_size).float()
        return B.crypten.cryptensor(x if x is not None else torch.zeros(1, cfg.vocab_size), src=CLIENT, precision=0)

    base = f"bench/{label}/{seq_len}"
    cache = KVCache(layers)
    shared: dict = {}
    with sess.scope(base):
        with sess.scope("input"):
            ks = [share(prefix.k[i] if prefix else None, (Hkv, n_prompt, hd)) for i in range(layers)]
            vs = [share(prefix.v[i] if prefix else None, (Hkv, n_prompt, hd)) for i in range(layers)]
        t0 = time.perf_counter()
        with sess.scope("static"):
            for i in range(layers):
                with sess.scope(f"L{i}"):
                    ctx = SharedPrefillContext(B, i, layers, ks[i], vs[i], cache.state[i], shared, share_attn)
                    g = rec.prefill(ctx)
                    k, v = (ks[i], vs[i]) if g is None else (g.apply(ks[i], B), g.apply(vs[i], B))
                    cache.k[i], cache.v[i] = k, v
                    cache.logw[i] = None if g is None else g.log_weights()  # BalanceKV's row weights
            model._fix_cache(cache)  # rows fixed once, as at the end of a real prefill (fixed_kv)
        cache.n_prompt, cache.pos = cache.length, n_prompt
        static_s = time.perf_counter() - t0
        logits_sec = []
        for t in range(warmup + steps):
            name = "warmup" if t < warmup else f"token/{t - warmup}"
            rec.step = name
            with sess.scope(name):
                logits = model.decode(onehot_token(n_prompt + t), cache)
                B.next_token(logits, CLIENT)
            logits_sec.append(logits)
    out = {"static_seconds": static_s}
    if check:
        with sess.scope(f"check/{label}/{seq_len}"):

            def reveal(x):
                return B.reveal(x, dst=None, label="selection (bench check)")

            out["secure_sel"] = {f"{k[0]}|{k[1]}": selection_sets(g, reveal) for k, g in rec.log.items()}
            out["secure_logits"] = [B.reveal(lg, dst=None, label="logits (bench check)") for lg in logits_sec]
    return out


def plaintext_twin(
    cfg: ModelConfig,
    weights: dict,
    policy: CachePolicy,
    ids: list[int],
    seq_len: int,
    layers: int,
    warmup: int,
    steps: int,
) -> dict:
    """The same case in the clear (same truncated model, prefix, teacher-forced tokens): selections and logits."""
    n_prompt = seq_len - warmup - steps
    cfg_k, w = truncated(cfg, weights, layers)
    rec = Recording(policy)
    model = Transformer(cfg_k, w, PlainBackend(), rec)
    cache = KVCache(layers)
    model.prefill(ids[:n_prompt], cache)
    logits = []
    for t in range(warmup + steps):
        rec.step = "warmup" if t < warmup else f"token/{t - warmup}"
        logits.append(model.decode(ids[n_prompt + t], cache))
    return {"sel": {f"{k[0]}|{k[1]}": selection_sets(g, lambda x: x) for k, g in rec.log.items()}, "logits": logits}


def scale_costs(totals, policy: CachePolicy, cfg: ModelConfig, layers: int, base: str, steps: int) -> dict:
    """Whole-model per-token cost from the measured blocks: ``totals(prefix) -> {bytes_sent, rounds, seconds}``
    of one party; per-token means over the measured steps."""
    classes_bench = layer_classes(policy, layers)
    classes_model = layer_classes(policy, cfg.n_layers)
    per_class: dict = {}
    head = {"bytes": 0.0, "rounds": 0.0, "seconds": 0.0}
    for t in range(steps):
        tok = totals(f"{base}/token/{t}")
        lay_sum = {"bytes": 0.0, "rounds": 0.0, "seconds": 0.0}
        for i, c in enumerate(classes_bench):
            li = totals(f"{base}/token/{t}/L{i}")
            acc = per_class.setdefault(c, {"bytes": 0.0, "rounds": 0.0, "seconds": 0.0, "n": 0})
            for f in ("bytes", "rounds", "seconds"):
                acc[f] += li[f] / steps
                lay_sum[f] += li[f]
            acc["n"] += 1 / steps
        for f in ("bytes", "rounds", "seconds"):
            head[f] += (tok[f] - lay_sum[f]) / steps
    per_layer = {c: {f: v[f] / v["n"] for f in ("bytes", "rounds", "seconds")} for c, v in per_class.items()}
    whole = {f: head[f] + sum(per_layer[c][f] for c in classes_model) for f in ("bytes", "rounds", "seconds")}
    return {"whole": whole, "head": head, "per_layer": per_layer}


def attended(policy: CachePolicy, seq_len: int, warmup: int, steps: int) -> tuple[int, float]:
    """Rows the last measured step attends to (its full cache has ``seq_len`` rows), and that fraction."""
    lb = getattr(policy, "layer_budgets", None)
    if isinstance(lb, tuple):  # per-layer budgets: the mean over the model's layers
        per = policy.attended_by_layer(seq_len - warmup - steps, warmup + steps - 1, len(lb))
        a = round(sum(per) / len(per))
    else:
        a = policy.attended_tokens(seq_len - warmup - steps, warmup + steps - 1)
    return a, a / seq_len


def markdown_table(rows: list[dict]) -> str:
    cols = [
        "policy",
        "seq_len",
        "world_size",
        "protocol",
        "MB/token",
        "rounds/token",
        "s/token",
        "LAN s",
        "WAN s",
        "MB/layer",
        "rounds/layer",
        "static MB",
        "attended",
        "agreement",
        "logit err",
    ]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        agree = "—" if r.get("selection_agreement") in (None, "") else f"{r['selection_agreement']:.3f}"
        lerr = "—" if r.get("logit_err") in (None, "") else f"{r['logit_err']:.2g}"
        out.append(
            "| "
            + " | ".join(
                [
                    r["policy"],
                    str(r["seq_len"]),
                    str(r["world_size"]),
                    r["protocol"],
                    f"{r['bytes_per_token'] / 1e6:,.1f}",
                    f"{r['rounds_per_token']:,.0f}",
                    f"{r['seconds_per_token']:.1f}",
                    f"{r['lan_s']:.1f}",
                    f"{r['wan_s']:.1f}",
                    f"{r['layer_bytes'] / 1e6:,.2f}",
                    f"{r['layer_rounds']:,.0f}",
                    f"{r['static_bytes'] / 1e6:,.1f}",
                    f"{r['attended']} ({r['attended_frac']:.1%})",
                    agree,
                    lerr,
                ]
            )
            + " |"
        )
    return "\n".join(out)


def ratio_table(rows: list[dict], baseline: str = "full", skip: tuple = ()) -> str:
    """baseline / policy ratios of bytes, rounds and modelled LAN/WAN seconds per token, per length and world size
    (rows whose policy is in ``skip`` are left out: the other baselines)."""
    base = {(r["seq_len"], r["world_size"]): r for r in rows if r["policy"] == baseline}
    out = [
        "| policy | seq_len | world_size | comm ratio | rounds ratio | LAN latency ratio | WAN latency ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get((r["seq_len"], r["world_size"]))
        if b is None or r["policy"] == baseline or r["policy"] in skip:
            continue
        out.append(
            f"| {r['policy']} | {r['seq_len']} | {r['world_size']} | "
            f"{b['bytes_per_token'] / r['bytes_per_token']:.2f}x | "
            f"{b['rounds_per_token'] / r['rounds_per_token']:.2f}x | {b['lan_s'] / r['lan_s']:.2f}x | "
            f"{b['wan_s'] / r['wan_s']:.2f}x |"
        )
    return "\n".join(out)


def prompt_ids(tok, n: int, text: str = "austen", seed: int = 0) -> list[int]:
    """Exactly n token ids: real text (``"austen"``: Jane Austen, the eval split) or ``"random"`` ids (tests)."""
    if text == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, tok.vocab_size, (n,), generator=g).tolist()
    from .data import austen_text, split_text

    text = split_text(austen_text(), "eval")
    ids = tok.encode(text[: 8 * n + 1000])
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


__all__ = [
    "CSV_COLUMNS",
    "Recording",
    "agreement",
    "attended",
    "bench_layers_needed",
    "layer_classes",
    "markdown_table",
    "plaintext_twin",
    "prompt_ids",
    "ratio_table",
    "run_case",
    "scale_costs",
    "truncated",
]
