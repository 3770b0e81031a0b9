"""The main job: a private greedy generation under MPC, with per-token costs and a plaintext check beside it.

Who knows what (design §2): the server (rank 0) shares the weights, the client (rank 1) shares its prompt as
one-hot rows and is the only party that learns the generated tokens. Public: the architecture, the prompt
length, the number of new tokens, the policy and its budgets — hence every shape. Only the server reads the
weights (``parties generate``: the others load the config and tokenizer alone, ``load_public``); the others pass
``weights=None`` and share by shape. The plaintext check (same prompt, same weights, in the clear) is a
verification oracle run by the operator on rank 0, after the private run; it is reported beside it, labelled, and
never feeds it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass

import torch

from .backends.plain import PlainBackend
from .backends.secure import SecureBackend
from .config import ModelConfig
from .latency import PROFILES, modelled_seconds
from .model.transformer import Transformer, generate
from .model.weights import expected_shapes, fold_norm_gains, folded_norm_names
from .mpc import audit
from .mpc.config import MpcConfig
from .mpc.session import CLIENT, SERVER, Session, SessionError


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    per_token: list[dict]
    summary: dict


# weight matrices used only as the right operand of matmuls (and embed: onehot @ embed, h @ embed.T): with
# fixed=True they become FixedOperands. Biases, norm weights and gpt2's pos_embed (indexed) stay plain shares.
FIXED_WEIGHT_NAMES = (
    *("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "w_fc", "w_proj", "lm_head", "embed"),
    *("wqkv", "w_gateup"),  # the fused ones (FUSED_WEIGHTS)
)
#: products of the same input fused into one weight before fixing (no traffic): q, k and v of a block read
#: the same normalised row, so do the gate and up projections: one opening of x - a and one round instead of 3
#: (2), |x| * 8 B fewer per party for each operand saved (mpcache/model/transformer.py reads the fused names)
FUSED_WEIGHTS = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gateup": ("w_gate", "w_up")}


def fuse_weights(w: dict, cat) -> dict:
    """``w`` with each block's parts of FUSED_WEIGHTS replaced by their concatenation along the last dim
    (``cat(parts)``): the fused names, where every part is there."""
    out, blocks = dict(w), sorted({k.rsplit(".", 1)[0] + "." for k in w if k.startswith("layers.")})
    for p in blocks:
        for fused, parts in FUSED_WEIGHTS.items():
            if all(p + n in out for n in parts):
                out[p + fused] = cat([out.pop(p + n) for n in parts])
    return out


def share_weights(
    sess: Session,
    B: SecureBackend,
    cfg: ModelConfig,
    weights: dict | None,
    fixed: bool = False,
    fold_norms: bool | None = None,
) -> dict:
    """The server secret-shares every weight tensor (offline phase); other parties pass only public shapes.
    ``fixed``: also open each weight matrix's mask once (fixed-operand triples, offline/weights scope).
    ``fold_norms`` (default ``B.cfg.fold_norms``, public): the server first folds each block's norm gain into
    the linear layers that read it (:func:`fold_norm_gains`), which are shared instead of the gains."""
    from .mpc.fixed_operand import FixedOperand

    fold = B.cfg.fold_norms if fold_norms is None else fold_norms
    shapes = expected_shapes(cfg)
    weights = weights if sess.rank == SERVER else None  # only the server's weights are read (None: dry run)
    if fold:
        gone = folded_norm_names(cfg)
        shapes = {k: v for k, v in shapes.items() if k not in gone}
        if weights is not None:
            weights = fold_norm_gains(cfg, weights)
    with sess.scope("offline"), sess.scope("weights"):
        w = {
            name: B.share(weights[name] if weights is not None else None, src=SERVER, shape=shape)
            for name, shape in shapes.items()
        }
        w = fuse_weights(w, lambda ts: B.crypten.cat(ts, dim=-1))  # shares: local
        if fixed:
            w = {
                name: FixedOperand.fix(t) if name.rsplit(".", 1)[-1] in FIXED_WEIGHT_NAMES else t
                for name, t in w.items()
            }
            # decode multiplies one row by each linear layer: store those column-major (torch.mv); the token table
            # stays row-major (the tied head reads it transposed, the embedding's one-hot product is one call)
            w = {
                name: t.vector_layout() if isinstance(t, FixedOperand) and name != "embed" else t
                for name, t in w.items()
            }
        return w


def share_prompt(sess: Session, B: SecureBackend, cfg: ModelConfig, ids: list[int] | None):
    """The client shares its prompt as one-hot rows (T, V) (integer scale: exact); T is public."""
    with audit.label("public: prompt length"):
        T = sess.comm.bcast(len(ids) if sess.rank == CLIENT and ids is not None else None, root=CLIENT)
    if T > cfg.max_position:
        raise SessionError(f"the prompt has {T} tokens but the model's context is {cfg.max_position}; shorten it.")
    onehot = None
    if sess.rank == CLIENT and ids is not None:
        onehot = torch.nn.functional.one_hot(torch.tensor(ids), cfg.vocab_size).float()
    with sess.scope("offline"), sess.scope("prompt"):
        x = onehot if onehot is not None else torch.zeros(T, cfg.vocab_size, device=B.device)
        return B.crypten.cryptensor(x, src=CLIENT, precision=0), T


def private_generate(
    sess: Session,
    cfg: ModelConfig,
    weights: dict | None,
    prompt_ids: list[int] | None,
    max_new_tokens: int,
    policy=None,
    progress=None,
    keep_logits: bool = False,
    fixed_weights: bool | None = None,
    fixed_kv: bool | None = None,
    on_phase=None,
    shared: dict | None = None,
):
    """Run the secure generation. Returns (tokens on the client / None elsewhere, logits if keep_logits, backend).
    ``shared`` (a dict, empty at first): the backend and the shared weights are kept there and reused by the next
    call given the same dict -- the offline phase once per model, not once per prompt (``parties generate
    --prompts``): the weights' shares and their fixed-operand masks ``D = W - B`` are reused as every later decode
    step reuses them (each product draws a fresh mask for its moving operand; ``B`` is never opened).
    ``progress(t)`` is called after token t; ``on_phase(name)`` when the phase ``"offline"`` (weights and prompt
    shared) ends (the prefill ends with token 0: the argmax of its last position).
    ``fixed_weights`` (default: the session's ``cfg.fixed_weights``): fixed-operand triples for the weight matrices;
    ``backend.matmul_paths`` then says which matmul path ran how often. ``fixed_kv`` (default
    ``cfg.fixed_kv``): the same for the cached K/V rows (fixed at the end of the prefill and as each new row
    is written; see :meth:`mpcache.model.transformer.Transformer.decode`)."""
    mpc = getattr(sess, "cfg", None) or MpcConfig.current()
    if shared and "w" in shared:
        B, w = shared["B"], shared["w"]
    else:
        B = SecureBackend(
            sess,
            fixed_weights=mpc.fixed_weights if fixed_weights is None else fixed_weights,
            fixed_kv=mpc.fixed_kv if fixed_kv is None else fixed_kv,
        )
        w = share_weights(sess, B, cfg, weights, fixed=B.fixed_weights)
        if shared is not None:
            shared.update(B=B, w=w)
    x, _ = share_prompt(sess, B, cfg, prompt_ids)
    if on_phase is not None:
        on_phase("offline")
    model = Transformer(cfg, w, B, policy, scope=sess.scope)

    def on_token(t, tok):
        if progress is not None:
            progress(t)

    keep = (lambda lg: B.reveal(lg, dst=None, label="logits (test only)")) if keep_logits else None
    tokens, logits = generate(model, x, max_new_tokens, reveal_to=CLIENT, on_token=on_token, keep_logits=keep)
    return (tokens if sess.rank == CLIENT else None), logits, B


def plaintext_generate(cfg: ModelConfig, weights: dict, prompt_ids: list[int], max_new_tokens: int, policy=None):
    """The same generation in the clear. Returns (tokens, logits, seconds per step): step 0 is the prefill and
    its argmax (token 0), step t > 0 the decode pass that produced token t."""
    model = Transformer(cfg, weights, PlainBackend(), policy)
    stamps = [time.perf_counter()]
    tokens, logits = generate(
        model, prompt_ids, max_new_tokens, on_token=lambda t, tok: stamps.append(time.perf_counter())
    )
    return tokens, logits, [b - a for a, b in itertools.pairwise(stamps)]


def per_token_costs(ledgers: list[dict], max_new_tokens: int, profiles=PROFILES) -> tuple[list[dict], dict]:
    """Merge the parties' ledgers (``CostLedger.to_dict()``) into per-token rows and phase totals."""
    from .mpc.ledger import CostLedger

    parsed = []
    for d in ledgers:
        L = CostLedger(d["rank"], d["world_size"])
        for c in d["counts"]:
            key = (c["scope"], c["kind"])
            for f in ("bytes_sent", "bytes_recv", "rounds", "calls"):
                L.counts[key][f] += c[f]
        L.seconds.update(d["seconds"])
        parsed.append(L)

    def row(prefix: str) -> dict:
        tots = [L.totals(prefix) for L in parsed]
        r = {
            "bytes_sent": [t["bytes_sent"] for t in tots],
            "bytes_recv": [t["bytes_recv"] for t in tots],
            "rounds": max(t["rounds"] for t in tots),
            "seconds": max(L.time_of(prefix) for L in parsed),
            "dealer_bytes": [L.totals(prefix, kind="dealer")["bytes_recv"] for L in parsed],
        }
        for name, prof in profiles.items():
            r[f"modelled_{name}_s"] = modelled_seconds(r["seconds"], r["rounds"], max(r["bytes_sent"]), prof)
        return r

    per_token = [dict(token=t, **row(f"token/{t}")) for t in range(max_new_tokens)]
    phases = {"offline": row("offline"), "prefill": row("prefill")}
    return per_token, phases


def write_json(path, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
