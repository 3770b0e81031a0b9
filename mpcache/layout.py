"""Public layouts shared by the plaintext and the secure code: which candidate sits in which slot of a stratified
selection. Pure functions of public sizes (torch only: no MPC import), so policies, both backends and the bench
use the same layout the secure tournament (:func:`mpcache.mpc.tournament.strata_select`) is built on."""

from __future__ import annotations

import torch


def strata_layout(m: int, k: int, interleave: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The public strata of ``strata_top1_onehot``: stratum r = candidates [floor(r m / k), floor((r+1) m / k)), or
    with ``interleave`` candidates r, r + k, r + 2k, ... (neighbours in different strata: MPCache's clusters, where
    the important ones come in runs -- a needle spans neighbouring clusters -- that contiguous strata make compete
    for one winner).

    Returns ``idx`` (k, g) long, g = ceil(m / k), the candidate index of each slot, in increasing order along a
    row (short strata repeat their first index in the padding slot) and ``valid`` (k, g) bool. Strata sizes differ
    by at most one.
    """
    if not 0 < k <= m:
        raise ValueError(f"top-k needs 0 < k <= {m}, got k={k}")
    if interleave:
        g = -(-m // k)
        idx = torch.arange(k)[:, None] + k * torch.arange(g)[None, :]
        valid = idx < m
        return torch.where(valid, idx, torch.arange(k)[:, None].expand(k, g)), valid
    starts = [r * m // k for r in range(k + 1)]
    g = max(starts[r + 1] - starts[r] for r in range(k))
    idx = torch.empty(k, g, dtype=torch.long)
    valid = torch.zeros(k, g, dtype=torch.bool)
    for r in range(k):
        size = starts[r + 1] - starts[r]
        idx[r, :size] = torch.arange(starts[r], starts[r + 1])
        idx[r, size:] = starts[r]
        valid[r, :size] = True
    return idx, valid


STRATA_PAD = -(2.0**20)  # the score of a padding slot (below any real score; never wins)
STRATA_PAD_LEAN = -12288.0  # the same with lean comparisons (scores must then satisfy |s| < 12288)
