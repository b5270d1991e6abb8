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
