"""Process settings of the machine module, each in a fresh interpreter (they are process-wide)."""

import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, torch
from nerco_dist.machine import keep_freed_memory
kept = {call}
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(80):  # a step's large tensors: several alive at once, their sizes changing with the batch
    alive = [torch.ones((1 + (step * 7 + k * 3) % 11) << 19) for k in range(4)]  # 2..22 MiB each
    del alive
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_memory_is_reused_without_page_faults():
    def faults(call: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", STEPS.format(call=call)], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    _, default = faults("None")
    kept, tuned = faults("keep_freed_memory()")
    assert kept == "True"
    # the first steps map the blocks (4 x 22 MiB = 22,528 pages at most) and later ones reuse them; by
    # default, blocks over the threshold are mapped and unmapped again at every step
    assert tuned <= 4 * 22 * 256 + 2000 < default / 3, (default, tuned)
