"""The exact float64-limb ring product (mpcache.mpc.fixed_operand.limb_matmul / ring_matmul): bit-identical to the
wrapping int64 product on random ring elements over the full 64-bit range, the edge values, every shape class the
model uses, and contraction lengths up to 4096 (past one exact float64 chunk)."""

import pytest
import torch

from mpcache.mpc import fixed_operand as F

EDGES = torch.tensor([0, -1, 1, 2**63 - 1, -(2**63), 2**62, -(2**62), 2**21 - 1, -(2**21), 2**43 - 1], dtype=torch.long)


def _rand(g, *shape):
    return torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.long)


def _edges(g, *shape):
    return EDGES[torch.randint(0, len(EDGES), shape, generator=g)]


SHAPES = [
    ((1, 576), (576, 192)),  # vector x matrix (a decode-step linear layer)
    ((576,), (576, 64)),  # 1-D left operand
    ((40, 64), (64,)),  # 1-D right operand
    ((33, 576), (576, 1536)),  # matrix x matrix
    ((17, 1536), (1536, 40)),  # K = 1536
    ((9, 2048), (2048, 7)),  # K = LIMB_MAX_K exactly
    ((5, 4096), (4096, 6)),  # K = 4096: two exact chunks
    ((3, 4097), (4097, 3)),  # an uneven tail chunk
    ((3, 12, 64), (3, 64, 50)),  # batched (GQA: KV heads x query rows x head dim) @ K^T
    ((3, 12, 50), (3, 50, 64)),  # batched p @ V
    ((2, 3, 7, 16), (16, 5)),  # broadcast: batched left, 2-D right
]


@pytest.mark.parametrize("sa,sb", SHAPES)
def test_limbs_equal_int64_product_on_random_ring_elements(sa, sb):
    g = torch.Generator().manual_seed(hash((sa, sb)) % 2**31)
    for make in (_rand, _edges):
        a, b = make(g, *sa), make(g, *sb)
        ref = torch.matmul(a, b)
        if a.dim() >= 2 and b.dim() >= 2:
            out = F.limb_matmul(a, b)
            assert out.dtype == torch.long and out.shape == ref.shape and torch.equal(out, ref), (sa, sb, make)
        for route in ("limbs", "auto", "int64"):
            old, F.RING_MATMUL = F.RING_MATMUL, route
            try:
                assert torch.equal(F.ring_matmul(a, b), ref), (sa, sb, route)
                assert torch.equal(F.ring_matmul(a, b), ref), (sa, sb, route)  # auto: measured, then kept
            finally:
                F.RING_MATMUL = old


def test_extreme_operands_and_layouts():
    """All -2^63 (every limb product at its bound, K = 2048 and 4096), all -1 and 2^63 - 1, wrap-around in every
    partial sum; a transposed (column-major) right operand as the weights are stored; results contiguous."""
    for k in (2048, 4096):
        for v in (-(2**63), -1, 2**63 - 1, -(2**21), 2**21 - 1):
            a = torch.full((3, k), v, dtype=torch.long)
            b = torch.full((k, 2), v, dtype=torch.long)
            assert torch.equal(F.limb_matmul(a, b), torch.matmul(a, b)), (k, v)
    g = torch.Generator().manual_seed(1)
    w = _rand(g, 192, 576)  # (N, K) contiguous: b = w.t() is column-major
    a = _rand(g, 30, 576)
    out = F.limb_matmul(a, w.t())
    assert torch.equal(out, torch.matmul(a, w.t())) and out.is_contiguous()


def test_limb_split_is_exact_and_in_range():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([_rand(g, 100_000), EDGES, EDGES + 2**21, EDGES - 2**42])
    l0, l1, l2 = F._limbs(x)
    assert l0.abs().max() <= 2**21 and l1.abs().max() <= 2**20 and l2.abs().max() <= 2**20
    rec = l0.long() + (l1.long() << F._LIMB_SHIFTS[1]) + (l2.long() << F._LIMB_SHIFTS[2])
    assert torch.equal(rec, x)


def test_memory_bounded_chunks_along_n(monkeypatch):
    monkeypatch.setattr(F, "_LIMB_CHUNK_BYTES", 1 << 16)  # forces several column chunks
    g = torch.Generator().manual_seed(3)
    a, b = _rand(g, 20, 64), _rand(g, 64, 300)
    assert torch.equal(F.limb_matmul(a, b), torch.matmul(a, b))


def test_route_rule(monkeypatch):
    """auto: small products (one row, vectors, few multiply-adds) take int64 unmeasured; a large product's shape
    class is measured once (both routes, the int64 result returned) and its winner kept; int64/limbs force."""
    monkeypatch.setattr(F, "RING_MATMUL", "auto")
    monkeypatch.setattr(F, "_ROUTES", {})
    monkeypatch.setattr(F, "ROUTE_LOG", [])
    assert F.ring_matmul_route((1, 576), (576, 1536)) == "int64"  # decode: one row
    assert F.ring_matmul_route((3, 3, 64), (3, 64, 435)) == "int64"  # decode attention: 3 rows per head
    assert F.ring_matmul_route((576,), (576, 64)) == "int64"  # vectors
    assert F.ring_matmul_route((16, 8), (8, 8)) == "int64"  # few multiply-adds
    assert F.ring_matmul_route((434, 576), (576, 1536)) == "measure"
    g = torch.Generator().manual_seed(4)
    a, b = _rand(g, 64, 512), _rand(g, 512, 96)
    assert torch.equal(F.ring_matmul(a, b), torch.matmul(a, b))
    assert len(F.ROUTE_LOG) == 1 and F.ring_matmul_route(a.shape, b.shape) in ("int64", "limbs")
    a2 = _rand(g, 70, 512)  # same class: not measured again
    assert torch.equal(F.ring_matmul(a2, b), torch.matmul(a2, b)) and len(F.ROUTE_LOG) == 1
    F._ROUTES[F._route_class(a.shape, b.shape)] = "limbs"
    assert torch.equal(F.ring_matmul(a2, b), torch.matmul(a2, b))
    monkeypatch.setattr(F, "RING_MATMUL", "int64")
    assert F.ring_matmul_route((434, 576), (576, 1536)) == "int64"  # switched off
    monkeypatch.setattr(F, "RING_MATMUL", "limbs")
    assert F.ring_matmul_route((434, 576), (576, 1536)) == "limbs"
