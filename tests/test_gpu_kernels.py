"""The Triton kernels compiled for the GPU, on GPU-sized inputs and in every dtype they take (bf16 included,
which the interpreter gets wrong), against float64 references; and FLAT's gathered position scores in bf16,
whose table gradient sums many pairs with atomics on a GPU. Marked ``gpu`` and skipped without CUDA.

The tests run compiled kernels: tests/conftest.py turns the interpreter on only where there is no CUDA, so
``python -m pytest -m gpu`` on a GPU machine runs them compiled (TRITON_INTERPRET=1 set by hand skips them).
"""

import itertools
import os
import warnings

import pytest
import torch

from nerco_dist.losses import semantic_class_infonce
from nerco_dist.model.flat import GatheredScores
from nerco_dist.model.crf import bio_allowed_transitions, build_crf
from tests.test_crf import enumerate_paths, make_crf, path_scores, random_batch, reference
from tests.test_infonce_kernel import batch, compare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)"),
    pytest.mark.filterwarnings("ignore:where received a uint8 condition:UserWarning"),  # pytorch-crf
]

CUDA = "cuda"
# (dtype, input precision of fp32 products): fp16/bf16 products always run on tensor cores
PRECISIONS = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")]
PRECISION_IDS = ["fp32-ieee", "fp32-tf32", "fp16", "bf16"]


def infonce_tolerance(dtype, precision):
    """(rtol of the largest reference entry, atol) on top of twice the error of the dense torch path in the
    same precision (none for fp32 IEEE): the GPU sums in another order than the interpreter."""
    return (1e-4, 1e-5) if (dtype, precision) == (torch.float32, "ieee") else (1e-3, 0.0)


@pytest.fixture
def tf32(monkeypatch):
    """Set whether torch's fp32 matmuls (the dense path in the same precision) use TF32, for one test."""
    return lambda on: monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", on)


def cuda_batch(n, d, seed, **kwargs):
    """15% of the tokens in 8 entity classes, as in the Resume corpus, on the GPU."""
    x, labels = batch(n, d, 8, 0.85, seed, **kwargs)
    return x.to(CUDA), labels.to(CUDA)


@pytest.mark.parametrize("dtype,precision", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("n,d", list(itertools.product([1000, 4097], [160, 200, 768])))
def test_infonce_batch(n, d, dtype, precision, tf32):
    tf32(precision == "tf32")
    x, labels = cuda_batch(n, d, seed=n + d, big_class=0.1)
    compare(labels, x, dtype=dtype, precision=precision, seed=n + d, tol=infonce_tolerance(dtype, precision))


@pytest.mark.parametrize("dtype,precision", PRECISIONS, ids=PRECISION_IDS)
@pytest.mark.parametrize("nq,nk,d,ablation,splits", [
    (3001, 3001, 160, False, 3),  # forced column splits
    (1500, 1500, 200, True, None),  # the non-entity class queries too
    (700, 2500, 160, False, None),  # keys distinct from the queries
    (257, 1999, 1000, False, 2),  # near the largest feature dim, few row blocks
])
def test_infonce_keys_ablation_and_splits(nq, nk, d, ablation, splits, dtype, precision, tf32):
    tf32(precision == "tf32")
    keys, key_labels = cuda_batch(nk, d, seed=nq + d)
    tol = infonce_tolerance(dtype, precision)
    if nq == nk:
        compare(key_labels, keys, ablation=ablation, splits=splits, dtype=dtype, precision=precision, seed=nq,
                tol=tol)
        return
    rows = torch.randperm(nk, generator=torch.Generator().manual_seed(nq))[:nq].to(CUDA)
    queries = keys[rows] + 0.1 * torch.randn(nq, d, generator=torch.Generator().manual_seed(1)).to(CUDA)
    out = compare(key_labels[rows], queries, keys, key_labels, rows, ablation=ablation, splits=splits,
                  dtype=dtype, precision=precision, seed=nq, tol=tol)
    assert out[2].abs().max() > 0


def test_infonce_syncs_the_host_once():
    """Selection, pre-pass, kernels and backward wait for the GPU once: the query count."""
    x, labels = cuda_batch(4097, 160, seed=3)
    x.requires_grad_()

    def step():
        semantic_class_infonce(x, labels, 0.07, num_classes=9).backward()

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def padded_path_scores(em, path, start, end, trans):
    """Scores (B,) of padded paths (B, L) (-1 past each end) over emissions (B, L, T), in float64."""
    on = path >= 0
    p = path.clamp_min(0)
    n = on.sum(1)
    s = start[p[:, 0]] + end[p.gather(1, (n - 1)[:, None]).squeeze(1)]
    s = s + (em.gather(2, p[:, :, None]).squeeze(2) * on).sum(1)
    return s + (trans[p[:, :-1], p[:, 1:]] * on[:, 1:]).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(16, 100, 9), (8, 333, 33), (4, 4096, 17), (8, 64, 128), (64, 40, 1), (5, 1, 7)],
                         ids=str)
