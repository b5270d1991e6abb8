"""Dense torch path of the semantic-class InfoNCE against a literal transcription of the formula."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from nerco_dist.kernels.query_classes import select_queries
from nerco_dist.losses import contrastive_loss, semantic_class_infonce

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


def dense(features, labels, tau=0.07, **kwargs):
    return semantic_class_infonce(features, labels, tau, backend="torch", **kwargs)


def batch_selection(labels, num_classes=None, **kwargs):
    """The queries of a batch that is its own keys."""
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return select_queries(labels, labels, torch.arange(labels.numel()), num_classes, **kwargs)


def grads(fn, *tensors):
    tensors = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*tensors)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("seed,n,d,n_classes,o_frac,tau", [
    (0, 23, 8, 4, 0.5, 0.07), (1, 31, 5, 7, 0.3, 0.1), (2, 17, 16, 2, 0.0, 0.5), (3, 40, 3, 12, 0.6, 0.07)])
def test_matches_literal(seed, n, d, n_classes, o_frac, tau):
    x, labels = batch(n, d, n_classes, o_frac, seed)
    assert batch_selection(labels).has_queries
    ref, (g_ref,) = grads(lambda f: literal_infonce(f, labels, tau), x)
    out, (g,) = grads(lambda f: dense(f, labels, tau), x)
    assert out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_singletons_absent_classes_and_other_non_entity_id():
    x, _ = batch(12, 6, 1, 0.0, 4)
    labels = torch.tensor([5, 5, 5, 2, 2, 9, 7, 5, 7, 7, 9, 1])  # 9 is non-entity here; 3, 4, 6, 8 absent; 1 single
    ref, (g_ref,) = grads(lambda f: literal_infonce(f, labels, 0.2, non_entity=9), x)
    selection = batch_selection(labels, non_entity=9)
    out, (g,) = grads(lambda f: dense(f, labels, 0.2, selection=selection), x)
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
    selection = batch_selection(labels, num_classes=8)
    assert not selection.has_queries and selection.num_query_classes == 0
    loss = dense(x, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert literal_infonce(x, labels).item() == 0.0


def test_non_entity_queries_ablation():
    x, labels = batch(26, 7, 3, 0.5, 5)
    ref, (g_ref,) = grads(lambda f: literal_infonce(f, labels, non_entity_queries=True), x)
    out, (g,) = grads(lambda f: dense(f, labels, non_entity_queries=True), x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)
    assert out > dense(x, labels)
    # all-O batch: O has no negatives, so nothing qualifies even in the ablation
    zeros = torch.zeros(5, dtype=torch.long)
    assert not batch_selection(zeros, non_entity_queries=True).has_queries
    assert dense(x[:5], zeros, non_entity_queries=True).item() == 0.0


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

    def torch_path(q, k):
        return dense(q, labels, 0.1, keys=k, key_labels=key_labels, self_index=self_index)

    ref, (gq_ref, gk_ref) = grads(lit, queries, keys)
    out, (gq, gk) = grads(torch_path, queries, keys)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gq, gq_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gk, gk_ref, rtol=1e-9, atol=1e-9)
    # no self rows given: every key of the class is a positive
    ref = literal_infonce(queries, labels, 0.1, keys=keys, key_labels=key_labels)
    out = dense(queries, labels, 0.1, keys=keys, key_labels=key_labels)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_sharded_queries_sum_to_full_batch():
    """What the distributed trainer relies on: local queries against the gathered batch, summed over ranks."""
    x, labels = batch(30, 5, 4, 0.5, 7)
    full = dense(x, labels)
    shards = torch.arange(30).chunk(3)
    parts = [dense(x[s], labels[s], keys=x, key_labels=labels, self_index=s) for s in shards]
    torch.testing.assert_close(sum(parts), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype):
    x, labels = batch(24, 16, 3, 0.5, 8)
    ref = dense(x.to(dtype).double(), labels)
    out = dense(x.to(dtype), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    x, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="backend"):
        semantic_class_infonce(x, labels, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="key_labels"):
        semantic_class_infonce(x, labels, 0.1, keys=x)
    with pytest.raises(ValueError, match="self_index"):
        semantic_class_infonce(x, labels, 0.1, self_index=torch.arange(4))
    with pytest.raises(ValueError, match="temperature"):
        semantic_class_infonce(x, labels, 0.0)
    with pytest.raises(ValueError, match="labels"):
        semantic_class_infonce(x, labels[:3], 0.1)
    with pytest.raises(ValueError, match="selection"):
        semantic_class_infonce(x, labels, 0.1, selection=batch_selection(labels[:3]))
    assert math.isfinite(semantic_class_infonce(x, labels, 0.1).item())


def literal_selection(labels, key_labels, self_index, num_classes, non_entity=0, non_entity_queries=False):
    """select_queries' fields by the rule, one Python loop."""
    counts = [key_labels.tolist().count(c) for c in range(num_classes)]
    qualifies = [m >= 2 and m < len(key_labels) and (c != non_entity or non_entity_queries)
                 for c, m in enumerate(counts)]
    rows = [i for i, c in enumerate(labels.tolist()) if qualifies[c]]
    return dict(rows=rows, classes=[labels[i].item() for i in rows], self_rows=[self_index[i].item() for i in rows],
                weight=[1 / (counts[labels[i]] * (counts[labels[i]] - 1)) for i in rows], key_counts=counts,
                qualifies=qualifies, num_queries=len(rows), num_query_classes=sum(qualifies))


