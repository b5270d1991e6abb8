"""Linear-chain CRF timing: the Triton kernels vs the vectorised torch path vs pytorch-crf.

    python3 benchmarks/bench_crf.py                  # GPU: realistic shapes
    python3 benchmarks/bench_crf.py --quick          # tiny shapes; on CPU the kernels run in the interpreter

Per (batch, length, tags): the mean log-likelihood forward and forward + backward (fp32 emissions, lengths
drawn in [L/2, L], the first sequence full) and Viterbi as lists (``decode``, what pytorch-crf offers) and as
one padded tensor (``decode_padded``). Speedups are against pytorch-crf (the torch path when it is not
installed) in the same run. Correctness lives in tests/test_crf.py.
"""

from __future__ import annotations

import sys

import torch

from common import Case, Target, parse_args, run_cases

GPU_CASES = [dict(batch=b, length=n, tags=t)
             for b, n, t in ((32, 128, 9), (32, 128, 33), (256, 128, 17), (64, 512, 17))]
QUICK_CASES = [dict(batch=2, length=8, tags=5), dict(batch=4, length=16, tags=9)]
TARGETS = (  # H100 goals from the issue
    Target(GPU_CASES[0], "triton", "nll fwd+bwd", "ms", 0.5),
    Target(GPU_CASES[0], "triton", "viterbi padded", "ms", 0.5),
    Target(GPU_CASES[3], "triton", "nll fwd+bwd", "ms", 2.0),
)


def pytorch_crf():
    """pytorch-crf's CRF class, or None where it is not installed (the bare GPU image)."""
    try:
        from torchcrf import CRF
    except ImportError:
        return None
    return CRF


def setup(case: dict, device: str) -> Case:
    """Random emissions, tags and ragged lengths, and one CRF per implementation with the same parameters."""
    from nerco_dist.kernels.crf import CRF

    B, L, T = case["batch"], case["length"], case["tags"]
    g = torch.Generator().manual_seed(0)
    emissions = (2 * torch.randn(B, L, T, generator=g)).to(device).requires_grad_()
    tags = torch.randint(0, T, (B, L), generator=g).to(device)
    lengths = torch.randint(max(1, L // 2), L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L) < lengths[:, None]).to(device)
    state = {"start_transitions": torch.randn(T, generator=g), "end_transitions": torch.randn(T, generator=g),
             "transitions": torch.randn(T, T, generator=g)}
    models = {} if pytorch_crf() is None else {"pytorch-crf": pytorch_crf()(T, batch_first=True)}
    models.update(torch=CRF(T, batch_first=True, backend="torch"), triton=CRF(T, batch_first=True, backend="triton"))
    fns = {}
    for impl, crf in models.items():
        crf.load_state_dict(state)
        crf.to(device)
        fns[impl, "nll fwd"] = lambda crf=crf: -crf(emissions, tags, mask, reduction="mean")
        fns[impl, "nll fwd+bwd"] = lambda crf=crf: nll_backward(crf, emissions, tags, mask)
        fns[impl, "viterbi"] = lambda crf=crf: crf.decode(emissions, mask)
        if isinstance(crf, CRF):
            fns[impl, "viterbi padded"] = lambda crf=crf: crf.decode_padded(emissions, mask)
    return Case({"tokens": int(lengths.sum())}, fns)


def nll_backward(crf, emissions, tags, mask):
    loss = -crf(emissions, tags, mask, reduction="mean")
    loss.backward()
    emissions.grad = None  # no accumulation across calls
    crf.zero_grad(set_to_none=True)
    return loss.detach()


def main() -> int:
    args = parse_args("crf", __doc__)
    baseline = "pytorch-crf" if pytorch_crf() is not None else "torch"
    run_cases(args, "crf", QUICK_CASES if args.quick else GPU_CASES, setup, baseline,
              settings={"emissions": "fp32", "lengths": "uniform in [L/2, L], the first sequence full"},
              targets=TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
