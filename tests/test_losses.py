"""Dense torch path of the semantic-class InfoNCE against a literal transcription of the formula."""

import math

import pytest
import torch

from nerco_dist.losses import infonce_active, semantic_class_infonce, torch_infonce

F64 = torch.float64


def literal_infonce(features, labels, tau=0.07, non_entity=0, keys=None, key_labels=None, self_index=None,
                    non_entity_queries=False):
    """L = sum_c 1/(|P_c|(|P_c|-1)) sum_{i in P_c} sum_{j in P_c, j != i} -log(e^{s_ij/t} / (e^{s_ij/t} +
    sum_{n in N_c} e^{s_in/t})), one Python loop per class, anchor and positive."""
    if keys is None:
        keys, key_labels, self_index = features, labels, list(range(len(labels)))
    elif self_index is None:
        self_index = [-1] * len(labels)
    else:
        self_index = self_index.tolist()
    q = [f / f.norm() for f in features]
    k = [f / f.norm() for f in keys]
    total = features.sum() * 0 + keys.sum() * 0
    for c in sorted(set(key_labels.tolist())):
        if c == non_entity and not non_entity_queries:
            continue
        positives = [j for j in range(len(key_labels)) if key_labels[j] == c]
        negatives = [n for n in range(len(key_labels)) if key_labels[n] != c]
        if len(positives) < 2 or len(negatives) < 1:
            continue
        weight = 1.0 / (len(positives) * (len(positives) - 1))
        for i in range(len(labels)):
            if labels[i] != c:
                continue
            neg = sum(torch.exp(q[i] @ k[n] / tau) for n in negatives)
            for j in positives:
                if j == self_index[i]:
                    continue
                pos = torch.exp(q[i] @ k[j] / tau)
                total = total - weight * torch.log(pos / (pos + neg))
    return total


def batch(n, d, n_classes, o_frac, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    labels = torch.randint(1, n_classes + 1, (n,), generator=g)
    labels[torch.rand(n, generator=g) < o_frac] = 0
    return x, labels


def grads(fn, *tensors):
    tensors = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*tensors)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("seed,n,d,n_classes,o_frac,tau", [
    (0, 23, 8, 4, 0.5, 0.07), (1, 31, 5, 7, 0.3, 0.1), (2, 17, 16, 2, 0.0, 0.5), (3, 40, 3, 12, 0.6, 0.07)])
def test_matches_literal(seed, n, d, n_classes, o_frac, tau):
    x, labels = batch(n, d, n_classes, o_frac, seed)
    assert infonce_active(labels)
    ref, (g_ref,) = grads(lambda f: literal_infonce(f, labels, tau), x)
    out, (g,) = grads(lambda f: semantic_class_infonce(f, labels, tau, backend="torch"), x)
    assert out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_singletons_absent_classes_and_other_non_entity_id():
    x, _ = batch(12, 6, 1, 0.0, 4)
    labels = torch.tensor([5, 5, 5, 2, 2, 9, 7, 5, 7, 7, 9, 1])  # 9 is non-entity here; 3, 4, 6, 8 absent; 1 single
    ref, (g_ref,) = grads(lambda f: literal_infonce(f, labels, 0.2, non_entity=9), x)
    out, (g,) = grads(lambda f: torch_infonce(f, labels, 0.2, non_entity=9), x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)
    assert g[11].abs().max() > 0  # a singleton class's token is still a negative of the others


@pytest.mark.parametrize("labels", [
    torch.zeros(9, dtype=torch.long),  # all non-entity
    torch.full((9,), 3),  # one entity class, no negatives
    torch.tensor([0, 0, 0, 0, 2, 0, 0, 0, 0]),  # one entity token
    torch.tensor([1, 2, 3, 4, 0, 0, 5, 6, 0]),  # all entity classes singletons
    torch.zeros(0, dtype=torch.long),  # empty batch
])
def test_no_qualifying_class_gives_connected_zero(labels):
    x = torch.randn(labels.numel(), 4, dtype=F64, requires_grad=True)
    assert not infonce_active(labels)
    loss = semantic_class_infonce(x, labels, backend="torch")
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert literal_infonce(x, labels).item() == 0.0


def test_non_entity_queries_ablation():
    x, labels = batch(26, 7, 3, 0.5, 5)
    ref, (g_ref,) = grads(lambda f: literal_infonce(f, labels, non_entity_queries=True), x)
    out, (g,) = grads(lambda f: torch_infonce(f, labels, non_entity_queries=True), x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)
    assert out > torch_infonce(x, labels)
    # all-O batch: O has no negatives, so nothing qualifies even in the ablation
    zeros = torch.zeros(5, dtype=torch.long)
    assert not infonce_active(zeros, non_entity_queries=True)
    assert torch_infonce(x[:5], zeros, non_entity_queries=True).item() == 0.0


def test_keys_with_self_index():
    keys, key_labels = batch(29, 6, 3, 0.4, 6)
    rows = torch.tensor([3, 17, 0, 28, 11, 5, 21, 9])
    queries, labels = keys[rows].clone(), key_labels[rows]
    queries = queries + 0.0  # a copy: gradients of queries and keys are separate
    self_index = rows.clone()
    self_index[1] = -1  # a query whose own row is not among the keys
    queries[1] = torch.randn(6, dtype=F64)

    def lit(q, k):
        return literal_infonce(q, labels, 0.1, keys=k, key_labels=key_labels, self_index=self_index)

    def dense(q, k):
        return torch_infonce(q, labels, 0.1, keys=k, key_labels=key_labels, self_index=self_index)

    ref, (gq_ref, gk_ref) = grads(lit, queries, keys)
    out, (gq, gk) = grads(dense, queries, keys)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gq, gq_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gk, gk_ref, rtol=1e-9, atol=1e-9)
    # no self rows given: every key of the class is a positive
    ref = literal_infonce(queries, labels, 0.1, keys=keys, key_labels=key_labels)
    out = semantic_class_infonce(queries, labels, 0.1, keys=keys, key_labels=key_labels, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_sharded_queries_sum_to_full_batch():
    """What the distributed trainer relies on: local queries against the gathered batch, summed over ranks."""
    x, labels = batch(30, 5, 4, 0.5, 7)
    full = torch_infonce(x, labels)
    shards = torch.arange(30).chunk(3)
    parts = [torch_infonce(x[s], labels[s], keys=x, key_labels=labels, self_index=s) for s in shards]
    torch.testing.assert_close(sum(parts), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    x, labels = batch(24, 16, 3, 0.5, 8)
    ref = torch_infonce(x.to(dtype).double(), labels)
    out = semantic_class_infonce(x.to(dtype), labels, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="backend"):
        semantic_class_infonce(x, labels, backend="cuda")
    with pytest.raises(ValueError, match="key_labels"):
        semantic_class_infonce(x, labels, keys=x)
    with pytest.raises(ValueError, match="self_index"):
        semantic_class_infonce(x, labels, self_index=torch.arange(4))
    with pytest.raises(ValueError, match="temperature"):
        semantic_class_infonce(x, labels, 0.0)
    with pytest.raises(ValueError, match="labels"):
        semantic_class_infonce(x, labels[:3])
    assert math.isfinite(semantic_class_infonce(x, labels).item())
