"""The CRF (torch path, and Triton kernels in the interpreter) against pytorch-crf and brute-force enumeration."""

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
from torchcrf import CRF as RefCRF

from nerco_dist.kernels.crf import NEG, AllowedTransitions, CRF
from nerco_dist.model.crf import bio_allowed_transitions, build_crf

pytestmark = pytest.mark.filterwarnings("ignore:where received a uint8 condition:UserWarning")  # pytorch-crf

BACKENDS = ["torch", "triton"]
REDUCTIONS = ["none", "sum", "mean", "token_mean"]
# (batch, length, tags): length-1 sequences, lengths and tag counts that are not powers of two, up to 40 tags
SHAPES = [(1, 1, 1), (3, 1, 4), (4, 7, 5), (5, 9, 17), (2, 13, 40), (3, 6, 2)]
MASKS = ["none", "full", "random", "shortest"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_crf(num_tags, backend, allowed=None, batch_first=True, seed=0):
    """Our CRF with parameters of order one (pytorch-crf's default init is too flat to test much)."""
    crf = CRF(num_tags, batch_first=batch_first, allowed=allowed, backend=backend)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return crf


def reference(crf):
    """pytorch-crf in float64, loaded from our state dict."""
    ref = RefCRF(crf.num_tags, batch_first=crf.batch_first)
    ref.load_state_dict(crf.state_dict())
    return ref.double()


def random_batch(B, L, T, mask_kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    em = 2 * torch.randn(B, L, T, generator=g)
    tags = torch.randint(0, T, (B, L), generator=g)
    if mask_kind == "none":
        return em, tags, None
    lengths = {"full": torch.full((B,), L), "shortest": torch.ones(B, dtype=torch.long),
               "random": torch.randint(1, L + 1, (B,), generator=g)}[mask_kind]
    return em, tags, torch.arange(L) < lengths[:, None]


def path_scores(paths, em, start, end, trans):
    """Scores (P,) of the paths (P, n) over one sequence's emissions (n, T)."""
    n = paths.shape[1]
    return (start[paths[:, 0]] + end[paths[:, -1]] + em[torch.arange(n), paths].sum(1)
            + trans[paths[:, :-1], paths[:, 1:]].sum(1))


def enumerate_paths(T, n, allowed=None):
    paths = torch.tensor(list(itertools.product(range(T), repeat=n)), dtype=torch.long)
    if allowed is not None:
        ok = allowed.start[paths[:, 0]] & allowed.end[paths[:, -1]]
        ok &= allowed.transitions[paths[:, :-1], paths[:, 1:]].all(1)
        paths = paths[ok]
    return paths


def check_path_allowed(path, allowed):
    assert allowed.start[path[0]] and allowed.end[path[-1]]
    assert all(allowed.transitions[a, b] for a, b in zip(path, path[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_likelihood_gradients_and_decode_match_pytorch_crf(backend, shape, mask_kind):
    B, L, T = shape
    crf = make_crf(T, backend)
    ref = reference(crf)
    em, tags, mask = random_batch(B, L, T, mask_kind, seed=sum(shape))
    for reduction in REDUCTIONS:
        torch.testing.assert_close(crf(em, tags, mask, reduction=reduction).double(),
                                   ref(em.double(), tags, mask, reduction=reduction), rtol=1e-5, atol=1e-4)

    weights = torch.randn(B, generator=torch.Generator().manual_seed(1))  # a non-uniform upstream gradient
    em_ours, em_ref = em.clone().requires_grad_(), em.double().requires_grad_()
    (crf(em_ours, tags, mask, reduction="none") * weights).sum().backward()
    (ref(em_ref, tags, mask, reduction="none") * weights.double()).sum().backward()
    torch.testing.assert_close(em_ours.grad.double(), em_ref.grad, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(crf.parameters(), ref.parameters()):  # pytorch-crf leaves unused transitions at None
        expected = torch.zeros_like(theirs) if theirs.grad is None else theirs.grad
        torch.testing.assert_close(ours.grad.double(), expected, rtol=1e-4, atol=1e-5)

    paths = crf.decode(em, mask)
    assert paths == ref.decode(em.double(), mask)
    padded = crf.decode_padded(em, mask, pad=-7)
    lengths = [len(p) for p in paths]
    assert padded.shape == (B, L) and padded.dtype == torch.long
    assert padded.tolist() == [p + [-7] * (L - n) for p, n in zip(paths, lengths)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("constrained", [False, True])
def test_brute_force(backend, constrained):
    """log-likelihood and Viterbi path against all paths (only the allowed ones when constrained), float64."""
    g = torch.Generator().manual_seed(3)
    for T, L in [(1, 3), (2, 4), (3, 1), (3, 5), (4, 3)]:
        allowed = None
        if constrained:  # random constraints that keep tag 0 as a way through
            allowed = AllowedTransitions(torch.rand(T, generator=g) < 0.6, torch.rand(T, generator=g) < 0.6,
                                         torch.rand(T, T, generator=g) < 0.6)
            allowed.start[0] = allowed.end[0] = allowed.transitions[0, 0] = True
        crf = make_crf(T, backend, allowed=allowed, seed=T * 10 + L)
        em, tags, mask = random_batch(3, L, T, "random", seed=T + L)
        start, end, trans = (p.detach().double() for p in crf.parameters())
        expected, best = [], []
        for b, n in enumerate(mask.sum(1).tolist()):
            paths = enumerate_paths(T, n, allowed)
            scores = path_scores(paths, em[b, :n].double(), start, end, trans)
            k = torch.randint(len(paths), (1,), generator=g).item()
            tags[b, :n] = paths[k]
            expected.append(scores[k] - torch.logsumexp(scores, 0))
            best.append(paths[scores.argmax()].tolist())
        torch.testing.assert_close(crf(em, tags, mask, reduction="none").double(), torch.stack(expected),
                                   rtol=1e-5, atol=1e-4)
        assert crf.decode(em, mask) == best


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["BIO", "BIOES"])
def test_constrained_decode_and_likelihood_on_tag_schemes(backend, scheme):
    types = ["PER", "LOC", "ORG"]
    prefixes = "BI" if scheme == "BIO" else "BIES"
    labels = ["O"] + [f"{p}-{t}" for t in types for p in prefixes]
    allowed = bio_allowed_transitions(labels)
    T = len(labels)
    crf = make_crf(T, backend, allowed=allowed, seed=5)
    with torch.no_grad():  # push towards ill-formed paths: favour every forbidden transition
        crf.transitions.add_(3 * (~allowed.transitions).float())
        crf.start_transitions.add_(3 * (~allowed.start).float())
    em, _, mask = random_batch(6, 11, T, "random", seed=6)
    paths = crf.decode(em, mask)
    for path in paths:
        check_path_allowed(path, allowed)
    # the likelihood is that of a CRF over the allowed paths only: the torch and Triton paths agree, the
    # decoded paths are valid gold sequences, and their probabilities sum to at most one
    tags = crf.decode_padded(em, mask, pad=0)
    llh = crf(em, tags, mask, reduction="none")
    other = make_crf(T, "torch" if backend == "triton" else "triton", allowed=allowed)
    other.load_state_dict(crf.state_dict())
    torch.testing.assert_close(other(em, tags, mask, reduction="none"), llh, rtol=1e-5, atol=1e-4)
    assert (llh < 0).all() and (llh > -50).all()
    ill_formed = tags.clone()
    ill_formed[:, 0] = labels.index("I-PER") if scheme == "BIO" else labels.index("E-PER")
    assert (crf(em, ill_formed, mask, reduction="none") < NEG / 2).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_allowed_path_stays_finite(backend):
    """Constraints that leave a sequence no path give a very negative, finite likelihood, not NaN/inf."""
    T = 3
    allowed = AllowedTransitions(torch.tensor([True, False, False]), torch.tensor([False, True, False]),
                                 torch.zeros(T, T, dtype=torch.bool))
    crf = make_crf(T, backend, allowed=allowed)
    em, tags, mask = random_batch(2, 3, T, "random", seed=12)
    em.requires_grad_()
    llh = crf(em, tags, mask, reduction="none")
    assert torch.isfinite(llh).all() and (llh < 0).all()
    llh.sum().backward()
    assert torch.isfinite(em.grad).all() and all(torch.isfinite(p.grad).all() for p in crf.parameters())
    assert [len(p) for p in crf.decode(em, mask)] == mask.sum(1).tolist()


def test_triton_host_functions_run_without_autograd():
    """crf_forward and crf_backward called directly under no_grad: the log-likelihood of brute-force
    enumeration (float64) and its gradients, weighted by grad_llh, in emissions (zero past each length),
    start, end and transitions."""
    from nerco_dist.kernels.crf_triton import crf_backward, crf_forward

    B, L, T = 3, 4, 3
    em, tags, _ = random_batch(B, L, T, seed=31)
    lengths = torch.tensor([4, 2, 3], dtype=torch.int32)
    g = torch.Generator().manual_seed(32)
    start, end, trans = (torch.randn(shape, generator=g) for shape in ((T,), (T,), (T, T)))
    grad_llh = torch.tensor([1.0, -0.5, 2.0])
    with torch.no_grad():
        llh, alpha, dlog = crf_forward(em, tags, lengths, start, end, trans)
        grads = crf_backward(grad_llh, em, tags, lengths, end, trans, alpha, dlog)
    assert llh.grad_fn is None and all(x.grad_fn is None for x in grads)

    ref_in = [x.double().requires_grad_() for x in (em, start, end, trans)]
    r_em, r_start, r_end, r_trans = ref_in
    ref_llh = []
    for b in range(B):
        n = int(lengths[b])
        scores = path_scores(enumerate_paths(T, n), r_em[b, :n], r_start, r_end, r_trans)  # (T^n,)
        gold = path_scores(tags[b, :n].unsqueeze(0), r_em[b, :n], r_start, r_end, r_trans)[0]
        ref_llh.append(gold - torch.logsumexp(scores, 0))
    ref_llh = torch.stack(ref_llh)
    ref_grads = torch.autograd.grad((ref_llh * grad_llh.double()).sum(), ref_in)
    torch.testing.assert_close(llh.double(), ref_llh.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert grads[0][1, 2:].abs().max() == 0  # past the second sequence's length


def test_bio_allowed_transitions():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    a = bio_allowed_transitions(labels)
    assert a.start.tolist() == [True, True, False, True, False]
    assert a.end.all()
    O, BP, IP, BL, IL = range(5)
    forbidden = {(O, IP), (O, IL), (BP, IL), (IP, IL), (BL, IP), (IL, IP)}
    for i, j in itertools.product(range(5), repeat=2):
        assert a.transitions[i, j].item() == ((i, j) not in forbidden), (labels[i], labels[j])


def test_bioes_allowed_transitions():
    labels = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "E-LOC"]
    a = bio_allowed_transitions(labels)
    assert a.start.tolist() == [True, True, False, False, True, True, False]
    assert a.end.tolist() == [True, False, False, True, True, False, True]
    after = {label: {labels[j] for j in range(len(labels)) if a.transitions[i, j]} for i, label in enumerate(labels)}
    outside = {"O", "B-PER", "S-PER", "B-LOC"}
    assert after["O"] == after["E-PER"] == after["S-PER"] == after["E-LOC"] == outside
    assert after["B-PER"] == after["I-PER"] == {"I-PER", "E-PER"}
    assert after["B-LOC"] == {"E-LOC"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_emissions(dtype):
    """fp16/bf16 emissions, fp32 accumulation: the error against float64 on the rounded inputs is that of
    pytorch-crf fed the same low-precision emissions."""
    B, L, T = 3, 10, 7
    crf = make_crf(T, "triton")
    ref = reference(crf)
    em, tags, mask = random_batch(B, L, T, "random", seed=8)
    em = em.to(dtype)
    fp32_ref = RefCRF(T, batch_first=True)
    fp32_ref.load_state_dict(crf.state_dict())

    em_ours, em_ref, em_low = (em.clone().requires_grad_(), em.double().requires_grad_(),
                               em.clone().requires_grad_())
    llh_ours = crf(em_ours, tags, mask, reduction="none")
    llh_ref = ref(em_ref, tags, mask, reduction="none")
    llh_low = fp32_ref(em_low, tags, mask, reduction="none")
    assert llh_ours.dtype == torch.float32
    for out, x in ((llh_ours, em_ours), (llh_ref, em_ref), (llh_low, em_low)):
        out.sum().backward()
    assert em_ours.grad.dtype == dtype
    err_ours = (llh_ours.double() - llh_ref).abs().max()
    err_low = (llh_low.double() - llh_ref).abs().max()
    assert err_ours <= 2 * err_low + 1e-4
    grad_err_ours = (em_ours.grad.double() - em_ref.grad).abs().max()
    grad_err_low = (em_low.grad.double() - em_ref.grad).abs().max()
    assert grad_err_ours <= 2 * grad_err_low + 1e-5
    assert crf.decode(em, mask) == ref.decode(em.double(), mask)


def test_triton_long_sequence_stays_accurate():
    """Long sequences: log Z is in the thousands, the scaled recursions keep the marginals accurate."""
    B, L, T = 2, 200, 6
    crf = make_crf(T, "triton")
    ref = reference(crf)
    em, tags, _ = random_batch(B, L, T, "none", seed=9)
    em = 3 * em
    mask = torch.arange(L) < torch.tensor([L, 157])[:, None]
    em_ours, em_ref = em.clone().requires_grad_(), em.double().requires_grad_()
    llh = crf(em_ours, tags, mask, reduction="none")
    expected = ref(em_ref, tags, mask, reduction="none")
    torch.testing.assert_close(llh.double(), expected, rtol=1e-6, atol=0.0)
    llh.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(em_ours.grad.double(), em_ref.grad, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(crf.transitions.grad.double(), ref.transitions.grad, rtol=1e-5, atol=1e-4)
    assert crf.decode(em, mask) == ref.decode(em.double(), mask)


def test_triton_128_tags():
    B, L, T = 2, 3, 128
    crf = make_crf(T, "triton")
    ref = reference(crf)
    em, tags, mask = random_batch(B, L, T, "random", seed=10)
    torch.testing.assert_close(crf(em, tags, mask).double(), ref(em.double(), tags, mask), rtol=1e-5, atol=1e-4)
    assert crf.decode(em, mask) == ref.decode(em.double(), mask)
    with pytest.raises(ValueError, match="at most 128 tags"):
        make_crf(T + 1, "triton").decode(torch.randn(1, 2, T + 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_first_layout(backend):
    B, L, T = 3, 5, 4
    crf = make_crf(T, backend, batch_first=False)
    ref = reference(crf)
    em, tags, mask = random_batch(B, L, T, "random", seed=11)
    em, tags, mask = em.transpose(0, 1), tags.t(), mask.t()
    em_ours, em_ref = em.clone().requires_grad_(), em.double().requires_grad_()
    llh = crf(em_ours, tags, mask, reduction="token_mean")
    expected = ref(em_ref, tags, mask, reduction="token_mean")
    torch.testing.assert_close(llh.double(), expected, rtol=1e-5, atol=1e-5)
    llh.backward()
    expected.backward()
    torch.testing.assert_close(em_ours.grad.double(), em_ref.grad, rtol=1e-4, atol=1e-6)
    assert crf.decode(em, mask) == ref.decode(em.double(), mask)
    assert crf.decode_padded(em, mask).shape == (L, B)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_validation(backend):
    crf = make_crf(3, backend)
    em, tags, mask = random_batch(2, 4, 3, "full")
    mask[1, 0] = False
    with pytest.raises(ValueError, match="first timestep"):
        crf(em, tags, mask)
    with pytest.raises(ValueError, match="first timestep"):
        crf.decode(em, mask)
    mask[1] = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match="prefix"):
        crf(em, tags, mask)
    with pytest.raises(ValueError, match="invalid reduction"):
        crf(em, tags, reduction="max")


def test_state_dict_loads_both_ways():
    T = 6
    ours = make_crf(T, "torch", allowed=bio_allowed_transitions(["O", "B-A", "I-A", "B-B", "I-B", "B-C"]))
    theirs = RefCRF(T, batch_first=True)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    fresh = CRF(T, batch_first=True)
    theirs = reference(make_crf(T, "torch", seed=4)).float()
    fresh.load_state_dict(theirs.state_dict())
    for a, b in zip(fresh.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_build_crf_dispatch():
    crf = build_crf(5)
    assert isinstance(crf, CRF) and crf.batch_first and crf.backend == "auto"
    assert not crf._use_triton(torch.zeros(1, 1, 5))  # CPU tensors take the torch path
    allowed = bio_allowed_transitions(["O", "B-X", "I-X"])
    assert build_crf(3, allowed=allowed).constrained


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        CRF(3, backend="triton").decode(torch.randn(1, 2, 3))


WITHOUT_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # every import of triton fails from here on
    import torch
    from nerco_dist.model.crf import bio_allowed_transitions, build_crf

    crf = build_crf(3, allowed=bio_allowed_transitions(["O", "B-X", "I-X"]))
    em = torch.randn(2, 4, 3, requires_grad=True)
    crf(em, torch.zeros(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])).backward()
    assert torch.isfinite(em.grad).all() and em.grad.abs().max() > 0
    paths = crf.decode(em, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert [len(p) for p in paths] == [4, 2] and all(p[0] != 2 for p in paths), paths
""")


def test_cpu_crf_needs_no_triton():
    """The torch path imports and runs (likelihood, gradients, decoding) where Triton is not installed."""
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
