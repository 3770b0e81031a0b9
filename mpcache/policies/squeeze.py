"""SqueezeAttention (Wang et al., arXiv:2404.04793): layer-wise KV budgets from each layer's importance.

A layer's importance is measured at the prefill as the cosine similarity between the hidden states entering and
leaving its self-attention block (x and x + attn(x), averaged over tokens): a high similarity means the layer
changes little, so it is less important. The layers are grouped by that similarity (1-D k-means, 3 groups as in
the paper); the least important group (highest centroid) gets ``p`` times the uniform budget per layer and the
saving is spread evenly over the other layers (same total). Any sequence-wise policy then runs inside each layer
with its own budget (``BudgetPolicy.layer_budgets``; registered here as ``squeeze-h2o``, ``squeeze-streaming``,
``squeeze-snapkv``, ``squeeze-mpcache``).

Two ways to get the similarities:

* **public calibration** (the MPC path): a budget sets the shapes of its layer, so under MPC it must be public.
  :func:`calibrate` runs the model on public text (offline, once per model), and :func:`save_calibration`
  stores the similarities, groups and ``p`` as a small JSON next to the weight cache
  (``$MPCACHE_CACHE_DIR/squeeze/`` or ``~/.cache/mpcache/squeeze/``, file ``<model name>.json``), keyed by the
  model's config digest. ``layer_budgets="calibrated"`` reads it (:func:`calibrated_budgets`); a missing file
  or one made for another model/architecture is refused with the command that makes it:
  ``python -m experiments.squeeze_calibrate --model <spec>``.
* **per prompt** (plaintext only, the paper's own setting): :func:`prompt_budgets` measures the similarities on
  the prompt itself (a plaintext forward pass) — what the calibration gives up is measured in
  experiments/RESULTS.md (fidelity table, ``squeeze-h2o`` vs ``squeeze-h2o-prompt``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .base import register
from .h2o import H2OPolicy
from .mpcache import MPCachePolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy

#: The share of its uniform budget a least-important layer keeps (the paper uses 0.3-0.35 of the uniform share).
SQUEEZE_P = 0.3
#: k-means groups of the layers' similarities (the paper's 3).
SQUEEZE_GROUPS = 3
CALIBRATION_FORMAT = "mpcache-squeeze-v1"
CALIBRATE_COMMAND = "python -m experiments.squeeze_calibrate --model {model}"


# ---- importance -------------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_similarities(cfg, weights: dict, ids: list[int]) -> torch.Tensor:
    """(n_layers,) mean over the prompt's tokens of cos(x, x + attn(x)): the hidden state before and after each
    layer's self-attention block (with its residual), in plaintext. Same blocks as ``Transformer.prefill``."""
    from ..backends.plain import PlainBackend
    from ..model.transformer import Transformer

    model = Transformer(cfg, weights, PlainBackend())
    positions = torch.arange(len(ids))
    x = model._embed(ids, positions)
    sims = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        q, k, v = model._block_in(x, p, positions)
        o, _ = model._causal_attend_plain(q, k, v)
        after = x + model._linear(o, p + "wo", p + "bo")
        sims.append(torch.nn.functional.cosine_similarity(x.double(), after.double(), dim=-1).mean())
        x = model._block_out(x, o, p)
    return torch.stack(sims).float()


