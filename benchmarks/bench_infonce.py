"""Semantic-class InfoNCE timing: the fused Triton kernel vs torch paths, forward and forward + backward.

    python3 benchmarks/bench_infonce.py                 # GPU: the grid below (several minutes, estimated)
    python3 benchmarks/bench_infonce.py --budget 240    # the same, skipping what is left after 240 s
    python3 benchmarks/bench_infonce.py --quick         # tiny sizes; on CPU the kernel runs in the interpreter

Implementations, all given the same query selection (``select_queries``, also timed on its own):
``fused`` (the kernel, through ``semantic_class_infonce``), ``rows`` (the library's torch path, query rows x
all keys, computing in the input dtype; the baseline of the speedups), ``rows-compiled`` (torch.compile of it),
``dense`` (all N x N pairs, non-query rows masked) and ``per-pair`` (the reference code's expansion: one
(|P_c|(|P_c|-1), 1 + |N_c|) logit matrix per class). Features are random, a fraction of the tokens spread over
8 entity classes, the rest non-entity; on a GPU fp32 uses TF32 on both sides and the peak memory of a call
above what was allocated before it is recorded (the input's gradient included). Each row also gives TFLOP/s
and, on a card in ``common.PEAK_TFLOPS``, the fraction of its peak (``infonce_flops``). Correctness lives in
the tests.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import Case, Target, parse_args, run_cases

TAU, ENTITY_CLASSES = 0.07, 8  # entity types, as in the Resume corpus
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def case(n: int, d: int, dtype: str, entities: float = 0.15, all_queries: bool = False) -> dict:
    return dict(N=n, d=d, dtype=dtype, entities=entities, all_queries=all_queries)


# The headline configuration (bf16, d = 160) first, so that a budget cuts the least telling cases.
GPU_CASES = ([case(n, d, dtype) for dtype in ("bf16", "fp32") for d in (160, 256, 768)
              for n in (8192, 32768, 131072, 262144)]
             + [case(n, 160, "bf16", all_queries=True) for n in (8192, 32768, 131072)]
             + [case(n, 160, "bf16", entities=0.05) for n in (8192, 32768, 131072)])
QUICK_CASES = [case(128, 32, "fp32"), case(64, 32, "fp32", all_queries=True)]
TARGETS = (  # H100 goals from the issue
    Target(case(32768, 160, "bf16"), "fused", "fwd+bwd", "ms", 1.0),
    Target(case(131072, 160, "bf16"), "fused", "fwd+bwd", "ms", 15.0),
    Target(case(32768, 160, "bf16", all_queries=True), "fused", "fwd+bwd", "ms", 6.0),
    Target(case(32768, 160, "bf16"), "fused", "fwd+bwd", "peak_mib", 64.0),
)


def implementations(c: dict, device: str) -> list[str]:
    """The torch paths only where they fit in memory and time: rows up to N = 131,072; the N x N and
    per-pair paths, and the compiled one (slow to compile), on small headline-sized cases."""
    impls = ["rows"] if c["N"] <= 131072 else []
    impls.append("fused")
    small = c["N"] <= 32768 and c["d"] <= 160
    impls += ["dense"] if small else []
    impls += ["per-pair"] if small and c["N"] <= 8192 else []
    if device == "cuda" and small and c["dtype"] == "bf16" and not c["all_queries"]:
        impls.append("rows-compiled")
    return impls


def setup(c: dict, device: str) -> Case:
    """Random features and labels, their query selection, and forward / forward + backward of each path."""
    from nerco_dist.kernels.query_classes import select_queries
    from nerco_dist.losses import semantic_class_infonce, torch_infonce

    n = c["N"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c["d"], generator=g, device=device).to(DTYPES[c["dtype"]]).requires_grad_()
    labels = torch.randint(1, ENTITY_CLASSES + 1, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) >= c["entities"]] = 0

    def select():
        return select_queries(labels, labels, torch.arange(n, device=device), ENTITY_CLASSES + 1,
                              non_entity_queries=c["all_queries"])

    sel = select()
    compiled = torch.compile(torch_infonce)
    losses = {
        "fused": lambda: semantic_class_infonce(x, labels, TAU, selection=sel, backend="triton"),
        "rows": lambda: torch_infonce(x, x, sel, TAU, compute_dtype=x.dtype),
        "rows-compiled": lambda: compiled(x, x, sel, TAU, compute_dtype=x.dtype),
        "dense": lambda: all_pairs_loss(x, sel),
        "per-pair": lambda: per_pair_loss(x, sel),
    }
    fns = {("select_queries", "select"): select}
    for impl in implementations(c, device):
        fns[impl, "fwd"] = losses[impl]
        fns[impl, "fwd+bwd"] = lambda loss=losses[impl]: backward(loss, x)
    stats = sel.stats()
    return Case({"queries": int(stats.queries), "positive_pairs": int(stats.positive_pairs),
                 "negatives_per_query": round(stats.negatives_per_query, 1)}, fns,
                flops=infonce_flops(int(stats.queries), n, c["d"]))


def infonce_flops(queries: int, keys: int, d: int) -> dict[str, float]:
    """The work of the loss, counted in its matrix products: the forward's logits, 2·Nq·Nk·d; forward +
    backward adds the logits recomputed and the two gradient products (dQ and dK), 8·Nq·Nk·d in all. The
    softmax and masks are O(Nq·Nk) and left out."""
    logits = 2.0 * queries * keys * d
    return {"fwd": logits, "fwd+bwd": 4 * logits}


def backward(loss_fn, x):
    loss = loss_fn()
    loss.backward()
    x.grad = None  # allocated afresh by every call, so the peak memory counts it
    return loss.detach()


def all_pairs_loss(x, sel):
    """Eager N x N: every token a query row, the selection's weights zero for the others."""
    z = F.normalize(x, dim=1)
    logits = z @ z.T / TAU
    labels = sel.key_labels
    same = labels[:, None] == labels[None, :]
    lse = torch.logsumexp(logits.masked_fill(same, -1e4), dim=1)  # finite: rows without negatives stay NaN-free
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=x.device)
    terms = F.softplus(lse[:, None] - logits).masked_fill(~same | eye, 0.0)
    weight = torch.zeros(labels.numel(), dtype=terms.dtype, device=x.device)
    weight[sel.rows] = sel.weight.to(terms.dtype)
    return (terms.sum(1) * weight).sum()


def per_pair_loss(x, sel):
    """The reference code's expansion: per query class, every (anchor, positive) pair against all negatives."""
    z = F.normalize(x, dim=1)
    total = z.sum() * 0
    for c in sel.qualifies.nonzero()[:, 0].tolist():
        members, others = (sel.key_labels == c).nonzero()[:, 0], (sel.key_labels != c).nonzero()[:, 0]
        i, j = torch.cartesian_prod(members, members).unbind(1)
        i, j = i[i != j], j[i != j]
        pos = (z[i] * z[j]).sum(1, keepdim=True) / TAU
        neg = z[i] @ z[others].T / TAU
        target = torch.zeros(len(i), dtype=torch.long, device=x.device)
        total = total + F.cross_entropy(torch.cat([pos, neg], 1), target)
    return total


def main() -> int:
    args = parse_args("infonce", __doc__)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 cases: TF32 for torch and the kernel alike
    settings = {"tau": TAU, "entity_classes": ENTITY_CLASSES,
                "fp32_matmul": "tf32" if args.device == "cuda" else "ieee"}
    run_cases(args, "infonce", QUICK_CASES if args.quick else GPU_CASES, setup, "rows", settings=settings,
              targets=TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
