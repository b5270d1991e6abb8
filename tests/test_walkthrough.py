"""A new user's first hour, scripted: a fresh checkout of the tracked files beside a small copy of
the shared data (as the README expects: ``../shared/data``), the README's main command block run as written
by bash (its set-up lines skipped: this interpreter is the venv, and CI runs the set-up itself) with tiny
sizes put in by a shell function, and the README's smoke run: it learns, Ctrl-C mid-epoch then the same
command ends identically, predict answers line by line, eval leaves empty length buckets out.

The default data root is used (no NERCO_DATA_ROOT), so the README's paths are what is tested."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nerco_dist.checkpoint import load_checkpoint

from .conftest import REPO, stop_signals_at_their_defaults

# the README's commands with tiny sizes, appended to every `nerco train` of the block (120 Weibo sentences: the
# first that hold every entity type of its dev split)
TINY_TRAIN = ["data.limit=120", "model.hidden=40", "model.heads=2", "model.head_dim=20",
              "contrastive.phase.optim.epochs=2", "finetune.head.optim.epochs=1", "finetune.full.optim.epochs=1"]
SMOKE = "nerco train configs/tiny.yaml"


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def main_block() -> list[str]:
    """The README's first bash block under "Two commands", as its `&&`-joined commands."""
    section = readme().split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").split("&&")]


LINKED = ("README.md", "lexicon", "resume", "vocab", "weibo")  # ../shared/data's own entries but msra, vectors


def tiny_shared_data(shared: Path, data_root: Path) -> None:
    """``shared/data`` with the corpora as they are but MSRA's training split and the raw text cut short.
    Only the shared data's own entries are linked: a user's data root also holds what the project generated
    there (``pretrained/``), which the README's commands in the checkout would otherwise write through."""
    shared.mkdir(parents=True)
    data_root = data_root.resolve()
    for name in LINKED:
        (shared / name).symlink_to(data_root / name)
    for name, keep in (("msra", ["train.char.bmes"]), ("vectors", [])):
        (shared / name).mkdir()
        for f in (data_root / name).iterdir():
            if f.name not in keep and f.name != "pd2014_raw.txt":
                (shared / name / f.name).symlink_to(f)
    (shared / "raw").mkdir()
    for f in (data_root / "raw").iterdir():  # the raw text: 300 lines of each file
        if f.suffix == ".txt":
            with open(f, encoding="utf-8") as text:
                (shared / "raw" / f.name).write_text("".join(text.readline() for _ in range(300)), encoding="utf-8")
    msra = (data_root / "msra/train.char.bmes").read_text(encoding="utf-8").split("\n\n")[:200]
    (shared / "msra/train.char.bmes").write_text("\n\n".join(msra) + "\n", encoding="utf-8")
    with open(data_root / "vectors/pd2014_raw.txt", encoding="utf-8") as f:
        (shared / "vectors/pd2014_raw.txt").write_text("".join(f.readline() for _ in range(300)), encoding="utf-8")


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (not inside linked folders): its size and modification time."""
    root = root.resolve()
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, data_root) -> Path:
    """The tracked (and not ignored) files of this tree at ``work/main``, a small ``work/shared/data`` beside."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    work = tmp_path_factory.mktemp("work")
    main = work / "main"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (main / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, main / name)
    tiny_shared_data(work / "shared" / "data", data_root)
    return main


def user_env(checkout: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NERCO_DATA_ROOT", "TQDM_DISABLE")}
    return dict(env, PYTHONPATH=str(checkout), PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
                OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def main_path(checkout, data_root) -> subprocess.CompletedProcess:
    """The README's main block in the checkout; the data root it was made from is left as it was."""
    before = tree_state(data_root)
    commands = [c for c in main_block() if not c.startswith(("python3 -m venv", ". .venv", "pip install"))]
    assert any(c.startswith("nerco train configs/weibo_nerco.yaml") for c in commands), commands
    script = "\n".join([
        "set -euo pipefail",
        'nerco() { case "$1" in',
        "  train) command nerco \"$@\" " + " ".join(f"--set {s}" for s in TINY_TRAIN) + " ;;",
        '  analyze) command nerco "$@" --tsne-tokens 60 ;;',
        '  *) command nerco "$@" ;;',
        "esac; }",
        " && ".join(commands)])
    done = subprocess.run(["bash", "-c", script], cwd=checkout, env=user_env(checkout, TQDM_DISABLE="1"),
                          capture_output=True, text=True, timeout=900)
    assert tree_state(data_root) == before, "the README's commands in the checkout wrote into the data root"
    return done


def test_the_readme_main_path_runs_nerco_then_the_baseline_then_the_analysis(main_path, checkout):
    assert main_path.returncode == 0, main_path.stderr[-4000:]
    log = main_path.stderr
    assert re.search(r"run\.threads=auto: \d+ torch threads? \(\d+ cores", log)
    assert re.search(r"train: 120 sentences, [\d,]+ characters, [\d,]+ entities \((GPE|LOC|ORG|PER)\.", log), log[-3000:]
    assert re.search(r"lexicon jieba: [\d,]+ words; in the training split [\d,]+ matches", log)
    assert re.search(r"char vectors data/vectors/char_vec_pd2014\.50d\.vec: [\d,]+ of the vocabulary's [\d,]+ chars "
                     r"\([\d.]+%\); [\d,]+ frozen", log), log[-3000:]
    assert re.search(r"bigram vectors data/pretrained/raw37m/bigram\.vec: [\d,]+ of", log), log[-3000:]
    assert re.search(r"contrastive 'contrastive' epoch 2/2: loss [\d.]+, [\d,]+ tok/s, dev InfoNCE", log)
    runs = checkout / "runs"
    for path in ("weibo_nerco/contrastive/best.pt", "weibo_nerco/contrastive/last.pt", "weibo_nerco/best.pt",
                 "weibo_nerco/last.pt", "weibo_nerco/results.json", "weibo_nerco/resume/contrastive.done.json",
                 "weibo_nerco/resume/finetune.done.json", "weibo/best.pt", "weibo/results.json"):
        assert (runs / path).is_file(), path  # what the README says each run writes
    for folder in ("weibo_nerco/contrastive/tensorboard", "weibo_nerco/tensorboard", "weibo_analysis"):
        assert any((runs / folder).iterdir()), folder
    results = json.loads((runs / "weibo_nerco/results.json").read_text())
    assert results["contrastive"]["epochs_run"] == 2 and "test" in results
    assert list((runs / "weibo_analysis").glob("*.png")), "analyze wrote no plot"


def run_smoke(checkout: Path, *extra: str, tqdm: bool = False) -> subprocess.Popen:
    cmd = [*SMOKE.split(), *extra]
    env = user_env(checkout) if tqdm else user_env(checkout, TQDM_DISABLE="1")
    return subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=stop_signals_at_their_defaults)


@pytest.fixture(scope="module")
def smoke(checkout, main_path) -> tuple[subprocess.CompletedProcess, float]:
    """The README's smoke run, in the data root its set-up lines made."""
    assert f"`{SMOKE}`" in readme()
    start = time.perf_counter()
    proc = run_smoke(checkout)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]  # the later steps use its checkpoint
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.perf_counter() - start


