"""What can be checked of the one-call GPU run (benchmarks/gpu_all.sh, prepared by benchmarks/prepare_gpu.sh)
without running it; CI runs the whole script too, as `gpu_all.sh --dry-run` (.ci/run)."""

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
