"""Fused InfoNCE kernel (Triton interpreter on CPU) against the float64 dense path.

The dense path is itself checked against a literal transcription of the formula in test_losses.py.
Interpreter blocks are 16 x 16, so the sizes below cover partial tiles, classes spanning several blocks
(the negative sweep's skip) and blocks holding several classes.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nerco_dist.kernels import select_queries, semantic_infonce
from nerco_dist.kernels.infonce import infonce_backward, infonce_forward, sort_by_class
from nerco_dist.losses import semantic_class_infonce, torch_infonce

F64 = torch.float64


def batch(n, d, n_classes, o_frac, seed, big_class=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))  # norms vary
    labels = torch.randint(1, n_classes + 1, (n,), generator=g)
    labels[torch.rand(n, generator=g) < big_class] = 1
    labels[torch.rand(n, generator=g) < o_frac] = 0
    return x, labels


def run(fn, queries, keys, go):
    """Loss and gradients of queries and keys (keys None: the queries are the keys)."""
    q = queries.clone().requires_grad_()
    k = None if keys is None else keys.clone().requires_grad_()
    loss = fn(q, k)
    loss.backward(go)
    return loss.detach(), q.grad, None if k is None else k.grad


def selection_for(labels, key_labels=None, self_index=None, ablation=False):
    """The queries as semantic_class_infonce selects them (no key labels: the queries are the keys)."""
    if key_labels is None:
        key_labels, self_index = labels, torch.arange(len(labels), device=labels.device)
    elif self_index is None:
        self_index = torch.full_like(labels, -1)
    num_classes = int(torch.cat([labels, key_labels]).max()) + 1
    return select_queries(labels, key_labels, self_index, num_classes, non_entity_queries=ablation)


def compare(labels, queries, keys=None, key_labels=None, self_index=None, ablation=False, tau=0.07,
            splits=None, dtype=torch.float32, precision="ieee", seed=0, tol=None):
    """Kernel in ``dtype`` vs float64 dense on the same (rounded) inputs. The bound on each output's error is
    2 * (error of the dense torch path run in the same precision; none for fp32 with IEEE products) + atol +
    rtol * (largest reference entry), with ``tol`` = (rtol, atol), by default (2e-5, 2e-5) for fp32 IEEE
    and (0, 1e-3) otherwise."""
    go = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=F64).to(queries.device) * 3 + 0.1
    queries = queries.to(dtype)
    keys = None if keys is None else keys.to(dtype)
    selection = selection_for(labels, key_labels, self_index, ablation)

    def kernel(q, k):
        return semantic_infonce(q, q if k is None else k, selection, tau, input_precision=precision, splits=splits)

    def dense(compute_dtype):
        return lambda q, k: torch_infonce(q, q if k is None else k, selection, tau, compute_dtype=compute_dtype)

    out = run(kernel, queries, keys, go.float())
    ref = run(dense(F64), queries.double(), None if keys is None else keys.double(), go)
    assert out[0].dtype == torch.float32 and out[1].dtype == dtype
    ieee = dtype == torch.float32 and precision == "ieee"
    if ieee:
        base = [torch.zeros((), device=queries.device) for _ in out]
    else:
        same = run(dense(dtype), queries, keys, go.to(dtype))
        base = [None if s is None else (s.double() - r).abs().max() for s, r in zip(same, ref)]
    rtol, atol = tol or ((2e-5, 2e-5) if ieee else (0.0, 1e-3))
    for name, o, r, b in zip(("loss", "dq", "dk"), out, ref, base):
        if r is None:
            continue
        err = (o.double() - r).abs().max()
        bound = 2 * b + atol + rtol * r.abs().max()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (dense same-dtype error {b:.3g})"
    return out


@pytest.mark.parametrize("n,d,n_classes,o_frac,big_class,splits,seed", [
    (37, 24, 4, 0.5, 0.0, None, 0),  # d = 16 + 8 (second column piece, masked)
    (70, 40, 5, 0.6, 0.3, 3, 1),  # split sweeps, a class spanning blocks
    (50, 16, 2, 0.2, 0.5, 2, 2),  # d a power of two: one column piece
    (33, 5, 3, 0.3, 0.0, None, 3),  # d < 16
    (21, 300, 3, 0.4, 0.0, 4, 4),  # d = 256 + 44, more splits than column blocks
    (64, 32, 1, 0.5, 0.0, None, 5),  # one entity class filling whole blocks, sizes multiples of 16
])
def test_fp32(n, d, n_classes, o_frac, big_class, splits, seed):
    x, labels = batch(n, d, n_classes, o_frac, seed, big_class)
    compare(labels, x, splits=splits, seed=seed)


@pytest.mark.parametrize("splits", [None, 3])
def test_keys_distinct_from_queries(splits):
    keys, key_labels = batch(83, 20, 4, 0.5, 6, big_class=0.3)
    rows = torch.randperm(83, generator=torch.Generator().manual_seed(6))[:29]
    # not parallel to their own key rows, so that leaving the self pair out changes the gradients
    queries = keys[rows] * 1.5 + torch.randn(29, 20, generator=torch.Generator().manual_seed(7))
    self_index = rows.clone()
    self_index[[2, 7]] = -1  # queries whose own row is not among the keys
    out = compare(key_labels[rows], queries, keys, key_labels, self_index, splits=splits, seed=7)
    assert out[2].abs().max() > 0


def test_keys_without_self_rows():
    keys, key_labels = batch(45, 12, 3, 0.4, 8)
    queries, labels = batch(19, 12, 3, 0.4, 9)
    compare(labels, queries, keys, key_labels)


@pytest.mark.parametrize("splits", [None, 2])
def test_non_entity_queries_ablation(splits):
    x, labels = batch(90, 24, 3, 0.7, 10)  # O spans several whole key blocks: the negative sweep skips them
    out = compare(labels, x, ablation=True, splits=splits, seed=10)
    assert out[0] > compare(labels, x, seed=10)[0]


def test_singletons_and_absent_classes():
    x, _ = batch(40, 10, 1, 0.0, 11)
    labels = torch.tensor([0] * 20 + [3, 3, 3, 7, 9, 9, 12, 3, 0, 0] + [0] * 9 + [5])  # 7, 12, 5 singletons
    compare(labels, x, tau=0.2)


@pytest.mark.parametrize("labels", [
    torch.zeros(40, dtype=torch.long),  # all non-entity
    torch.full((40,), 4),  # one entity class, no negatives
    torch.tensor([0] * 39 + [2]),  # one entity token
    torch.arange(40),  # every class a singleton
])
@pytest.mark.parametrize("ablation", [False, True])
def test_no_qualifying_class(labels, ablation):
    x = torch.randn(40, 8, requires_grad=True)
    loss = semantic_class_infonce(x, labels, 0.07, non_entity_queries=ablation, backend="triton")
    if ablation and labels[-1] == 2:  # O queries qualify, with the entity token as negative
        assert loss.item() > 0
        return
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("case", ["batch", "keys", "ablation"])
def test_fp16_within_torch_error(case):
    x, labels = batch(56, 40, 4, 0.5, 12, big_class=0.2)
    if case == "keys":
        rows = torch.arange(3, 56, 2)
        compare(labels[rows], x[rows] * 0.5, x, labels, rows, dtype=torch.float16, seed=12)
    else:
        compare(labels, x, ablation=case == "ablation", dtype=torch.float16, seed=13)


def test_dispatch_forces_kernel_on_cpu():
    x, labels = batch(30, 16, 3, 0.4, 14)
    torch.testing.assert_close(semantic_class_infonce(x, labels, 0.07, backend="triton"),
                               semantic_class_infonce(x, labels, 0.07, backend="torch"), rtol=1e-5, atol=1e-5)


def test_rejects_unsupported_inputs():
    labels = torch.tensor([0, 1, 1, 0])
    with pytest.raises(TypeError):
        semantic_class_infonce(torch.randn(4, 3, dtype=F64), labels, 0.07, backend="triton")
    with pytest.raises(ValueError):
        semantic_class_infonce(torch.randn(4, 1025), labels, 0.07, backend="triton")


def test_gradient_of_one_side_only():
    keys, key_labels = batch(50, 12, 3, 0.5, 15)
    rows = torch.arange(0, 50, 3)
    queries = keys[rows] + 0.1

    def both(q, k, backend):
        return semantic_class_infonce(q, key_labels[rows], 0.07, keys=k, key_labels=key_labels, self_index=rows,
                                      backend=backend)

    for q_grad in (True, False):
        q, k = queries.clone().requires_grad_(q_grad), keys.clone().requires_grad_(not q_grad)
        both(q, k, "triton").backward()
        q64, k64 = queries.double().requires_grad_(q_grad), keys.double().requires_grad_(not q_grad)
        both(q64, k64, "torch").backward()
        got, want = (q.grad, q64.grad) if q_grad else (k.grad, k64.grad)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        assert (k.grad if q_grad else q.grad) is None


@pytest.mark.parametrize("shared", [False, True])
def test_host_functions_run_without_autograd(shared):
    """infonce_forward and infonce_backward called directly under no_grad (no graph anywhere): the loss and
    the gradients of the float64 dense path; with one tensor on both sides, one gradient, returned as the
    keys'."""
    keys, key_labels = batch(61, 18, 3, 0.4, 21)
    if shared:
        queries, labels, self_index = keys, key_labels, torch.arange(61)
    else:
        queries, labels = batch(37, 18, 3, 0.4, 22)
        self_index = torch.full_like(labels, -1)
    selection = selection_for(labels, key_labels, self_index)
    go = torch.tensor(1.7, dtype=F64)
    with torch.no_grad():
        loss, state = infonce_forward(queries, keys, sort_by_class(selection), 0.07, "ieee")
        dq, dk = infonce_backward(go.float(), queries, keys if not shared else queries, state)
    assert not loss.requires_grad and loss.grad_fn is None

    def dense(q, k):
        return torch_infonce(q, q if k is None else k, selection, 0.07, compute_dtype=F64)

    ref_loss, ref_dq, ref_dk = run(dense, queries.double(), None if shared else keys.double(), go)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    if shared:
        assert dq is None
        torch.testing.assert_close(dk.double(), ref_dq, rtol=2e-5, atol=2e-5)
    else:
        torch.testing.assert_close(dq.double(), ref_dq, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(dk.double(), ref_dk, rtol=2e-5, atol=2e-5)


HOPPER_COMPILE = textwrap.dedent("""
    import re
    import subprocess
    import sys
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        sys.exit(3)
    import nerco_dist.kernels.infonce as m

    def spill_bytes(ptx):  # spill stores of the PTX assembled for sm_90a, by ptxas -v with Triton's flags
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            log = subprocess.run([get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name,
                                  "-o", "/dev/null"], capture_output=True, text=True, check=True).stderr
        return int(re.search(r"(\\d+) bytes spill stores", log).group(1))

    INT_PTRS = ("q_idx", "k_idx", "x_idx", "y_idx", "q_cls", "k_cls", "x_cls", "y_cls", "k_start", "k_end",
                "y_start", "y_end", "q_self")
    for dtype, elem, d, precision in (("bf16", 2, 160, "tf32"), ("fp32", 4, 40, "tf32"), ("fp32", 4, 160, "ieee"),
                                      ("fp32", 4, 768, "ieee")):
        d_a, d_b, fwd, bwd = m._config(d, elem, precision, interpret=False)
        for fn, (r, c, warps, stages), extra in ((m._lse_kernel, fwd, {}), (m._pos_kernel, fwd, {}),
                                                 (m._bwd_kernel, bwd, {"QUERY_ROWS": True}),
                                                 (m._bwd_kernel, bwd, {"QUERY_ROWS": False})):
            blocks = ("BLOCK_M", "BLOCK_N") if "BLOCK_M" in fn.arg_names else ("BLOCK_R", "BLOCK_C")
            const = dict(D_A=d_a, D_B=d_b, PRECISION=precision, **dict(zip(blocks, (r, c))), **extra)
            sig = {}
            for name in fn.arg_names:
                if name in const:
                    sig[name] = "constexpr"
                elif name in INT_PTRS:
                    sig[name] = "*i32"
                elif name in ("X", "Y", "Q", "K", "DX_PART"):
                    sig[name] = "*" + dtype
                elif name.isupper() or name.endswith("_r") or name.endswith("_PART") or name == "q_weight":
                    sig[name] = "*fp32"
                else:
                    sig[name] = "fp32" if name in ("scale2", "inv_tau") else "i32"
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                     if sig[n].startswith("*") or n.startswith("stride")}
            k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            assert k.metadata.shared <= 227 * 1024, (fn.__name__, dtype, d, k.metadata.shared)
            spills = spill_bytes(k.asm["ptx"])
            assert fn is m._bwd_kernel or not spills, (fn.__name__, dtype, d, precision, "spills", spills)
            print(fn.__name__, dtype, d, precision, extra, "shared", k.metadata.shared, "spills", spills)
""")


def test_compiles_for_hopper():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (no GPU needed) with
    the GPU path's block sizes, and check that its shared memory fits an H100 and that the forward kernels
    do not spill registers (the backward spills a little at some sizes, the fp32 IEEE one at every
    configuration tried)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode == 3:
        pytest.skip("Triton's NVIDIA backend is not installed")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
