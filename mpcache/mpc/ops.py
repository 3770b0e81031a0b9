"""The protocol index: every secure op on CrypTen arithmetic shares, by concept, each beside its float model.

==================  ============================================================================================
module              protocols
==================  ============================================================================================
``compare``         ``_ltz`` / ``_ltz_lean`` (the sign bit: 64-bit circuit or bit-sliced 32 bits), ``clamp``
``masked``          ``Plan`` (open-once masks: the substrate of the 2PC activations, the norms' branch select, the
                    reciprocal's d0 and tree_max's layers with TFP or the dealer), ``mono_reference``
``tournament``      ``tree_max``, ``argmax_index``, ``topk_onehot``, ``keep_onehot``, ``strata_top1_onehot``,
                    ``strata_select`` (the tournaments; radices from :mod:`mpcache.mpc.schedules`)
``approx``          ``exp_limit``, ``reciprocal_nr``, ``reciprocal_gs``
``softmax``         ``softmax`` (row max or anchored offset), ``stock_softmax`` (CrypTen's: a cost baseline)
``activations``     ``silu``, ``gelu``
``norms``           ``norm_scale`` (RMSNorm / LayerNorm's v / sqrt(sum v^2 + c))
==================  ============================================================================================

Every ``<op>`` works on ``MPCTensor`` shares; ``<op>_reference`` is the same algorithm (same iterations, same
approximation) on float64 torch tensors, so tests measure the fixed-point error alone (secure vs reference) and
the approximation error alone (reference vs the exact torch op). Composite protocols take the session's
:class:`~mpcache.mpc.config.MpcConfig` as ``cfg`` (the backend passes it; called directly, the defaults for the
running session). Costs are what a run (or a dry run, :mod:`mpcache.mpc.dryrun`) counts; each docstring states
rounds and bytes. **Leakage of every protocol: none beyond the shapes of its inputs.**

Adding a protocol: a function in the module of its concept (or a new module), its ``_reference`` beside it, its
name here, a backend method, and a test row.
"""

from __future__ import annotations

from .activations import gelu, gelu_reference, silu, silu_reference
from .approx import (
    exp_fit_coeffs,
    exp_limit,
    exp_limit_reference,
    reciprocal_gs,
    reciprocal_gs_reference,
    reciprocal_nr,
    reciprocal_nr_reference,
)
from .compare import _from_shares, _ltz, _ltz_lean, _minus_publics, _mul_public_int, clamp, clamp_reference
from .config import MpcConfig
from .norms import norm_scale, norm_scale_reference
from .softmax import ANCHOR_MAX_EXCESS, MASK_SHIFT, _anchor_columns, softmax, softmax_reference, stock_softmax
from .tournament import (
    ONES,
    _onehot_radix_level,
    _onehot_radix_levels,
    _radix_layer,
    argmax_index,
    argmax_index_reference,
    keep_onehot,
    strata_layout,
    strata_select,
    strata_top1_onehot,
    strata_top1_onehot_reference,
    topk_onehot,
    tree_max,
    tree_max_reference,
)

__all__ = [
    "ANCHOR_MAX_EXCESS",
    "MASK_SHIFT",
    "ONES",
    "MpcConfig",
    "_anchor_columns",
    "_from_shares",
    "_ltz",
    "_ltz_lean",
    "_minus_publics",
    "_mul_public_int",
    "_onehot_radix_level",
    "_onehot_radix_levels",
    "_radix_layer",
    "argmax_index",
    "argmax_index_reference",
    "clamp",
    "clamp_reference",
    "exp_fit_coeffs",
    "exp_limit",
    "exp_limit_reference",
    "gelu",
    "gelu_reference",
    "keep_onehot",
    "norm_scale",
    "norm_scale_reference",
    "reciprocal_gs",
    "reciprocal_gs_reference",
    "reciprocal_nr",
    "reciprocal_nr_reference",
    "silu",
    "silu_reference",
    "softmax",
    "softmax_reference",
    "stock_softmax",
    "strata_layout",
    "strata_select",
    "strata_top1_onehot",
    "strata_top1_onehot_reference",
    "topk_onehot",
    "tree_max",
    "tree_max_reference",
]
