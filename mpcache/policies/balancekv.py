"""BalanceKV (Han et al., arXiv:2502.07861): KV-cache compression by a self-balancing (discrepancy) walk.

SoftmaxBalance halves a batch of (key, value) rows: it signs the rows so that the signed sum of their feature
vectors stays small (Alweiss-Liu-Sawhney's self-balancing walk: a sign is +1 with probability
(1 - <s, u>/c) / 2, s the running signed sum), keeps one half and doubles its weight, so the kept half with
weight 2 estimates both the softmax numerator sum_i exp(q.k_i) v_i and the normaliser sum_i exp(q.k_i) of the
whole batch. Repeated T times it compresses by 2^T; the compressed rows carry weight 2^T into attention
(``Gather.weight``: log 2^T added to their logits).

This implementation (one algorithm for plaintext and shares):

* **static, at the prefill**: the first ``sinks`` rows and the last ``window`` rows (plus the < ``block`` rows
  left over between them) are kept as they are (weight 1); the rows between are cut into public blocks of
  ``block`` rows, each halved T = log2(rate) times by its own walk. Every walk is independent, so all heads and
  blocks of a layer run in lockstep (one batched op per walk step).
* **exactly half per halving**: the walk signs *pairs* (rows 2i and 2i+1 of the current rows): it balances the
  pair differences u_2i - u_2i+1 and keeps row 2i when the sign is +1, else row 2i+1 (the kernel-thinning form
  of the walk). The output size is then public — exactly half — and the kept row of output r after T halvings
  is one of the original rows [r 2^T, (r+1) 2^T): a compact (strata) one-hot with g = 2^T, applied obliviously.
* **the kernel**: the walk runs in the feature space of the kernel
  ``kappa(a, b) = (1 - beta/n + (beta/n) cos(k_a, k_b))^n * (1 + cos(v_a, v_b))`` with n = 2^``kernel_iters``:
  the limit form of exp(beta (cos - 1)) (the softmax kernel on unit keys) times a value kernel. It is a
  polynomial of cosines with nonnegative coefficients (beta <= n), hence a valid (PSD) kernel, bounded in [0, 2],
  so the walk's threshold is scale-free and the secure computation stays in fixed-point range. NOTE: the paper's
  kernel uses the raw keys (exp(k_a.k_b / sqrt d)); raw keys of real models overflow a 16-bit fixed-point exp, so
  both backends use the normalised one (documented deviation, the same function everywhere). ``kernel="softmax"``
  (plaintext only, refused on shares) runs the paper's kernel instead: exp(k_a.k_b / sqrt d) * (1 + v_a.v_b), keys
  as they are and values scaled by their block's largest norm, the exponent shifted by the block's largest
  |k|^2 / sqrt d (so every entry is <= 2; a per-block constant that only rescales the walk's threshold).
* **public coins**: the walk's uniforms come from a generator seeded by (``seed``, layer, level): independent of
  the data, public, identical in plaintext and under MPC (the signs stay secret: they compare a secret running
  sum with a public threshold).

Under MPC (2PC, lean comparisons): per layer, key/value normalisation (``norm_scale``, one call) once; per halving
level t one Gram product (1 round), ``kernel_iters`` squarings and one product, then one walk step per pair of a
block (P_t = block / 2^(t+1) steps): a comparison (6 rounds in 2PC) and, but for the last, one product (1 round) updating
the running inner products; then one product muxing the kept rows and composing the one-hot. Rounds per layer:
rsqrt + sum_t [P_t * 8 - 1 + kernel_iters + 3] + the final gather, independent of the prompt length (blocks and
heads are batched). Measured (SmolLM2 shape, block 32, rate 8, 2PC TFP, ``parties bench``): 261 rounds per layer
at 1k and at 2k (196 of them the 28 steps' comparisons, 17 the normalisation); bytes grow linearly with the
number of blocks: 93 MB per layer at 1k, 189 MB at 2k, two thirds of it the normalisation's rsqrt.
Leaks: shapes only (the kept count is exactly half per halving, a public function of the prompt length and the
rate; which row of each pair is kept stays a secret one-hot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import BudgetPolicy, Gather, PrefillContext, nonempty, register

KERNELS = ("bounded", "softmax")


def _power_of_two(x: int) -> bool:
    return isinstance(x, int) and x >= 1 and x & (x - 1) == 0


@register
@dataclass
class BalanceKVPolicy(BudgetPolicy):
    """BalanceKV's SoftmaxBalance as a static stage (see the module docstring).

    ``rate`` (a power of two >= 2, dividing ``block``) is the compression of the balanced region; None derives it
    from the budget: the power of two nearest (in log scale) to 1/budget for a fraction, to m / (budget - sinks -
    window) for a token count, m the rows in whole blocks, capped at ``block``. Budget: prompt rows kept =
    sinks + window + leftover + (rows in whole blocks) / rate.
    """

    name: ClassVar[str] = "balancekv"
    rate: int | None = None
    sinks: int = 4
    window: int = 16
    block: int = 32
    threshold: float = 1.0  # the walk's c: |<s, u>| >= c makes the sign deterministic
    beta: float = 4.0  # the kernel's inverse temperature on cosines
    kernel_iters: int = 4  # n = 2^kernel_iters in the kernel's limit form (beta <= n keeps it PSD)
    seed: int = 0  # the public coins
    kernel: str = "bounded"  # "bounded" (both backends) or "softmax" (the paper's kernel, plaintext only)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"{name}.sinks and .window must be >= 0, got {self.sinks}, {self.window}")
        if not _power_of_two(self.block) or self.block < 2:
            raise ValueError(f"{name}.block must be a power of two >= 2 (rows per balancing walk), got {self.block}")
        if self.rate is not None and (not _power_of_two(self.rate) or self.rate < 2 or self.block % self.rate):
            raise ValueError(
                f"{name}.rate must be a power of two >= 2 that divides block={self.block} (each block is "
                f"halved log2(rate) times), got {self.rate!r}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"{name}.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.threshold <= 0 or self.beta <= 0:
            raise ValueError(f"{name}.threshold and .beta must be > 0, got {self.threshold}, {self.beta}")
        if not 1 <= self.kernel_iters <= 10 or self.beta > 2**self.kernel_iters:
            raise ValueError(
                f"{name}: need 1 <= kernel_iters <= 10 and beta <= 2^kernel_iters (a PSD kernel), got "
                f"kernel_iters={self.kernel_iters}, beta={self.beta}"
            )

    # ---- public sizes ------------------------------------------------------------------------------------------
    def plan(self, n: int) -> tuple[int, int, int] | None:
        """(s, e, rate): rows [s, e) (whole blocks) are halved log2(rate) times; None = keep the prompt as it is."""
        s = min(self.sinks, n)
        m = max(0, n - s - min(self.window, n - s)) // self.block * self.block
        if m == 0:
            return None
        rate = self.rate
        if rate is None:
            keep = self.keep
            if isinstance(keep, int):
                target = keep - (n - m)  # rows left for the balanced region
                ratio = m / target if target > 0 else float(self.block)
            else:
                ratio = 1.0 / keep
            rate = 2 ** min(int(math.log2(self.block)), max(0, round(math.log2(max(ratio, 1.0)))))
        return None if rate < 2 else (s, s + m, rate)

    def n_kept(self, n: int) -> int:
        p = self.plan(n)
        return n if p is None else n - (p[1] - p[0]) + (p[1] - p[0]) // p[2]

    def attended_tokens(self, n_prompt: int, step: int = 0) -> int:
        return self.n_kept(n_prompt) + step + 1

    def coins(self, layer: int, level: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The walk's public uniforms in [0, 1) for one level of one layer."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 1009 + level)
        return torch.rand(shape, generator=g, dtype=torch.float64).float()

    # ---- the static stage -------------------------------------------------------------------------------------
    def prefill(self, ctx: PrefillContext) -> Gather | None:
        n = ctx.n
        p = self.plan(n)
        if p is None:
            return None
        s, e, rate = p
        hkv, _, d = (int(x) for x in ctx.k.shape)
        nb = (e - s) // self.block
        oh = balance_walk(
            ctx.backend,
            ctx.k[:, s:e].reshape(hkv * nb, self.block, d),
            ctx.v[:, s:e].reshape(hkv * nb, self.block, d),
            int(math.log2(rate)),
            self.threshold,
            self.beta,
            self.kernel_iters,
            lambda t, shape: self.coins(ctx.layer, t, shape),
            self.kernel,
        )
        oh = oh.reshape(hkv, (e - s) // rate, rate)
        return Gather(ranges=nonempty((0, s), (e, n)), onehot=oh, start=s, block=1, strata=e - s, weight=float(rate))


def kernel_gram(backend, u, d: int, beta: float, iters: int, kernel: str = "bounded"):
    """u (X, b, 2d): unit keys | unit values -> (X, b, b) kernel matrix (see the module docstring). Rounds: one
    product for both cosine matrices, ``iters`` squarings, one product. ``kernel="softmax"`` (plaintext): u holds
    k / d^(1/4) | v / (the block's max |v|), and the matrix is exp(k_a.k_b / sqrt d - max_a |k_a|^2 / sqrt d) *
    (1 + v_a.v_b)."""
    X = int(u.shape[0])
    kv = backend.cat([u[..., :d], u[..., d:]], dim=0)  # (2X, b, d)
    c = backend.matmul(kv, kv.transpose(1, 2))
    ck, cv = c[:X], c[X:]
    if kernel == "softmax":
        shift = ck.diagonal(dim1=1, dim2=2).amax(dim=-1)[:, None, None]  # >= every k_a.k_b (Cauchy-Schwarz)
        return torch.exp(ck - shift) * (cv + 1.0)
    n = 2**iters
    y = ck * (beta / n) + (1.0 - beta / n)
    for _ in range(iters):
        y = y * y
    return y * (cv + 1.0)


def balance_walk(backend, k, v, levels: int, threshold: float, beta: float, iters: int, coins, kernel: str = "bounded"):
    """The paired self-balancing walk, ``levels`` halvings of X independent blocks in lockstep.

    k, v (X, b, d) -> one-hot (X, b / 2^levels, 2^levels): for output row r, which of the original rows
    [r 2^levels, (r+1) 2^levels) of its block it keeps. ``coins(level, shape)`` gives public uniforms. Written
    against the backend op set: the same steps on torch tensors and on shares (signs and the one-hot secret).
    """
    B = backend
    X, b, d = (int(x) for x in k.shape)
    if kernel == "softmax":
        if B.secure:
            raise ValueError(
                "BalanceKVPolicy(kernel='softmax') runs in plaintext only (the exp of raw key products "
                "overflows fixed point); use kernel='bounded' under MPC"
            )
        u = torch.cat([k * d**-0.25, v / v.norm(dim=-1).amax(dim=1)[:, None, None].clamp_min(1e-30)], dim=-1)
    else:
        kv = B.norm_scale(B.cat([k, v], dim=0))  # keys and values in one normalisation
        u = B.cat([kv[:X], kv[X:]], dim=-1)  # (X, b, 2d): unit keys | unit values
    oh = None  # level 0: each row is itself
    for t in range(levels):
        rows = b >> t
        P = rows // 2
        G = kernel_gram(B, u, d, beta, iters, kernel)  # (X, rows, rows)
        # Gram of the pair differences u_2i - u_2i+1: (X, P, P), local
        D = G[:, 0::2, 0::2] - G[:, 0::2, 1::2] - G[:, 1::2, 0::2] + G[:, 1::2, 1::2]
        thr = (1.0 - 2.0 * coins(t, (X, P))) * threshold  # sign +1 w.p. (1 - x/c) / 2
        x = None  # running <s, delta_j> for every j
        bits = []
        for i in range(P):
            xi = x[:, i] if x is not None else D[:, i, i] * 0.0
            bit = B.less_than(xi, thr[:, i])  # 1: keep row 2i (sign +1)
            bits.append(bit)
            if i + 1 < P:
                upd = (bit * 2.0 - 1.0).unsqueeze(-1).expand(X, P) * D[:, i, :]
                x = upd if x is None else x + upd
        bit = B.stack(bits, dim=1).unsqueeze(-1)  # (X, P, 1)
        even, odd = u[:, 0::2], u[:, 1::2]
        if oh is None:
            u = odd + bit.expand(X, P, 2 * d) * (even - odd)
            oh = B.cat([bit, 1.0 - bit], dim=-1)  # (X, P, 2)
        else:
            w = int(oh.shape[-1])
            both = bit.expand(X, P, 2 * d + 2 * w) * B.cat([even - odd, oh[:, 0::2], oh[:, 1::2]], dim=-1)  # 1 round
            u = odd + both[..., : 2 * d]
            oh = B.cat([both[..., 2 * d : 2 * d + w], oh[:, 1::2] - both[..., 2 * d + w :]], dim=-1)
    return oh


__all__ = ["BalanceKVPolicy", "balance_walk", "kernel_gram"]
