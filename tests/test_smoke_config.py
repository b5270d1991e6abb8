"""The shipped smoke config is a smoke config: trained as it is, through the CLI, it learns visibly and soon.

Its first version trained one epoch and ended with an all-zero table, which reads as a broken install."""

import re
import subprocess
import sys
import time

from .conftest import TINY

MIN_TEST_F1 = 50.0
MAX_WALL_S = 60.0  # generous: it takes about 10 s on a loaded 2-core machine


def test_tiny_config_as_shipped_learns_within_a_minute(tmp_path, data_root):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "train", str(TINY), "--data-root", str(data_root),
                           "--set", f"run.out_dir={tmp_path}", "--set", "run.threads=1"],
                          capture_output=True, text=True, timeout=300)
    wall_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = re.search(r"^test P [\d.]+ R [\d.]+ F1 ([\d.]+) ", proc.stdout, re.MULTILINE)
    assert printed, proc.stdout[-3000:]
    assert float(printed[1]) >= MIN_TEST_F1 and wall_s < MAX_WALL_S, (printed[0], f"{wall_s:.1f} s")
