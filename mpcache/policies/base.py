"""The cache-policy contract: what the model asks of a policy, and the oblivious ``Gather`` it gets back.

Why one file (~550 lines): the contract (contexts, Gather, the registry, budgets and per-layer budgets) is what
every policy module imports; the helpers here are the ones more than one policy uses.

A policy is a small frozen-ish dataclass (kvpress style) with two hooks:

* ``prefill(ctx)`` — once per layer at the end of the prefill (the static, "look-once" stage). Returns a
  ``Gather`` that compacts the prompt's K/V (rows kept, in position order), or ``None`` to keep everything.
* ``select(ctx)`` — every decode step, every layer. Returns a ``Gather`` of the rows this step's query attends
  to, or ``None`` for all rows.

Both hooks are written against the backend op set (``ctx.backend``), so one policy runs in plaintext and on
secret shares. Everything that sets a shape (number of kept rows, clusters, top-k sizes) must be a function of
public values only (lengths, budgets, layer index) — never of tensor contents.

A policy is a value: it never mutates itself, the model or the cache. Per-layer state that must persist across
steps (e.g. MPCache's cluster summaries) lives in ``ctx.state`` (a dict owned by the KV cache, one per layer);
values shared between the layers of one forward call (e.g. a leader layer's selection) live in ``ctx.shared``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import Any, ClassVar

import torch

#: The budget a policy uses when neither ``budget`` nor ``compression_ratio`` is given: 10% of the rows attended.
DEFAULT_BUDGET = 0.1


@dataclass
class Gather:
    """Rows of a per-KV-head cache ``x`` of shape (Hkv, L, D) to keep or attend.

    ``ranges`` are public ``[start, end)`` row ranges taken as they are (sinks, recent window, newest tokens).
    ``onehot`` (Hkv, k, C), if given, selects k of the C blocks of ``block`` consecutive rows covering rows
    ``[start, start + C*block)``; the secret choice is applied as a matmul with the cache viewed as (Hkv, C,
    block*D), so no index is ever revealed. The output keeps position order: ranges before ``start``, then the
    gathered blocks (in the one-hot's row order), then ranges after the block region. Public ranges must not
    overlap the block region.

    ``strata=C`` (a public count) means the compact form of a stratified selection
    (:func:`mpcache.mpc.ops.strata_top1_onehot`): ``onehot`` (Hkv, k, g) picks one of the g blocks of public
    stratum r for row r, out of C candidate blocks; the gather is then a batched (1 x g) @ (g x block*D) product
    per row, whose masked opening is k*g entries instead of the dense form's k*C.
    """

    ranges: tuple[tuple[int, int], ...] = ()
    onehot: Any = None
    start: int = 0
    block: int = 1
    strata: int = 0
    interleave: bool = False  # the strata of mpcache.layout.strata_layout(..., interleave=True)
    weight: float = 1.0  # public count of prompt rows each gathered row stands for (BalanceKV: 2^T); ranges: 1

    def log_weights(self) -> torch.Tensor | None:
        """(n_rows,) public log row weights of the gather's output (in its order), None when every weight is 1.
        Attention adds them to the logits: sum_i w_i exp(q.k_i) v_i / sum_i w_i exp(q.k_i)."""
        if self.weight == 1.0 or self.onehot is None:
            return None
        end = self.start + self.n_candidates * self.block
        before = sum(e - s for s, e in self.ranges if e <= self.start)
        after = sum(e - s for s, e in self.ranges if s >= end)
        mid = self.n_blocks_selected * self.block
        return torch.cat([torch.zeros(before), torch.full((mid,), math.log(self.weight)), torch.zeros(after)])

    @property
    def n_blocks_selected(self) -> int:
        return 0 if self.onehot is None else int(self.onehot.shape[-2])

    @property
    def n_candidates(self) -> int:
        if self.onehot is None:
            return 0
        return self.strata if self.strata else int(self.onehot.shape[-1])

    def keeps_ends(self, first: int, last: int, L: int) -> bool:
        """Whether the gather's output begins with cache rows [0, first) and ends with rows [L - last, L), both
        taken by public range (the output is in position order: ranges before the block region come first)."""
        rs = sorted(self.ranges)
        head = first == 0 or (bool(rs) and rs[0][0] == 0 and rs[0][1] >= first)
        tail = last == 0 or (bool(rs) and rs[-1][1] == L and rs[-1][1] - rs[-1][0] >= last)
        return head and tail

    @property
    def n_rows(self) -> int:
        """Number of rows the gather returns (public)."""
        return sum(e - s for s, e in self.ranges) + self.n_blocks_selected * self.block

    def _slots(self):
        """Compact form: the candidate index of each (row, slot) and, per candidate, the first slot holding it."""
        from ..layout import strata_layout

        idx, valid = strata_layout(self.strata, self.n_blocks_selected, self.interleave)
        # each candidate holds exactly one valid slot: its position in row-major order, by candidate
        pos = valid.reshape(-1).nonzero().squeeze(1)
        return idx, pos[idx.reshape(-1)[pos].argsort()]

    def select_blocks(self, blocks, backend):
        """blocks (Hkv, C, X) -> (Hkv, k, X): the selected blocks, in the one-hot's row order (secret choice)."""
        hkv, _, width = (int(s) for s in blocks.shape)
        k = self.n_blocks_selected
        if self.strata:
            idx, _ = self._slots()
            g = int(idx.shape[1])
            slots = blocks.index_select(1, idx.reshape(-1).to(getattr(blocks, "device", "cpu")))
            return backend.matmul(self.onehot.unsqueeze(-2), slots.reshape(hkv, k, g, width)).reshape(hkv, k, width)
        return backend.matmul(self.onehot, blocks)

    def scatter_blocks(self, y, backend):
        """The transpose of :meth:`select_blocks`: y (Hkv, k, X) -> (Hkv, C, X), each selected row's values put
        back at its (secret) block, zeros elsewhere. Compact form: an outer product per row with its g-slot
        one-hot, then each candidate read from its own slot (padding slots are never selected: exact)."""
        hkv, k, width = (int(s) for s in y.shape)
        if self.strata:
            idx, first = self._slots()
            g = int(idx.shape[1])
            outer = backend.matmul(self.onehot.unsqueeze(-1), y.unsqueeze(-2))  # (Hkv, k, g, X)
            return outer.reshape(hkv, k * g, width).index_select(1, first.to(getattr(y, "device", "cpu")))
        return backend.matmul(self.onehot.transpose(1, 2), y)

    def covers(self, length: int) -> bool:
        """True when the ranges and the block region tile rows [0, length) exactly (in order)."""
        spans = sorted(
            list(self.ranges)
            + ([(self.start, self.start + self.n_candidates * self.block)] if self.onehot is not None else [])
        )
        at = 0
        for s, e in spans:
            if s != at:
                return False
            at = e
        return at == length

    def apply(self, x, backend):
        """x (Hkv, L, D) -> (Hkv, n_rows, D)."""
        hkv, _, d = x.shape
        end = self.start + self.n_candidates * self.block
        before = [x[:, s:e] for s, e in self.ranges if e <= self.start]
        after = [x[:, s:e] for s, e in self.ranges if s >= end]
        assert len(before) + len(after) == len(self.ranges), f"ranges {self.ranges} overlap blocks [{self.start},{end})"
        parts = before
        if self.onehot is not None:
            blocks = x[:, self.start : end].reshape(hkv, self.n_candidates, self.block * d)
            picked = self.select_blocks(blocks, backend)  # (Hkv, k, block*D)
            parts = parts + [picked.reshape(hkv, self.n_blocks_selected * self.block, d)]
        parts = parts + after
        return parts[0] if len(parts) == 1 else backend.cat(parts, dim=1)


@dataclass
class Selection:
    """What a decode step's ``select`` hands the model: the rows to attend (``gather``; None = all) and what the
    policy already computed in its own rounds, so the attention does not pay for it again: ``qk``, the attention
    logits against every cached row (DecodeContext.query_products), and ``offset`` (Hkv, G, 1), the anchored
    softmax's offset (the max of the anchor rows' logits). A policy may return a bare Gather (or None) instead."""

    gather: Gather | None = None
    qk: Any = None
    offset: Any = None
    scores: Any = None  # (the selected rows' scores, the opened one-hot): B.gather_scores, made in the logits' round


def as_selection(result) -> Selection:
    """A policy's ``select`` result (Selection, Gather or None) as a Selection."""
    return result if isinstance(result, Selection) else Selection(result)


@dataclass
class PrefillContext:
    """What a policy sees at the end of the prefill, for one layer (B = 1).

    q: (H, n, hd) queries after RoPE; k, v: (Hkv, n, hd) keys (after RoPE) and values; attn: (H, n, n) the
    prefill's causal attention probabilities (already computed, free to reuse).

    ``attn_fn(start, end) -> (H, end - start, n)``, if given, computes the probabilities of query rows
    [start, end) on demand; the plaintext model passes it instead of ``attn`` (its prefill attention never
    materialises the (H, n, n) probabilities). ``attn`` then stays available and is built on first access, but
    policies should read what they need through :meth:`attn_rows` / :meth:`attn_colsum`, which are cheap in both
    cases and, when ``attn`` is given (the secure model), are plain slices/sums of it.
    """

    backend: Any
    layer: int
    n_layers: int
    q: Any
    k: Any
    v: Any
    attn: Any = field(repr=False, compare=False)  # see the property below
    state: dict
    shared: dict
    attn_fn: Any = field(default=None, repr=False, compare=False)
    colsum: Any = field(default=None, repr=False, compare=False)  # (H, n) column sums, when the model made them

    @property
    def n(self) -> int:
        return int(self.k.shape[1])

    def attn_rows(self, start: int, end: int):
        """(H, end - start, n): the attention probabilities of query rows [start, end) (public bounds)."""
        if self.__dict__.get("_attn") is None and self.attn_fn is not None:
            return self.attn_fn(start, end)
        return self.attn[:, start:end]

    def attn_colsum(self, chunk: int = 256):
        """(H, n): the attention each key receives, summed over all n query rows (H2O's accumulated score)."""
        if self.colsum is not None:
            return self.colsum
        if self.__dict__.get("_attn") is not None or self.attn_fn is None:
            return self.attn.sum(dim=1)
        total = None
        for a in range(0, self.n, chunk):
            part = self.attn_fn(a, min(self.n, a + chunk)).sum(dim=1)
            total = part if total is None else total + part
        return total


def _get_attn(self):
    a = self.__dict__.get("_attn")
    if a is None and self.__dict__.get("attn_fn") is not None:
        a = self.__dict__["_attn"] = self.attn_fn(0, self.n)
    return a


def _set_attn(self, value):
    self.__dict__["_attn"] = value


# a property set after @dataclass, so that the generated __init__ (and dataclasses.replace) store through it
PrefillContext.attn = property(_get_attn, _set_attn, doc="(H, n, n) prefill attention probabilities (lazy).")


@dataclass
class DecodeContext:
    """What a policy sees at one decode step, for one layer.

    q: (H, hd) the new token's query after RoPE; k, v: (Hkv, L, hd) the whole cache after the prefill's
    compaction, including the new token's row (the last one). ``n_prompt`` rows come from the prompt, the rest
    were generated.
    """

    backend: Any
    layer: int
    n_layers: int
    q: Any
    k: Any
    v: Any
    n_prompt: int
    state: dict
    shared: dict
    qk: Any = None  # the attention logits against every cached row, when
    #                                              query_products made them (the policy passes them on: Selection)
    anchor: tuple | None = None  # (a, b): the attention anchors its softmax on cache rows [0, a) and
    #                                              [L - b, L) when the selection keeps them (Transformer.DECODE_ANCHOR)
    ahead: bool = False  # q is the layer's query made AHEAD, from the previous layer's input (CachePolicy.ahead):
    #                      q . k is then no attention logit; ``k`` may lack the step's new row (``rows`` says L)
    rows: int | None = None  # the cache's length at this step (default: k's); a selection made ahead runs before
    #                          the layer writes its new row

    @property
    def L(self) -> int:
        return int(self.k.shape[1]) if self.rows is None else self.rows

    def query_products(self, rep):
        """Each query head's ``q · rep / sqrt(hd)``, (Hkv, G, C) for ``rep`` (Hkv, C, hd). When ``rep`` and the
        cache are fixed operands (MPC, fixed K/V) this is ONE product with ``[rep | K]`` that also yields the
        attention logits against every cached row (kept in ``self.qk`` for the policy's Selection): both
        right operands are fixed, so it opens only q, once, and the attention's q·Kᵀ round is saved."""
        B = self.backend
        hkv, d = int(self.k.shape[0]), int(self.k.shape[2])
        qg = self.q.reshape(hkv, int(self.q.shape[0]) // hkv, d) * (1.0 / math.sqrt(d))
        c = int(rep.shape[1])
        if B.is_fixed(rep) and B.is_fixed(self.k) and not self.ahead:
            both = B.matmul(qg, B.cat([rep, self.k], dim=1).transpose(1, 2))  # (Hkv, G, C + L)
            self.qk = both[..., c:]
            return both[..., :c]
        return B.matmul(qg, rep.transpose(1, 2))


@dataclass
class CachePolicy:
    """Base class: keep and attend everything (the full cache)."""

    name: ClassVar[str] = "full"

    def __str__(self) -> str:
        """The registered name and the settings that shape the run, e.g. ``mpcache budget=0.1 cluster_size=8``:
        the resolved budget always (when the policy has one), every other field only where it is not the default."""
        import dataclasses

        parts = [self.name]
        keep = getattr(self, "keep", None)
        if keep is not None:
            parts.append(f"budget={keep:g}" if isinstance(keep, float) else f"budget={keep} tokens")
        if dataclasses.is_dataclass(self):
            for f in dataclasses.fields(self):
                if f.name in ("budget", "compression_ratio") or not f.repr:
                    continue
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                v = getattr(self, f.name)
                if default is dataclasses.MISSING or v != default:
                    parts.append(f"{f.name}={v}")
        return " ".join(parts)

    def prefill(self, ctx: PrefillContext) -> Gather | None:
        return None

    def select(self, ctx: DecodeContext) -> Selection | Gather | None:
        return None

    def ahead(self, layer: int) -> bool:
        """Whether ``layer``'s decode selection is made AHEAD: from the query the layer would have had at the
        previous layer's input (the residual stream before layer - 1's block; InfiniGen's speculation, Lee et al.,
        OSDI 2024), so that under MPC it runs beside the previous layer's attention and MLP instead of before its
        own attention (``Transformer.decode``). A public function of the layer index."""
        return False

    def for_layer(self, layer: int) -> CachePolicy:
        """The policy that runs at ``layer`` (itself, unless per-layer budgets are set: see BudgetPolicy)."""
        return self

    def bind(self, cfg) -> CachePolicy:
        """This policy resolved against the model ``cfg`` (public): e.g. ``layer_budgets="calibrated"`` read from
        the model's stored calibration and checked. Called before anything runs (the Transformer, the parties'
        startup), so a bad setting is refused with nothing half-done."""
        return self

    def check_prompt(self, n_prompt: int) -> None:
        """Refuse (ValueError) a setting that cannot run on an ``n_prompt``-token prompt (a public length)."""

    def attended_by_layer(self, n_prompt: int, step: int, n_layers: int) -> list[int]:
        """``attended_tokens`` of each layer's policy (differs per layer with per-layer budgets)."""
        return [self.for_layer(i).attended_tokens(n_prompt, step) for i in range(n_layers)]

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        """Rows (per KV head) the query of decode step ``step`` attends to, for a prompt of ``n_prompt`` tokens.

        Step 0 is the first ``Transformer.decode`` call; the full cache then has ``n_prompt + step + 1`` rows.
        A public function of the lengths and the policy's settings only (the same in every layer).
        """
        return n_prompt + step + 1

    def attended_fraction(self, n_prompt: int, step: int = 0) -> float:
        """``attended_tokens`` over the rows the full cache would attend at that step (1.0 = full cache)."""
        return self.attended_tokens(n_prompt, step) / (n_prompt + step + 1)


# ---- helpers shared by the policies ---------------------------------------------------------------------------
def resolve_budget(budget: float | None, compression_ratio: float | None) -> float | int:
    """The kept/attended amount: a fraction in (0, 1] (float) or a token count >= 1 (int).

    ``compression_ratio`` is kvpress's convention (fraction removed, in [0, 1)); ``budget`` is the fraction kept
    (a float in (0, 1]) or a token count (an int >= 1). Give at most one; neither means ``DEFAULT_BUDGET``.
    Note ``budget=1`` (int) is one token, ``budget=1.0`` (float) the whole cache.
    """
    if budget is not None and compression_ratio is not None:
        raise ValueError(f"give either budget ({budget!r}) or compression_ratio ({compression_ratio!r}), not both")
    if compression_ratio is not None:
        if (
            isinstance(compression_ratio, bool)
            or not isinstance(compression_ratio, Real)
            or not 0.0 <= compression_ratio < 1.0
        ):
            raise ValueError(
                f"compression_ratio is the fraction removed, a number in [0, 1); got {compression_ratio!r}"
                " (for a token count use budget=<int>)"
            )
        return 1.0 - float(compression_ratio)
    if budget is None:
        return DEFAULT_BUDGET
    bad = f"budget must be a fraction in (0, 1] or an int token count >= 1, got {budget!r}"
    if isinstance(budget, bool):  # a bool is an Integral: refuse it before the count branch
        raise ValueError(bad)  # noqa: TRY004 (bad user input is a ValueError throughout the package)
    if isinstance(budget, Integral):
        if budget < 1:
            raise ValueError(f"a token-count budget must be >= 1, got {budget!r}")
        return int(budget)
    if isinstance(budget, Real) and 0.0 < budget <= 1.0:
        return float(budget)
    hint = " (for a token count pass an int, e.g. budget=2048)" if isinstance(budget, Real) and budget > 1 else ""
    raise ValueError(bad + hint)


def kept_count(n: int, keep: float) -> int:
    """Rows kept out of ``n`` for a resolved budget: round-half-up of ``keep * n`` for a fraction, ``keep`` for a
    count, clamped to [min(1, n), n]. Deterministic and public."""
    k = keep if isinstance(keep, int) else math.floor(keep * n + 0.5)
    return max(min(1, n), min(n, k))


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def sum_groups(x, n_kv_heads: int):
    """(H, ...) -> (Hkv, ...): sum over the query heads of each KV group (head h belongs to group h // G)."""
    h = int(x.shape[0])
    return x.reshape(n_kv_heads, h // n_kv_heads, *x.shape[1:]).sum(dim=1)


def nonempty(*ranges: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The public ranges that hold at least one row."""
    return tuple((s, e) for s, e in ranges if e > s)


#: How a policy picks its k of m candidates (the ``topk`` field of every budget policy):
#: "rank" — the exact top-k (pairwise rank: m^2 comparisons, constant rounds);
#: "strata" — one winner per public stratum of ~m/k consecutive candidates (a tournament: m - k comparisons,
#: log2(m/k) comparison layers; the budget is spread evenly over positions);
#: "auto" — "rank" while m <= AUTO_RANK_MAX, else "strata" (a public rule of the public m).
TOPK_METHODS = ("rank", "strata", "auto")
AUTO_RANK_MAX = (
    32  # the rank's m^2 comparisons exceed a 512-row softmax's beyond ~32 (bench at 512: 127 -> 2.4x the full cache)
)


def select_k(backend, scores, k: int, method: str, ordered: bool = False):
    """Pick k of the m candidates of ``scores`` (..., m) by ``method`` (see ``TOPK_METHODS``).

    Returns ``(onehot, strata)``: with "rank" a dense one-hot (..., k, m) and strata = 0 — rows by decreasing
    score, or in position order if ``ordered`` (compaction); with "strata" the compact one-hot (..., k, g) and
    strata = m (rows in position order), for :class:`Gather`'s ``strata`` form.
    """
    m = int(scores.shape[-1])
    if method == "auto":
        method = "rank" if m <= AUTO_RANK_MAX else "strata"
    if method == "strata":
        return backend.strata_top1_onehot(scores, k), m
    if method != "rank":
        raise ValueError(f"topk must be one of {TOPK_METHODS}, got {method!r}")
    return (backend.keep_onehot(scores, k) if ordered else backend.topk_onehot(scores, k)), 0


#: Integer settings that every layer's kept rows must cover (sinks, the recent window): a policy's floor for a
#: per-layer budget is the sum of those of its fields (``BudgetPolicy.min_layer_budget``).
FLOOR_FIELDS = ("sinks", "window", "recent")


@dataclass
class BudgetPolicy(CachePolicy):
    """Base of the policies with a public budget (see :func:`resolve_budget`).

    Which rows the budget counts is each policy's choice and is documented there: static policies keep
    ``kept(n)`` prompt rows at the prefill; dynamic ones attend ``kept(L)`` of the L rows at each step.
    ``topk`` says how a policy that ranks candidates picks them (``TOPK_METHODS``; exact "rank" by default).

    ``layer_budgets`` (SqueezeAttention's layer-wise budgets, arXiv:2404.04793): one budget per layer, in the
    ``budget`` convention (fractions kept when the budget is a fraction, token counts when it is a count), summing
    to ``n_layers * budget`` — the same total as the uniform budget, redistributed. Or ``"calibrated"``: the
    SqueezeAttention allocation stored for the model (:mod:`mpcache.policies.squeeze`; made offline on public text
    by ``python -m experiments.squeeze_calibrate``), resolved by :meth:`bind`. Every entry is public (it sets
    the shapes of its layer). Layer ``i`` runs this policy with ``budget=layer_budgets[i]`` (:meth:`for_layer`).
    """

    budget: float | int | None = None
    compression_ratio: float | None = None
    topk: str = "rank"
    layer_budgets: tuple | str | None = None

    def __post_init__(self) -> None:
        keep = resolve_budget(self.budget, self.compression_ratio)
        if self.topk not in TOPK_METHODS:
            raise ValueError(f"{type(self).__name__}.topk must be one of {TOPK_METHODS}, got {self.topk!r}")
        lb = self.layer_budgets
        if lb is None or lb == "calibrated":
            return
        if isinstance(lb, str) or not hasattr(lb, "__len__") or len(lb) == 0:
            raise ValueError(
                f"{type(self).__name__}.layer_budgets must be a non-empty tuple of per-layer budgets or "
                f"'calibrated', got {lb!r}"
            )
        lb = tuple(int(b) if isinstance(keep, int) and isinstance(b, Integral) else b for b in lb)
        for i, b in enumerate(lb):
            try:
                got = resolve_budget(b, None)
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}.layer_budgets[{i}]: {e}") from None
            if isinstance(got, int) != isinstance(keep, int):
                kind = "token counts (ints)" if isinstance(keep, int) else "fractions (floats)"
                raise ValueError(
                    f"{type(self).__name__}.layer_budgets[{i}] = {b!r}: per-layer budgets must be {kind}"
                    f", like budget={keep!r}"
                )
        total, want = sum(lb), len(lb) * keep
        if abs(total - want) > (0 if isinstance(keep, int) else 1e-6 * len(lb)):
            raise ValueError(
                f"{type(self).__name__}.layer_budgets sum to {total:g} but {len(lb)} layers x budget "
                f"{keep!r} = {want:g}: per-layer budgets redistribute the uniform total, so they must "
                "sum to it (or use layer_budgets='calibrated')"
            )
        floor = self.min_layer_budget()
        if isinstance(keep, int):
            low = [(i, b) for i, b in enumerate(lb) if b < floor]
            if low:
                raise ValueError(
                    f"{type(self).__name__}.layer_budgets[{low[0][0]}] = {low[0][1]} is below the policy's "
                    f"minimum of {floor} rows per layer ({self._floor_text()}); raise it or lower those "
                    "settings"
                )
        self.layer_budgets = lb

    def min_layer_budget(self) -> int:
        """The fewest rows a layer may keep: the sum of the policy's sink/window settings (``FLOOR_FIELDS``)."""
        return max(1, sum(int(getattr(self, f.name)) for f in fields(self) if f.name in FLOOR_FIELDS))

    def _floor_text(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name in FLOOR_FIELDS]
        return " + ".join(parts) or "at least one row"

    @property
    def keep(self) -> float | int:
        """The resolved budget: a fraction (float) or a token count (int)."""
        return resolve_budget(self.budget, self.compression_ratio)

    def kept(self, n: int) -> int:
        return kept_count(n, self.keep)

    def for_layer(self, layer: int) -> CachePolicy:
        lb = self.layer_budgets
        if lb is None:
            return self
        if isinstance(lb, str):
            raise ValueError(  # noqa: TRY004 (a usage error, not a wrong type: the string is a valid setting)
                f"{type(self).__name__}.layer_budgets={lb!r} is not resolved: call policy.bind(cfg) "
                "with the model's config first (the Transformer does)"
            )
        if not 0 <= layer < len(lb):
            raise ValueError(f"{type(self).__name__}.layer_budgets has {len(lb)} entries, no budget for layer {layer}")
        return dataclasses.replace(self, budget=lb[layer], compression_ratio=None, layer_budgets=None)

    def bind(self, cfg) -> CachePolicy:
        pol = self
        if self.layer_budgets == "calibrated":
            from .squeeze import calibrated_budgets

            pol = dataclasses.replace(self, layer_budgets=calibrated_budgets(cfg, self.keep, self.min_layer_budget()))
        lb = pol.layer_budgets
        if lb is None:
            return pol
        if len(lb) != cfg.n_layers:
            raise ValueError(
                f"{type(self).__name__}.layer_budgets has {len(lb)} entries but model "
                f"{cfg.name!r} has {cfg.n_layers} layers"
            )
        leader = getattr(pol, "leader", None)  # MPCache's layer sharing: a follower reuses its leader's picks
        if leader is not None and getattr(pol, "share_layers", False):
            bad = [i for i in range(cfg.n_layers) if lb[leader(i)] != lb[i]]
            if bad:
                raise ValueError(
                    f"layer {bad[0]} shares the selection of layer {leader(bad[0])} (share_layers) but "
                    f"their layer budgets differ ({lb[bad[0]]} vs {lb[leader(bad[0])]})"
                )
        return pol

    def check_prompt(self, n_prompt: int) -> None:
        if self.layer_budgets is None or isinstance(self.keep, int):
            return
        floor = self.min_layer_budget()
        for i in range(len(self.layer_budgets)):
            got = self.for_layer(i).kept(n_prompt)
            if got < min(floor, n_prompt):
                raise ValueError(
                    f"{type(self).__name__}.layer_budgets[{i}] = {self.layer_budgets[i]:g} keeps {got} "
                    f"of {n_prompt} prompt rows, below the policy's minimum of {floor} per layer "
                    f"({self._floor_text()}); raise the budget or lower those settings"
                )


REGISTRY: dict[str, type[CachePolicy]] = {}


def register(cls: type[CachePolicy]) -> type[CachePolicy]:
    REGISTRY[cls.name] = cls
    return cls


register(CachePolicy)


def make_policy(name: str, **kwargs) -> CachePolicy:
    if name not in REGISTRY:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = [
    "DEFAULT_BUDGET",
    "REGISTRY",
    "BudgetPolicy",
    "CachePolicy",
    "DecodeContext",
    "Gather",
    "PrefillContext",
    "Selection",
    "as_selection",
    "kept_count",
    "make_policy",
    "nonempty",
    "register",
    "resolve_budget",
    "round_half_up",
    "select_k",
    "sum_groups",
]
