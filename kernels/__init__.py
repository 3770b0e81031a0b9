"""Triton kernels for MPCache's plaintext hot spots, each beside its torch reference.

Importing this package defines the kernels, so set ``TRITON_INTERPRET=1`` *before* the first import to run them
on the CPU interpreter. Nothing here imports ``mpcache`` or CrypTen.
"""

from kernels._triton import HAVE_TRITON, INTERPRET
from kernels.cluster_scores import cluster_scores, cluster_scores_exact_reference, cluster_scores_reference
from kernels.cluster_summary import cluster_summary, cluster_summary_reference, parent_summary
from kernels.sparse_decode_attention import (
    dense_decode_attention_reference,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)

__all__ = [
    "HAVE_TRITON",
    "INTERPRET",
    "cluster_scores",
    "cluster_scores_exact_reference",
    "cluster_scores_reference",
    "cluster_summary",
    "cluster_summary_reference",
    "dense_decode_attention_reference",
    "parent_summary",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
]
