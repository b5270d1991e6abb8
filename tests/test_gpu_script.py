"""What can be checked of the one-call GPU run (benchmarks/gpu_all.sh, prepared by benchmarks/prepare_gpu.sh)
without a GPU: its limits and files, and its dry run's verdicts on stages stood in for by small scripts; CI runs
the whole script too, as `gpu_all.sh --dry-run` (.ci/run)."""

import os
import re
import shutil
import subprocess

from .conftest import REPO

GPU_ALL = REPO / "benchmarks" / "gpu_all.sh"
SCRIPTS = [GPU_ALL, REPO / "benchmarks" / "prepare_gpu.sh"]
DEVICE_LIMIT_S = 600  # the device tool's per-command limit
MAX_STAGES_S = 520  # what the stages may take of it, leaving time for the copy


def limits(script=GPU_ALL) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), "--limits"], capture_output=True, text=True, timeout=30)


def test_stages_run_in_order_of_value_and_their_limits_fit_the_device_call():
    result = limits()
    assert result.returncode == 0, result.stderr
    *stages, total = [line.split() for line in result.stdout.splitlines()]
    assert [name for name, _ in stages] == ["setup", "tests", "crf", "infonce", "train"]
    seconds = [int(s) for _, s in stages]
    assert all(s > 0 for s in seconds)
    assert total[:2] == ["total", str(sum(seconds))] and sum(seconds) <= MAX_STAGES_S < DEVICE_LIMIT_S


def test_script_refuses_limits_over_the_total(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    copy = tmp_path / "benchmarks" / "gpu_all.sh"
    text, n = re.subn(r"\[train\]=\d+", "[train]=600", GPU_ALL.read_text())
    assert n == 1
    copy.write_text(text)
    result = limits(copy)
    assert result.returncode == 2 and "over 520 s" in result.stderr


def test_results_are_copied_at_every_exit():
    text = GPU_ALL.read_text()
    assert re.search(r"^trap '[^']*\bcollect\b[^']*' EXIT$", text, re.M)
    assert re.search(r"^trap '.*exit \d+' INT TERM$", text, re.M)  # a signal exits, so the EXIT trap runs
    assert "TQDM_DISABLE=1" in text


def code(script) -> list[str]:
    """The script's lines without comments (nor the text after a comment sign that follows a space)."""
    return [re.sub(r"(^|\s)#.*", "", line) for line in script.read_text().splitlines()]


def test_gpu_scripts_call_python3_and_its_pip():
    for script in SCRIPTS:
        for n, line in enumerate(code(script), 1):
            assert not re.search(r"(?<![\w-])python(?![\w.-])", line), f"{script.name}:{n}: bare python: {line}"
            assert not re.search(r"(?<!-m )(?<![\w-])pip\b", line), f"{script.name}:{n}: bare pip: {line}"


def test_tests_stage_runs_every_module_with_gpu_tests():
    """The stage runs named modules (collecting all would import ones that need packages the image lacks)."""
    marker = re.compile(r"^\s*(@|pytestmark\s*=\s*)?pytest\.mark\.gpu\b", re.M)  # a decorator or a module's mark
    marked = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").glob("test_*.py") if marker.search(p.read_text())}
    stage = re.search(r"^stage_tests\(\) \{\n(.*?)^\}", GPU_ALL.read_text(), re.M | re.S).group(1)
    command = next(line for line in stage.splitlines() if "-m pytest" in line)
    assert marked and marked == set(re.findall(r"tests/test_\w+\.py", command))


def test_wheels_are_prepared_for_the_python_the_script_installs_them_on():
    version = [re.search(rf"^{name}=([\d.]+)", script.read_text(), re.M).group(1)
               for name, script in (("WHEEL_PYTHON", GPU_ALL), ("PYTHON_VERSION", SCRIPTS[1]))]
    assert version[0] == version[1]


def test_scripts_parse():
    for script in SCRIPTS:
        subprocess.run([shutil.which("bash"), "-n", str(script)], check=True)


def dry_run_of_controlled_stages(tmp_path, stages, limits, files) -> tuple[subprocess.CompletedProcess, str]:
    """``gpu_all.sh --dry-run STAGES`` in a folder of its own: the script with ``limits`` (stage: seconds) in its
    LIMIT, gpu_summary.py, and ``files`` (path: text) standing in for what the stages run; setup is the real one.
    The exit status and the summary.log it leaves."""
    (tmp_path / "benchmarks").mkdir()
    text = GPU_ALL.read_text()
    for stage, seconds in limits.items():
        text, n = re.subn(rf"\[{stage}\]=\d+", f"[{stage}]={seconds}", text)
        assert n == 1
    (tmp_path / "benchmarks" / "gpu_all.sh").write_text(text)
    shutil.copy(REPO / "benchmarks" / "gpu_summary.py", tmp_path / "benchmarks")
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_all.sh"), "--dry-run", *stages],
                            capture_output=True, text=True, env=env, timeout=300)
    return result, (tmp_path / "out" / "summary.log").read_text()


SLOW_GPU_TEST = "import time, pytest\n\n@pytest.mark.gpu\ndef test_slow():\n    time.sleep(3.5)\n"


def test_dry_run_passes_a_stage_over_its_gpu_limit_that_completes_and_writes_its_files(tmp_path):
    """A CPU is slower than the GPU the limits are sized for: a dry run checks that stages run, not their time."""
    result, summary = dry_run_of_controlled_stages(tmp_path, ["tests"], {"tests": 2},
                                                   {"tests/test_gpu_kernels.py": SLOW_GPU_TEST})
    assert result.returncode == 0, summary
    line = next(line for line in summary.splitlines() if line.startswith("== tests:"))
    seconds = int(re.match(r"== tests: ok, (\d+) s \(GPU limit 2 s, over it", line).group(1))
    assert seconds >= 3
    assert "1 tests: 1 passed" in summary  # the stage's junit XML, read back by gpu_summary.py


def test_dry_run_fails_a_stage_that_fails_or_writes_nothing(tmp_path):
    result, summary = dry_run_of_controlled_stages(
        tmp_path, ["crf", "infonce"], {},
        {"benchmarks/bench_crf.py": "import sys\nsys.exit(3)\n",  # fails
         "benchmarks/bench_infonce.py": "print('measured nothing')\n"})  # exits 0 without its JSON
    assert result.returncode == 1, summary
    assert "== crf: FAILED (exit status 3)" in summary
    assert "== infonce: FAILED (wrote no infonce_*.json)" in summary
    assert "all stages ok" not in summary