def kmeans_1d(values, k: int = SQUEEZE_GROUPS, iters: int = 100) -> list[int]:
    """Deterministic 1-D k-means (Lloyd, centroids started at evenly spaced quantiles): group index per value,
    groups numbered by increasing centroid. Fewer groups when there are fewer distinct values."""
    x = torch.as_tensor(values, dtype=torch.float64)
    k = max(1, min(k, int(torch.unique(x).numel())))
    c = torch.quantile(x, torch.linspace(0, 1, k, dtype=torch.float64))
    for _ in range(iters):
        lab = (x[:, None] - c[None, :]).abs().argmin(dim=1)
        new = torch.stack([x[lab == j].mean() if (lab == j).any() else c[j] for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    order = torch.argsort(c)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return rank[(x[:, None] - c[None, :]).abs().argmin(dim=1)].tolist()


def allocate(similarities, keep: float, p: float = SQUEEZE_P, floor: int = 1, groups: list[int] | None = None) -> tuple:
    """Per-layer budgets from the layers' similarities: the group with the highest similarity keeps ``p`` times the
    uniform budget ``keep`` per layer, the rest goes evenly to the other layers; the total is ``n_layers * keep``.

    ``keep`` a fraction: fractions, capped at 1 (the excess is spread again over the uncapped layers). ``keep`` a
    token count: counts, the low layers at least ``floor`` (the policy's sinks + window), the remainder handed out
    one row at a time from the most important layer (lowest similarity) down. A public function of public values.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(
            f"SqueezeAttention's p (the low group's share of its uniform budget) must be in (0, 1], got {p}"
        )
    sims = [float(s) for s in similarities]
    L = len(sims)
    groups = kmeans_1d(sims) if groups is None else list(groups)
    top = max(groups)
    low = [i for i in range(L) if groups[i] == top and top > 0]
    high = [i for i in range(L) if i not in low]
    if not low or not high:  # one group: nothing to redistribute
        return tuple([keep] * L)
    if isinstance(keep, int):
        total = L * keep
        lo = max(floor, math.floor(p * keep))
        rest = total - lo * len(low)
        if rest < floor * len(high):
            raise ValueError(f"budget {keep} x {L} layers cannot give every layer its minimum of {floor} rows")
        out = [lo] * L
        base, extra = divmod(rest, len(high))
        for j, i in enumerate(sorted(high, key=lambda i: sims[i])):
            out[i] = base + (1 if j < extra else 0)
        return tuple(out)
    out = [p * keep if i in low else 0.0 for i in range(L)]
    free, pool = list(high), L * keep - p * keep * len(low)
    while free:  # water-fill: cap at 1, spread the excess again
        share = pool / len(free)
        capped = [i for i in free if share > 1.0]
        if not capped:
            for i in free:
                out[i] = share
            break
        for i in capped:
            out[i] = 1.0
        pool -= len(capped)
        free = [i for i in free if i not in capped]
    if not free and pool > 1e-12:  # every other layer full: the rest back to the low group
        for i in low:
            out[i] += pool / len(low)
    return tuple(round(b, 9) for b in out)


def prompt_budgets(cfg, weights: dict, ids: list[int], keep: float, p: float = SQUEEZE_P, floor: int = 1) -> tuple:
    """The paper's per-prompt allocation (plaintext only: it reads the prompt's hidden states)."""
    return allocate(layer_similarities(cfg, weights, ids), keep, p, floor)


# ---- public calibration --------------------------------------------------------------------------------------
def calibration_dir() -> Path:
    """Where calibrations live: beside the weight cache (``$MPCACHE_CACHE_DIR`` or ``~/.cache/mpcache``)."""
    env = os.environ.get("MPCACHE_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "mpcache") / "squeeze"


def calibration_path(cfg, directory: str | os.PathLike | None = None) -> Path:
    return (Path(directory) if directory is not None else calibration_dir()) / f"{cfg.name}.json"


def calibrate(cfg, weights: dict, prompts: list[list[int]], p: float = SQUEEZE_P, source: str = "") -> dict:
    """The public calibration of a model: similarities averaged over public ``prompts`` (token ids), their
    groups and ``p``. Run offline by the model owner; nothing about any client's prompt enters it."""
    sims = torch.stack([layer_similarities(cfg, weights, ids) for ids in prompts]).mean(dim=0)
    allocate(sims, 0.5, p)  # validates p
    return {
        "format": CALIBRATION_FORMAT,
        "model": cfg.name,
        "digest": cfg.digest(),
        "arch": cfg.arch,
        "n_layers": cfg.n_layers,
        "similarities": [round(float(s), 6) for s in sims],
        "groups": kmeans_1d(sims),
        "p": p,
        "source": source,
        "prompt_tokens": [len(ids) for ids in prompts],
    }


def save_calibration(cal: dict, cfg, directory: str | os.PathLike | None = None) -> Path:
    path = calibration_path(cfg, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cal, indent=1))
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def load_calibration(cfg, directory: str | os.PathLike | None = None) -> dict:
    """The stored calibration of model ``cfg``, checked against it (ValueError naming the fix otherwise)."""
    path = calibration_path(cfg, directory)
    fix = CALIBRATE_COMMAND.format(model=cfg.name)
    if not path.is_file():
        raise ValueError(
            f"layer_budgets='calibrated': no SqueezeAttention calibration for model {cfg.name!r} "
            f"(config digest {cfg.digest()}) at {path}; make it offline on public text with `{fix}` "
            "(or give explicit per-layer budgets)"
        )
    try:
        cal = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the SqueezeAttention calibration {path} ({e}); remake it with `{fix}`") from None
    want = {"format": CALIBRATION_FORMAT, "digest": cfg.digest(), "arch": cfg.arch, "n_layers": cfg.n_layers}
    bad = {k: (cal.get(k), v) for k, v in want.items() if cal.get(k) != v}
    if bad or len(cal.get("similarities", ())) != cfg.n_layers:
        what = ", ".join(f"{k} {got!r} != {exp!r}" for k, (got, exp) in bad.items()) or "wrong number of layers"
        raise ValueError(
            f"the SqueezeAttention calibration {path} was made for another model or architecture "
            f"({cal.get('model')!r}: {what}); remake it for this model with `{fix}`"
        )
    return cal


