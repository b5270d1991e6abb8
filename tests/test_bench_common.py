"""The benchmarks' throughput columns: TFLOP/s from an op's counted work and its measured time, the fraction
of the card's peak only where the peak is known, and the InfoNCE work count against a hand count."""

import pytest

from .conftest import script_module


@pytest.fixture(scope="module")
def common():
    return script_module("common")


def test_throughput_is_the_work_over_the_time_and_the_fraction_needs_a_known_peak(common):
    ms = {"fused": {"fwd": 2.0, "fwd+bwd": "OOM"}, "rows": {"fwd": 4.0, "select": 1.0}}
    flops = {"fwd": 4e12, "fwd+bwd": 16e12}
    rows = common.throughput(flops, ms, peak=1000.0)
    assert rows == {"fused": {"fwd": {"tflops": 2000.0, "fraction_of_peak": 2.0}},
                    "rows": {"fwd": {"tflops": 1000.0, "fraction_of_peak": 1.0}}}  # 4e12 / 2e-3 s = 2e15
    assert common.throughput(flops, ms, peak=None)["rows"]["fwd"] == {"tflops": 1000.0, "fraction_of_peak": None}
    assert common.peak_tflops("cpu", "bf16") is None


def test_infonce_work_counts_the_matrix_products():
    bench = script_module("bench_infonce")
    # 2 queries against 3 keys of 4 dims: the logits are 2*3 dot products of 4 multiply-adds = 48 FLOPs
    assert bench.infonce_flops(2, 3, 4) == {"fwd": 48.0, "fwd+bwd": 192.0}