@pytest.mark.parametrize("seed,n,nk,num_classes,ablation,non_entity", [
    (0, 19, 19, 6, False, 0), (1, 7, 33, 9, True, 0), (2, 25, 11, 4, False, 3), (3, 1, 2, 3, False, 0),
    (4, 0, 5, 2, True, 0), (5, 6, 0, 4, False, 0)])
def test_select_queries_follows_the_rule(seed, n, nk, num_classes, ablation, non_entity):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    key_labels = labels.clone() if n == nk else torch.randint(0, num_classes - 1, (nk,), generator=g)
    self_index = torch.randint(-1, max(nk, 1), (n,), generator=g)
    got = select_queries(labels, key_labels, self_index, num_classes, non_entity=non_entity,
                         non_entity_queries=ablation)
    want = literal_selection(labels, key_labels, self_index, num_classes, non_entity, ablation)
    for name, value in want.items():
        field = getattr(got, name)
        assert (field if isinstance(field, int) else field.tolist()) == value, name
    assert got.has_queries == (want["num_queries"] > 0)
    assert got.key_labels.tolist() == key_labels.tolist()


def test_stats_are_those_of_the_key_batch():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3, 0, 4, 4])  # class 2 a singleton
    stats = batch_selection(labels, num_classes=6).stats()
    counts = {0: 4, 1: 3, 2: 1, 3: 2, 4: 2, 5: 0}
    queries = [1, 3, 4]
    assert stats.queries == sum(counts[c] for c in queries) == 7
    assert stats.positive_pairs == sum(counts[c] * (counts[c] - 1) for c in queries) == 10
    assert stats.negatives_per_query == pytest.approx(sum(counts[c] * (12 - counts[c]) for c in queries) / 7)
    assert stats.class_fractions == [counts[c] / 12 for c in range(6)]
    assert all(isinstance(v, float) for v in stats[:3])


def test_given_selection_is_used_as_is():
    x, labels = batch(26, 7, 3, 0.5, 5)
    ablation = batch_selection(labels, non_entity_queries=True)
    out = dense(x, labels, selection=ablation)  # non_entity_queries=False here: the selection decides
    torch.testing.assert_close(out, dense(x, labels, non_entity_queries=True), rtol=0, atol=0)
    assert out > dense(x, labels)


@pytest.mark.parametrize("across_ranks", [True, False])
def test_contrastive_loss_on_one_rank(across_ranks):
    x, labels = batch(30, 5, 4, 0.5, 9)
    loss, selection = contrastive_loss(x, labels, temperature=0.1, num_classes=5, backend="torch",
                                       across_ranks=across_ranks)
    torch.testing.assert_close(loss, dense(x, labels, 0.1), rtol=0, atol=0)
    assert selection.rows.tolist() == batch_selection(labels, num_classes=5).rows.tolist()
    nothing, selection = contrastive_loss(x[:4], torch.tensor([0, 0, 1, 2]), temperature=0.1, num_classes=5,
                                          across_ranks=across_ranks)
    assert nothing is None and not selection.has_queries


def _rank_losses(rank, world, init_file, x, labels, out):
    """One rank of test_contrastive_loss_across_ranks: its loss (or None) and its tokens' gradient."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = torch.arange(len(labels)).chunk(world)[rank]
        tokens = x[mine].clone().requires_grad_()
        loss, selection = contrastive_loss(tokens, labels[mine], temperature=0.1, num_classes=5, backend="torch")
        if loss is not None:
            loss.backward()
        torch.save(dict(loss=None if loss is None else loss.item(), grad=tokens.grad, queries=selection.num_queries,
                        stats=selection.stats()), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("labels", [
    torch.tensor([0] * 10 + [1, 2, 1, 3, 3, 0, 2, 1, 0, 4]),  # rank 0 has no query, its tokens are negatives
    torch.tensor([0, 1, 2, 3, 0, 0, 4, 0, 0, 0]),  # no class qualifies on the gathered batch
])
def test_contrastive_loss_across_ranks(tmp_path, labels):
    """Two gloo ranks, each its half of the batch: the mean of the values is the global loss, each rank's
    token gradient is the world size times the global loss's (what DeepSpeed's averaging expects), and
    either both ranks have a loss or neither has."""
    x = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.multiprocessing.spawn(_rank_losses, args=(2, tmp_path / "init", x, labels, tmp_path / "out"), nprocs=2)
    ranks = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in range(2)]
    x = x.clone().requires_grad_()
    full = dense(x, labels, 0.1)
    if not batch_selection(labels).has_queries:
        assert [r["loss"] for r in ranks] == [None, None]
        return
    full.backward()
    assert ranks[0]["queries"] == 0 and ranks[0]["grad"].abs().max() > 0
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(full.item(), rel=1e-12)
    # the gather's backward sums the ranks' key gradients in fp32
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), 2 * x.grad, rtol=1e-6, atol=1e-6)
    assert ranks[0]["stats"] == ranks[1]["stats"] == batch_selection(labels, num_classes=5).stats()


WITHOUT_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # every import of triton fails from here on
    import torch
    from nerco_dist.losses import contrastive_loss

    x = torch.randn(6, 4, requires_grad=True)
    loss, selection = contrastive_loss(x, torch.tensor([0, 1, 1, 2, 2, 0]), temperature=0.1, num_classes=3)
    loss.backward()
    assert selection.num_queries == 4 and x.grad.abs().max() > 0
""")


def test_torch_path_needs_no_triton():
    """The query selection and the dense loss import and run where Triton is not installed."""
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