def calibrated_budgets(cfg, keep: float, floor: int = 1, directory: str | os.PathLike | None = None) -> tuple:
    """Per-layer budgets for the uniform budget ``keep`` from the model's stored calibration (public)."""
    cal = load_calibration(cfg, directory)
    return allocate(cal["similarities"], keep, cal["p"], floor, cal["groups"])


def parse_layer_budgets(text: str | None):
    """The CLI's ``--layer-budgets``: None, ``"calibrated"``, or comma-separated budgets (ints when every entry is a
    whole number > 1, else fractions), validated by the policy."""
    if text is None or text.strip() == "" or text.strip() == "calibrated":
        return None if text is None or not text.strip() else "calibrated"
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layer-budgets must be 'calibrated' or comma-separated numbers, got {text!r}") from None
    if all(v > 1 and v == int(v) for v in vals):
        return tuple(int(v) for v in vals)
    return tuple(vals)


# ---- registered policies: a sequence-wise policy with calibrated layer budgets ------------------------------------
@register
@dataclass
class SqueezeH2OPolicy(H2OPolicy):
    """H2O inside each layer with SqueezeAttention's calibrated layer budgets (the paper's main pairing)."""

    name: ClassVar[str] = "squeeze-h2o"
    layer_budgets: tuple | str | None = "calibrated"


@register
@dataclass
class SqueezeStreamingPolicy(StreamingPolicy):
    """StreamingLLM inside each layer with SqueezeAttention's calibrated layer budgets."""

    name: ClassVar[str] = "squeeze-streaming"
    layer_budgets: tuple | str | None = "calibrated"


@register
@dataclass
class SqueezeSnapKVPolicy(SnapKVPolicy):
    """SnapKV inside each layer with SqueezeAttention's calibrated layer budgets."""

    name: ClassVar[str] = "squeeze-snapkv"
    layer_budgets: tuple | str | None = "calibrated"


@register
@dataclass
class SqueezeMPCachePolicy(MPCachePolicy):
    """MPCache with SqueezeAttention's calibrated layer budgets (fewer attended/candidate rows in unimportant
    layers)."""

    name: ClassVar[str] = "squeeze-mpcache"
    layer_budgets: tuple | str | None = "calibrated"


__all__ = [
    "SQUEEZE_P",
    "SqueezeH2OPolicy",
    "SqueezeMPCachePolicy",
    "SqueezeSnapKVPolicy",
    "SqueezeStreamingPolicy",
    "allocate",
    "calibrate",
    "calibrated_budgets",
    "calibration_dir",
    "calibration_path",
    "kmeans_1d",
    "layer_similarities",
    "load_calibration",
    "parse_layer_budgets",
    "prompt_budgets",
    "save_calibration",
]