def test_the_smoke_run_learns_within_a_minute(smoke):
    proc, wall_s = smoke
    f1 = float(re.search(r"^test P [\d.]+ R [\d.]+ F1 ([\d.]+) ", proc.stdout, re.M).group(1))
    assert f1 >= 50 and wall_s < 60, (f1, wall_s)
    assert re.search(r"train: 150 sentences, [\d,]+ characters, [\d,]+ entities \(", proc.stderr)


def stderr_until(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """What ``proc`` has written to stderr until ``pattern`` appears in it (tqdm's bar included)."""
    seen, found = [], threading.Event()

    def read():
        while chunk := os.read(proc.stderr.fileno(), 4096):
            seen.append(chunk.decode(errors="replace"))
            if re.search(pattern, "".join(seen)):
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout) and re.search(pattern, "".join(seen)), "".join(seen)[-3000:]
    return "".join(seen)


def test_ctrl_c_then_the_same_command_ends_as_the_uninterrupted_run(smoke, checkout):
    """A real Ctrl-C through the CLI with its progress bar. Where inside an epoch it lands is up to the
    machine (an epoch here can take 0.2 s); tests/test_stopping.py stops at chosen batches."""
    uninterrupted, _ = smoke
    out = "runs/tiny_interrupted"
    proc = run_smoke(checkout, "--set", f"run.out_dir={out}", tqdm=True)
    stderr_until(proc, r"finetune 'full' epoch 1/4: ", timeout=120)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    resumed = run_smoke(checkout, "--set", f"run.out_dir={out}")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert re.search(r"finetune: resuming at phase 1, epoch [234], batch \d+", stderr), stderr[-3000:]
    assert stdout.splitlines()[-1].split(" (best")[0] == uninterrupted.stdout.splitlines()[-1].split(" (best")[0]
    for name in ("best.pt", "last.pt"):
        a, b = (load_checkpoint(checkout / d / name)["model"] for d in (out, "runs/tiny"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_predict_answers_each_line_before_the_next_arrives(smoke, checkout):
    proc = subprocess.Popen(["nerco", "predict", "runs/tiny/best.pt", "-"], cwd=checkout, env=user_env(checkout),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for text in ("张三在北京大学读书", "他是工程师"):
            proc.stdin.write(text + "\n")
            proc.stdin.flush()
            assert select.select([proc.stdout], [], [], 60)[0], f"no answer to {text!r} while the input is open"
            answer = proc.stdout.readline()
            assert answer and json.loads(answer)["text"] == text, proc.stderr.read()
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_eval_leaves_empty_length_buckets_out(smoke, checkout, tmp_path):
    blocks = (checkout / "data/resume/dev.char.bmes").read_text(encoding="utf-8").strip().split("\n\n")
    short = [b for b in blocks if len(b.splitlines()) <= 25][:60]  # no sentence of the longer buckets
    data = tmp_path / "short.bmes"
    data.write_text("\n\n".join(short) + "\n", encoding="utf-8")
    proc = subprocess.run(["nerco", "eval", "runs/tiny/best.pt", "--data", str(data), "--output",
                           str(tmp_path / "short.json")], cwd=checkout, env=user_env(checkout), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "short.json").read_text())["f1_by_length"]  # every bucket, with its count
    assert sum(r["sentences"] for r in rows) == len(short) and any(r["sentences"] == 0 for r in rows)
    printed = re.search(r"^F1 by sentence length: (.*)$", proc.stdout, re.M).group(1)
    shown = dict(re.findall(r"([\d+-]+): [\d.]+ \((\d+) sentences\)", printed))
    assert shown == {r["bucket"]: str(r["sentences"]) for r in rows if r["sentences"]}, printed
    assert (tmp_path / "short.length.png").stat().st_size > 0
