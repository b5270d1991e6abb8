"""The machine module: how many torch threads ``run.threads=auto`` takes, and process settings (each in a
fresh interpreter: they are process-wide)."""

import os
import platform
import subprocess
import sys

import pytest

from nerco_dist.machine import auto_threads, auto_threads_here


@pytest.mark.parametrize("cores, load, ranks, threads", [
    (16, 0.0, 2, 8),  # an idle node, its cores shared by two ranks
    (16, 0.0, 1, 16),
    (16, 3.6, 2, 6),  # 4 cores busy: 12 free for the two ranks
    (16, 2.5, 2, 6),  # half a core busy counts as busy
    (2, 2.1, 1, 1),  # every core busy already: one thread, never 0
    (2, 1.9, 1, 1),
    (2, 0.0, 4, 1),  # more ranks than cores
    (1, 0.0, 1, 1),
])
def test_auto_threads_are_the_free_cores_shared_by_the_ranks_of_the_node(cores, load, ranks, threads):
    assert auto_threads(cores, load, ranks) == threads


@pytest.mark.parametrize("env, ranks", [({}, 1), ({"LOCAL_WORLD_SIZE": "2"}, 2), ({"LOCAL_SIZE": "4"}, 4)])
def test_auto_threads_here_reads_the_cores_this_process_may_use_the_load_and_the_launcher(monkeypatch, env, ranks):
    """8 of a 16-core machine's cores, the machine's load 4.0 (2.0 of it on those 8 cores)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0, 0.0, 0.0))
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    threads, why = auto_threads_here()
    assert threads == 6 // ranks
    assert why == f"8 cores, 2.0 busy, {ranks} rank{'' if ranks == 1 else 's'} on this node"

STEPS = """
import resource, torch
from nerco_dist.machine import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
for step in range(120):  # a step's large tensors: several alive at once, their sizes changing with the batch
    if step == 40:
        warm = faults()
    alive = [torch.ones((1 + (step * 7 + k * 3) % 11) << 19) for k in range(4)]  # 2..22 MiB each
    del alive
print(kept, warm - start, faults() - warm)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
@pytest.mark.parametrize("run", [1, 2])
def test_freed_memory_is_reused_without_page_faults(run):
    """The first steps fault the blocks in (4 x 22 MiB = 22,528 pages at the peak, plus what fragmentation adds)
    and the 80 later steps reuse them: at most a quarter of one peak's pages in all, where mapping them anew
    each step would fault about 80 peaks' worth. The exact counts move with the heap's layout (in CI: 32,267
    and 1,024). glibc's own default is not compared: its dynamic mmap threshold makes its count vary from run
    to run (here 0 to 100,000 faults over the same later steps), so one run of it proves nothing."""
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True).stdout.split()
    kept, warming, later = out[0], int(out[1]), int(out[2])
    peak = 4 * 22 * 256
    assert kept == "True"
    assert warming <= 1.5 * peak + 2000 and later <= peak / 4, (warming, later)



DENORMALS = """
import torch
from nerco_dist.config import load_config
from nerco_dist.train.run import TrainingRun
cfg = load_config({tiny!r}, ["run.flush_denormals={flush}", "run.threads=2", "run.out_dir={out}"], data_root={root!r})
TrainingRun.start(cfg)  # sets the flag before torch's threads start: they inherit it
tiny = torch.finfo(torch.float32).tiny
products = torch.full((1 << 20,), tiny / 4) * 1.0  # shared by the 2 threads
param = torch.nn.Parameter(torch.ones(1000, 8))
opt = torch.optim.AdamW([param], lr=1e-3)
for step in range(1200):  # rows 10.. get a gradient at step 0 only
    param.grad = torch.zeros_like(param)
    param.grad[: 10 if step else 1000] = 1.0
    opt.step()
moment = opt.state[param]["exp_avg"][10:]
print(int((products != 0).sum()), int(((moment != 0) & (moment.abs() < tiny)).sum()))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 FTZ/DAZ")
@pytest.mark.parametrize("flush", [True, False])
def test_a_training_process_flushes_denormals_in_every_thread(tmp_path, data_root, flush):
    """By hand: a row's first moment after its one gradient is 0.1 and then 0.1 * 0.9^t, below float32's
    smallest normal after 805 steps; with gradual underflow it then sticks at the smallest denormal (0.9 of it
    rounds back up), so at step 1200 all 990 x 8 entries are denormal. Flushed, they are 0, and so is a
    product of denormals computed by torch's worker threads."""
    from .conftest import TINY

    script = DENORMALS.format(tiny=str(TINY), flush=str(flush).lower(), out=tmp_path / "run", root=str(data_root))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    nonzero_products, denormal_moments = int(out[0]), int(out[1])
    assert (nonzero_products, denormal_moments) == ((0, 0) if flush else (1 << 20, 990 * 8))