def test_crf_matches_pytorch_crf_in_float64(shape, dtype):
    """Log-likelihood (so log Z), its gradients and the Viterbi path against pytorch-crf in float64 on the
    same (rounded) emissions: long sequences, 128 tags, one tag, one step."""
    B, L, T = shape
    crf = make_crf(T, "triton", seed=B + L + T).to(CUDA)
    ref = reference(crf).to(CUDA)
    em, tags, mask = (t.to(CUDA) for t in random_batch(B, L, T, "random", seed=L))
    em = em.to(dtype)
    weights = torch.randn(B, generator=torch.Generator().manual_seed(B)).to(CUDA)  # a non-uniform upstream gradient
    em_ours, em_ref = em.clone().requires_grad_(), em.double().requires_grad_()
    llh = crf(em_ours, tags, mask, reduction="none")
    expected = ref(em_ref, tags, mask, reduction="none")
    (llh * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert ((llh.double() - expected).abs() / expected.abs().clamp_min(1)).max() < 1e-5
    grad_tol = 1e-4 + torch.finfo(dtype).eps * em_ref.grad.abs().max()  # the gradient is stored in the input dtype
    assert (em_ours.grad.double() - em_ref.grad).abs().max() < grad_tol
    for ours, theirs in zip(crf.parameters(), ref.parameters()):  # pytorch-crf leaves unused ones at None
        want = torch.zeros_like(theirs) if theirs.grad is None else theirs.grad
        assert (ours.grad.double() - want).abs().max() / want.abs().max().clamp_min(1) < 1e-4

    path = crf.decode_padded(em, mask)
    ref_path = torch.full_like(path, -1)
    for b, p in enumerate(ref.decode(em.double(), mask)):
        ref_path[b, : len(p)] = torch.tensor(p, device=CUDA)
    start, end, trans = (p.detach() for p in ref.parameters())
    best = padded_path_scores(em.double(), ref_path, start, end, trans)
    ours = padded_path_scores(em.double(), path, start, end, trans)
    assert ((best - ours) / best.abs().clamp_min(1)).max() < 1e-5  # the same path but for near-ties
    assert torch.equal(path >= 0, mask)


def test_crf_bio_constraints_match_brute_force():
    """BIO constraints on the GPU: decoded paths are allowed, and likelihood and Viterbi path are those of
    brute force over the allowed paths."""
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    allowed = bio_allowed_transitions(labels)
    T, L = len(labels), 5
    crf = make_crf(T, "triton", allowed=allowed, seed=1).to(CUDA)
    em, _, mask = (t.to(CUDA) for t in random_batch(32, L, T, "full", seed=1))
    path = crf.decode_padded(em, mask)
    paths = enumerate_paths(T, L, allowed).to(CUDA)
    start, end, trans = (p.detach().double() for p in crf.parameters())
    scores = torch.stack([path_scores(paths, e.double(), start, end, trans) for e in em])  # (B, allowed paths)
    assert torch.equal(paths[scores.argmax(1)], path)
    llh = crf(em, path, mask, reduction="none").double()
    expected = scores.gather(1, scores.argmax(1, keepdim=True)).squeeze(1) - torch.logsumexp(scores, 1)
    torch.testing.assert_close(llh, expected, rtol=1e-5, atol=1e-4)


def test_build_crf_picks_triton_on_cuda():
    crf = build_crf(5).to(CUDA)
    assert crf._use_triton(torch.zeros(1, 1, 5, device=CUDA))


def test_gathered_scores_sum_a_rows_gradient_in_fp32_under_bf16():
    """About 8,500 pairs share each table row: its bf16 gradient is the fp32 sum of the pairs' (bf16)
    gradients, rounded once (within bf16's unit roundoff); bf16 atomics would be off by far more."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    query = torch.randn(64, 2, 8, device=CUDA, generator=g).bfloat16().requires_grad_()
    table = torch.randn(3, 8, device=CUDA, generator=g).bfloat16().requires_grad_()
    index = torch.randint(0, 3, (64, 400), device=CUDA, generator=g)
    grad = torch.randn(64, 2, 400, device=CUDA, generator=g).bfloat16()
    GatheredScores.apply(query, table, index).backward(grad)
    pair_grads = torch.bmm(grad.transpose(1, 2), query.detach()).double()  # each pair's, as computed in bf16
    expected = torch.zeros(3, 8, dtype=torch.float64, device=CUDA).index_add_(0, index.reshape(-1),
                                                                             pair_grads.reshape(-1, 8))
    assert table.grad.dtype == torch.bfloat16
    torch.testing.assert_close(table.grad.double(), expected, rtol=2 ** -8, atol=1e-6)
