"""Semantic-class InfoNCE, forward + backward: fused Triton kernel vs torch paths.

    python benchmarks/bench_infonce.py            # GPU: correctness checks, then the benchmark grid
    python benchmarks/bench_infonce.py --check    # GPU correctness checks only
    python benchmarks/bench_infonce.py --bench    # benchmark only

Implementations: ``fused`` (the kernel), ``dense`` (eager, all N x N pairs masked), ``rows`` (the library's
torch path: entity rows x all keys, eager, in the input dtype), ``rows-compiled`` (torch.compile of it),
``per-pair`` (the reference code's expansion: one (|P_c|(|P_c|-1), 1 + |N_c|) logit matrix per class, small N).
On a GPU: medians of triton.testing.do_bench and the peak of torch.cuda.max_memory_allocated over one
forward + backward above what was allocated before (the input's gradient included); fp32 rows use TF32 on
both sides. Without a GPU a small CPU comparison runs instead (the kernel in the Triton interpreter) so the
script is exercised; GPU figures are then "not measured". Results go to benchmarks/results/infonce_*.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from nerco_dist.atomic import write_json, write_text  # noqa: E402
from nerco_dist.kernels.infonce import semantic_infonce  # noqa: E402
from nerco_dist.losses import torch_infonce  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TAU, N_CLASSES = 0.07, 8  # entity types, as in the Resume corpus
HEADLINES = [  # (what, impl, N, d, dtype, entity fraction, ablation, metric, limit)
    ("fwd+bwd, N=32,768", "fused", 32768, 160, "bf16", 0.15, False, "ms", 1.0),
    ("fwd+bwd, N=131,072", "fused", 131072, 160, "bf16", 0.15, False, "ms", 15.0),
    ("all-queries ablation, N=32,768", "fused", 32768, 160, "bf16", 0.15, True, "ms", 6.0),
    ("extra memory, N=32,768", "fused", 32768, 160, "bf16", 0.15, False, "peak_mib", 64.0),
    ("runs at N=262,144", "fused", 262144, 160, "bf16", 0.15, False, "ms", None),
]
HEADER = ["impl", "N", "d", "dtype", "entities", "all queries", "queries", "fwd+bwd ms", "peak extra MiB",
          "TFLOP/s (5·Nq·d·N)"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_batch(n, d, frac, dtype, device, seed=0):
    """Random features; a fraction ``frac`` of the tokens in N_CLASSES entity classes, the rest O (0)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device).to(dtype)
    labels = torch.randint(1, N_CLASSES + 1, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) >= frac] = 0
    return x, labels


def dense_full(x, labels, ablation):
    """Eager N x N: every token a query row, non-qualifying rows masked out."""
    z = F.normalize(x, dim=1)
    logits = z @ z.T / TAU
    same = labels[:, None] == labels[None, :]
    counts = torch.bincount(labels)[labels]
    ok = (counts >= 2) & (counts < labels.numel()) & (ablation | (labels != 0))
    lse = torch.logsumexp(logits.masked_fill(same, -1e4), dim=1)  # finite: rows without negatives stay NaN-free
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=x.device)
    terms = F.softplus(lse[:, None] - logits).masked_fill(~(same & ~eye & ok[:, None]), 0.0)
    w = torch.where(ok, 1.0 / (counts * (counts - 1)).clamp_min(1), 0.0).to(terms.dtype)
    return (terms.sum(1) * w).sum()


def per_pair(x, labels, ablation):
    """The reference code's expansion: per class, every (anchor, positive) pair against all negatives."""
    z = F.normalize(x, dim=1)
    total = z.sum() * 0
    for c in labels.unique().tolist():
        members, others = (labels == c).nonzero()[:, 0], (labels != c).nonzero()[:, 0]
        if (c == 0 and not ablation) or len(members) < 2 or len(others) == 0:
            continue
        i, j = torch.cartesian_prod(members, members).unbind(1)
        i, j = i[i != j], j[i != j]
        pos = (z[i] * z[j]).sum(1, keepdim=True) / TAU
        neg = z[i] @ z[others].T / TAU
        target = torch.zeros(len(i), dtype=torch.long, device=x.device)
        total = total + F.cross_entropy(torch.cat([pos, neg], 1), target)
    return total


def implementations(ablation):
    compiled = torch.compile(torch_infonce)
    return {
        "fused": lambda x, y: semantic_infonce(x, y, TAU, non_entity_queries=ablation),
        "dense": lambda x, y: dense_full(x, y, ablation),
        "rows": lambda x, y: torch_infonce(x, y, TAU, non_entity_queries=ablation, compute_dtype=x.dtype),
        "rows-compiled": lambda x, y: compiled(x, y, TAU, non_entity_queries=ablation, compute_dtype=x.dtype),
        "per-pair": lambda x, y: per_pair(x, y, ablation),
    }


def n_queries(labels, ablation):
    counts = torch.bincount(labels)[labels]
    return int(((counts >= 2) & (counts < labels.numel()) & (ablation | (labels != 0))).sum())


