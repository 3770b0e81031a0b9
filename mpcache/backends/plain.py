"""Plaintext backend: the op set of the model and the cache policies on ordinary torch tensors.

Every method has a secure twin in :mod:`mpcache.backends.secure` with the same signature and semantics, so the
model and every cache policy are written once. Selections are one-hot matrices here too (design §4); gathering
is a matmul with them, so the plaintext run exercises exactly the data flow of the secure one.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PlainBackend:
    """Ops on torch tensors (float32 by default)."""

    secure = False
    early_offset = False  # nothing to overlap in the clear: the plain route is the reference

    def __init__(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.dtype = dtype
        self.device = torch.device(device)

    # ---- data movement -------------------------------------------------------------------------------------
    def tensor(self, x: Tensor) -> Tensor:
        """A public/plain tensor as this backend's tensor type."""
        return x.to(self.device, self.dtype)

    def cat(self, xs: list, dim: int = 0) -> Tensor:
        return torch.cat(xs, dim=dim)

    def stack(self, xs: list, dim: int = 0) -> Tensor:
        return torch.stack(xs, dim=dim)

    def pad_cols(self, x: Tensor, n: int) -> Tensor:
        """``x`` (..., m) padded with zero columns to (..., n)."""
        return torch.nn.functional.pad(x, (0, n - int(x.shape[-1])))

    def embedding(self, table: Tensor, tokens) -> Tensor:
        """Rows of ``table`` (V, D) for ``tokens``: a list/LongTensor of ids (T,) or a one-hot (T, V)."""
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return tokens.to(table.dtype) @ table
        return table[torch.as_tensor(tokens, dtype=torch.long, device=table.device)]

    # ---- linear algebra ------------------------------------------------------------------------------------
    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b

    # ---- reductions ----------------------------------------------------------------------------------------
    def max(self, x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
        return x.max(dim=dim, keepdim=keepdim).values

    def min(self, x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
        return x.min(dim=dim, keepdim=keepdim).values

    def neg(self, x: Tensor) -> Tensor:
        return -x

    def max_min(self, a: Tensor, b: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
        """(max of a, min of b) along dim (one tournament under MPC)."""
        return a.amax(dim=dim), b.amin(dim=dim)

    # ---- nonlinearities ------------------------------------------------------------------------------------
    def softmax(self, x: Tensor, dim: int = -1, mask: Tensor | None = None, anchor=None, offset=None) -> Tensor:
        """Softmax along ``dim``; ``mask`` is a public 0/1 tensor broadcastable to ``x`` (0 = excluded). ``anchor``
        and ``offset`` only change how the secure softmax offsets its exp (the same function): ignored here."""
        if mask is not None:
            x = x.masked_fill(mask == 0, float("-inf"))
        return torch.softmax(x, dim=dim)

    def norm_scale(self, v: Tensor, add: float = 0.0, scale: bool = False, then=None):
        """v / sqrt(sum(v^2, last dim) + add), then ``then`` of it (a linear map); ``scale``: also 2^8 / sqrt(...)
        (the secure op's R)."""
        r = torch.rsqrt((v * v).sum(dim=-1, keepdim=True) + add)
        out = v * r if then is None else then(v * r)
        return (out, r * 2.0**8) if scale else out

    def anchor_max(self, x: Tensor) -> Tensor:
        """The max over the last dim (kept): the anchored softmax's offset over its anchor columns."""
        return x.amax(dim=-1, keepdim=True)

    def parallel(self, *fns) -> list:
        """``[f() for f in fns]``: nothing to overlap in the clear."""
        return [f() for f in fns]

    def silu(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        y = torch.nn.functional.silu(x)
        return y if gate is None else y * gate

    def gelu(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")

    # ---- selection -----------------------------------------------------------------------------------------
    def next_token(self, logits: Tensor, dst: int | None = None) -> tuple[int, Tensor]:
        """Greedy decoding's next token: (the first maximum's index, its one-hot row (1, V) for the next step)."""
        idx = logits.argmax(dim=-1, keepdim=True)
        return int(idx.reshape(-1)[0]), torch.zeros_like(logits).scatter_(-1, idx, 1.0)

    def topk_onehot(self, scores: Tensor, k: int) -> Tensor:
        """Rows ``(..., k, m)``: row r is the one-hot of the r-th largest score (ties: lower index first)."""
        m = scores.shape[-1]
        if not 0 < k <= m:
            raise ValueError(f"top-k needs 0 < k <= {m}, got k={k}")
        idx = _stable_topk(scores, k)
        return torch.nn.functional.one_hot(idx, m).to(scores.dtype)

    def keep_onehot(self, scores: Tensor, k: int) -> Tensor:
        """Rows ``(..., k, m)`` selecting the k largest scores, rows in increasing position order (compaction)."""
        m = scores.shape[-1]
        if not 0 < k <= m:
            raise ValueError(f"top-k needs 0 < k <= {m}, got k={k}")
        idx = _stable_topk(scores, k).sort(dim=-1).values
        return torch.nn.functional.one_hot(idx, m).to(scores.dtype)

    def strata_top1_onehot(self, scores: Tensor, k: int, interleave: bool = False) -> Tensor:
        """Compact rows ``(..., k, g)``: row r is the one-hot of the first maximum of public stratum r (candidates
        ``[floor(r m / k), floor((r+1) m / k))``, see :func:`mpcache.mpc.ops.strata_layout`)."""
        from ..layout import STRATA_PAD, strata_layout

        idx, valid = strata_layout(int(scores.shape[-1]), k, interleave)
        x = scores[..., idx.to(scores.device)].masked_fill(~valid.to(scores.device), STRATA_PAD)
        return torch.zeros_like(x).scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)

    def strata_select(
        self, scores: Tensor, k: int, heads: bool = False, also=(), interleave: bool = False, hidden: bool = False
    ):
        """:meth:`strata_top1_onehot` of the scores (their max over dim -2, the group's heads, if ``heads``), and
        the max along the last dim of each tensor in ``also`` (see :func:`mpcache.mpc.ops.strata_select`;
        ``hidden`` only changes the secure schedule)."""
        top = self.strata_top1_onehot(scores.amax(dim=-2) if heads else scores, k, interleave)
        return top, [t.amax(dim=-1) for t in also]

    def less_than(self, x: Tensor, t) -> Tensor:
        """[x < t] as 0/1 (``t`` public, broadcastable): one comparison per element under MPC."""
        return (x < torch.as_tensor(t, dtype=x.dtype, device=x.device)).to(x.dtype)

    def clamp(self, x: Tensor, lo: float, hi: float) -> Tensor:
        """min(max(x, lo), hi) for public bounds (one comparison layer + one product under MPC)."""
        return x.clamp(lo, hi)

    def reveal(self, x: Tensor, dst: int | None = None, label: str = "value") -> Tensor:
        return x

    def decode_attention(self, heads, q, sel, k, v, scope, anchor=None, logw=None) -> Tensor:
        """Gather the selected rows and attend (:func:`mpcache.model.attention.gather_and_attend`): in the clear
        there is no fixed cache to attend in place over."""
        from ..model import attention

        return attention.gather_and_attend(self, heads, q, sel, k, v, scope, anchor=anchor, logw=logw)

    # ---- what has no meaning in the clear (the secure backend's fixed operands and three-operand products) -------
    def fix_rows(self, xs: list) -> list:
        """Rows stay as they are (the secure backend opens their mask once here)."""
        return list(xs)

    def is_fixed(self, x) -> bool:
        return False

    def gathered_ok(self, g, k, v) -> bool:
        """No three-operand route in the clear: the model gathers scores / scatters probabilities itself."""
        return False

    def gather_scores(self, q, g, k):
        raise NotImplementedError("gather_scores runs only where gathered_ok() is True (the secure backend)")

    def gather_values(self, p_sel, opened, g, v, p_rest=None, ranges=()):
        raise NotImplementedError("gather_values runs only where gathered_ok() is True (the secure backend)")


def _stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties broken towards the lower index (matches the secure rank protocol)."""
    # sort descending by score, ascending by index: stable sort on the negated scores keeps index order on ties
    order = torch.sort(-scores, dim=-1, stable=True).indices
    return order[..., :k]


__all__ = ["PlainBackend"]