def measure(fn, x, labels):
    """(median ms, peak extra MiB) of one forward + backward."""
    x = x.detach().requires_grad_()

    def step():
        x.grad = None
        fn(x, labels).backward()

    if not ON_GPU:
        step()  # warm-up (compilation)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), None
    step()
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(step, warmup=10, rep=40, grad_to_none=[x], return_mode="median"), peak


def grid():
    """(impl, N, d, dtype, entity fraction, ablation) to run; torch baselines only where they can fit."""
    if not ON_GPU:  # small: the kernel runs in the interpreter
        runs = [(i, n, 160, "fp32", 0.15, False)
                for n in (512, 2048) for i in ("dense", "rows", "rows-compiled", "per-pair")]
        runs += [("fused", n, 160, "fp32", 0.15, False) for n in (256, 512)]
        return runs + [(i, 256, 160, "fp32", 0.15, True) for i in ("fused", "dense", "rows")]
    runs = []  # the headline configuration (bf16, d = 160) first, slow compilations last
    for dtype in ("bf16", "fp32"):
        for d in (160, 256, 768):
            for n in (8192, 32768, 131072, 262144):
                for frac in (0.05, 0.15):
                    runs.append(("fused", n, d, dtype, frac, False))
                    if d == 160 and n <= 32768:
                        runs.append(("dense", n, d, dtype, frac, False))
                    if d == 160 and n <= 131072:
                        runs.append(("rows", n, d, dtype, frac, False))
                    if d == 160 and n == 8192:
                        runs.append(("per-pair", n, d, dtype, frac, False))
            if (dtype, d) == ("bf16", 160):
                for n in (8192, 32768, 131072):
                    runs.append(("fused", n, d, dtype, 0.15, True))
                    if n <= 32768:
                        runs += [("dense", n, d, dtype, 0.15, True), ("rows", n, d, dtype, 0.15, True)]
    return runs + [("rows-compiled", n, 160, "bf16", 0.15, False) for n in (8192, 32768)]


def bench(deadline):
    device = "cuda" if ON_GPU else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: TF32 for torch and the kernel alike
    impls = {False: implementations(False), True: implementations(True)}
    rows = []
    for impl, n, d, dtype, frac, ablation in grid():
        row = dict(impl=impl, N=n, d=d, dtype=dtype, entity_frac=frac, ablation=ablation)
        if time.time() > deadline:
            row["status"] = "skipped (time budget)"
        else:
            x, labels = make_batch(n, d, frac, DTYPES[dtype], device)
            row["queries"] = ne = n_queries(labels, ablation)
            try:
                ms, peak = measure(impls[ablation][impl], x, labels)
                row.update(status="ok", ms=ms, peak_mib=peak, tflops=5 * ne * d * n / (ms * 1e-3) / 1e12)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            finally:
                del x, labels
                if ON_GPU:
                    torch.cuda.empty_cache()
        rows.append(row)
        print(fmt_row(row), flush=True)
    return rows


def check():
    """GPU kernel vs the float64 dense path: fp32 (IEEE: tight; TF32 and fp16/bf16: within 2x the error of
    the dense torch path in the same precision, plus a small atol)."""
    results = []
    cases = [  # (Nq, Nk, d, ablation, keys distinct, splits)
        (3000, 3000, 160, False, False, None), (3001, 3001, 160, False, False, 3), (1500, 1500, 160, True, False, None),
        (700, 2500, 160, False, True, None), (257, 1999, 1000, False, True, 2),
    ]
    for nq, nk, d, ablation, distinct, splits in cases:
        keys, key_labels = make_batch(nk, d, 0.15, torch.float64, "cuda", seed=nq + d)
        keys = keys * (1 + 3 * torch.rand(nk, 1, device="cuda", dtype=torch.float64))
        if distinct:
            rows = torch.randperm(nk, device="cuda")[:nq]
            queries, labels, self_index = keys[rows] + 0.1 * torch.randn_like(keys[rows]), key_labels[rows], rows
        else:
            queries, labels, keys, key_labels, self_index = keys, key_labels, None, None, None
        go = torch.tensor(1.7, device="cuda")
        for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", None), ("bf16", None)):
            t = DTYPES[dtype]
            q_in, k_in = queries.to(t), None if keys is None else keys.to(t)

            def kernel(q, k):
                return semantic_infonce(q, labels, TAU, 0, k, key_labels, self_index, ablation,
                                        input_precision=precision, splits=splits)

            def dense(compute_dtype):
                return lambda q, k: torch_infonce(q, labels, TAU, keys=k, key_labels=key_labels, self_index=self_index,
                                                  non_entity_queries=ablation, compute_dtype=compute_dtype)

            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            out = grads(kernel, q_in, k_in, go)
            ref = grads(dense(torch.float64), q_in.double(), None if k_in is None else k_in.double(), go.double())
            same = grads(dense(t), q_in, k_in, go.to(t)) if precision != "ieee" else None
            row = dict(Nq=nq, Nk=nk, d=d, ablation=ablation, keys=distinct, splits=splits, dtype=dtype,
                       precision=precision or "-", ok=True)
            for k, name in enumerate(("loss", "dq", "dk")):
                if ref[k] is None:
                    continue
                err = (out[k].double() - ref[k]).abs().max().item()
                scale = ref[k].abs().max().item()
                if same is None:
                    bound = 1e-4 * scale + 1e-5
                else:
                    bound = 2 * (same[k].double() - ref[k]).abs().max().item() + 1e-3 * scale
                row[f"{name}_err"], row[f"{name}_bound"] = err, bound
                row["ok"] &= err <= bound
            results.append(row)
            print(("PASS " if row["ok"] else "FAIL ") + json.dumps(row), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return results


def grads(fn, q, k, go):
    q = q.detach().requires_grad_()
    k = None if k is None else k.detach().requires_grad_()
    loss = fn(q, k)
    loss.backward(go)
    return loss.detach(), q.grad, None if k is None else k.grad


def fmt_row(r):
    cells = [r["impl"], f"{r['N']:,}", r["d"], r["dtype"], f"{r['entity_frac']:.0%}", "yes" if r["ablation"] else "",
             f"{r['queries']:,}" if "queries" in r else ""]
    if r["status"] != "ok":
        return "| " + " | ".join(map(str, cells + [r["status"], "", ""])) + " |"
    peak = "not measured" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
    return "| " + " | ".join(map(str, cells + [f"{r['ms']:.3f}", peak, f"{r['tflops']:.3g}"])) + " |"


def headlines(rows):
    out = []
    for what, impl, n, d, dtype, frac, ablation, metric, limit in HEADLINES:
        hit = [r for r in rows if (r["impl"], r["N"], r["d"], r["dtype"], r["entity_frac"], r["ablation"])
               == (impl, n, d, dtype, frac, ablation)]
        if not ON_GPU or not hit:
            value, verdict = "not measured", "-"
        elif hit[0]["status"] != "ok":
            value, verdict = hit[0]["status"], "FAIL"
        else:
            v = hit[0][metric]
            value = f"{v:.3f} {'ms' if metric == 'ms' else 'MiB'}"
            verdict = "PASS" if limit is None or v <= limit else "FAIL"
        target = "runs" if limit is None else f"<= {limit:g} {'ms' if metric == 'ms' else 'MiB'}"
        out.append(dict(what=f"d={d}, {dtype}, {frac:.0%} entities, {what}", target=target, value=value,
                        verdict=verdict))
    return out


def write_results(meta, checks, rows):
    device = meta["device"]
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") if ON_GPU else "cpu"
    heads = headlines(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"infonce_{slug}"
    write_json(stem.with_suffix(".json"), dict(meta, headlines=heads, checks=checks, runs=rows), indent=1)
    md = [f"# Semantic-class InfoNCE, forward + backward: {device}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; tau = {TAU}, {N_CLASSES} entity classes, "
          "random features. Medians" + (" of triton.testing.do_bench" if ON_GPU else " of 5 runs (wall clock)") + ". "
          "TFLOP/s counts 5·Nq·d·N (Nq = queries of a qualifying class); peak extra memory includes the input's "
          "gradient" + ("; fp32 runs use TF32." if ON_GPU else "."), ""]
    if not ON_GPU:
        md += ["No GPU in this run: all GPU figures are **not measured**. The kernel ran in the Triton "
               "interpreter, so its CPU times say nothing about its GPU speed; the CPU was shared "
               f"(load average {meta['load_average'][0]:.1f} on {os.cpu_count()} cores; torch ran one thread), so all "
               "times are noisy.", ""]
    md += ["## Headline targets (GPU)", "", "| target | limit | measured | verdict |", "|---|---|---|---|"]
    md += [f"| {h['what']} | {h['target']} | {h['value']} | {h['verdict']} |" for h in heads]
    md += ["", "## GPU correctness vs float64", ""]
    md += [f"{sum(c['ok'] for c in checks)}/{len(checks)} passed; errors and bounds in the JSON."] if checks else \
          ["not measured"]
    md += ["", "## Runs", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += [fmt_row(r) for r in rows]
    write_text(stem.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md[md.index("## Headline targets (GPU)"):md.index("## Runs")]))
    print(f"wrote {stem}.json and {stem}.md")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="GPU correctness checks only (prints, writes nothing)")
    ap.add_argument("--bench", action="store_true", help="benchmark only")
    ap.add_argument("--budget", type=float, default=270.0,
                    help="seconds (checks included) after which the remaining runs are skipped")
    args = ap.parse_args()
    deadline = time.time() + args.budget
    if args.check and not ON_GPU:
        sys.exit("--check needs a GPU")
    device = torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), tau=TAU,
                entity_classes=N_CLASSES)
    if not ON_GPU:
        torch.set_num_threads(1)  # on a shared CPU, two spinning OpenMP threads made small ops 100x slower
        meta.update(load_average=os.getloadavg(), torch_threads=1)
    print(json.dumps(meta))
    checks = check() if ON_GPU and not args.bench else []
    if not args.check:
        print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
        write_results(meta, checks, bench(deadline))
    if not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
