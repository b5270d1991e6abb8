"""The CPU cost of ``nerco predict`` against ``nerco eval`` on the same sentences.

Trains ``configs/tiny.yaml`` with ``data.max_len=200`` (the corpus configs' value: tiny's own 60 would hide
what batches of mixed lengths cost) through the CLI into a temporary folder, writes the sentences of a
labelled split (default MSRA's test split) as a labelled file and as raw lines, and runs, alternating,
``--rounds`` times each at ``--threads`` threads:

- ``eval``: ``nerco eval CHECKPOINT --data LABELLED``
- ``predict file``: ``nerco predict CHECKPOINT LINES`` (a file hands over 1 MiB of lines at a time)
- ``predict pipe``: ``cat LINES | nerco predict CHECKPOINT`` (a pipe hands over what it holds, 64 KiB)

and, with ``--against COMMIT`` (8ae7117: the last before predict sorted all the lines that had arrived), that
commit's ``eval`` and ``predict file`` on the same checkpoint and files, from a git worktree in the temporary
folder (its torch threads set by OMP_NUM_THREADS alone, which every run also gets). CPU time is the whole child's user + system time (``os.wait4``): start-up, loading the
checkpoint, reading, tagging, writing (predict's JSON lines go to /dev/null; eval's reports to the temporary
folder). The summary holds each command's median and its ratio to this checkout's ``eval`` (target for
predict: at most 1.3).

    python3 benchmarks/bench_predict.py --against 8ae7117     # -> results/predict_cpu.json (~2 CPU-minutes)
    python3 benchmarks/bench_predict.py --quick --rounds 1 --out /tmp/predict.json   # 500 sentences
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ResultsFile, cpu_time_arguments, machine_info, parse_args, require_cpu

from nerco_dist.data.readers import read_corpus

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.3
QUICK_SENTENCES = 500


def child_cpu_seconds(argv: list[str], code: Path, env: dict[str, str], stdin=None) -> float:
    """User + system CPU seconds of one command run in the folder ``code`` (``python -m`` imports from there
    first, PYTHONPATH after), to its end; a failure raises with its stderr's tail."""
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(argv, cwd=code, env={**env, "PYTHONPATH": str(code)}, stdin=stdin,
                                 stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv[:5])} ... exit {child.returncode}:\n{err.read().decode()[-2000:]}")
    return usage.ru_utime + usage.ru_stime


def require_code_from(code: Path, env: dict[str, str]) -> None:
    """Refuse to time an arm whose ``nerco_dist`` would not come from ``code`` (an editable install's finder, say)."""
    found = subprocess.run([sys.executable, "-c", "import nerco_dist; print(nerco_dist.__file__)"], cwd=code,
                           env={**env, "PYTHONPATH": str(code)}, capture_output=True, text=True, check=True)
    if not Path(found.stdout.strip()).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"nerco_dist imports from {found.stdout.strip()}, not from {code}")


def write_inputs(split: Path, limit: int | None, folder: Path) -> tuple[Path, Path, dict]:
    """The split's first ``limit`` sentences as a labelled file (char and BIO tag per line) and as raw lines,
    and what they hold."""
    sentences = read_corpus(split).sentences[:limit]
    labelled, lines = folder / "labelled.bio", folder / "lines.txt"
    labelled.write_text("".join("".join(f"{c} {t}\n" for c, t in zip(s.chars, s.tags)) + "\n" for s in sentences),
                        encoding="utf-8")
    lines.write_text("".join("".join(s.chars) + "\n" for s in sentences), encoding="utf-8")
    lengths = [len(s.chars) for s in sentences]
    return labelled, lines, dict(sentences=len(sentences), characters=sum(lengths), longest=max(lengths))


def train_checkpoint(out: Path, data_root: str, env: dict[str, str]) -> Path:
    subprocess.run([sys.executable, "-m", "nerco_dist.cli", "train", str(REPO / "configs" / "tiny.yaml"),
                    "--data-root", data_root, "--set", f"run.out_dir={out}", "--set", "data.max_len=200",
                    "--set", "run.threads=1"], cwd=REPO, env=env, check=True, capture_output=True)
    return out / "best.pt"


COMMANDS = ("eval", "predict file", "predict pipe")


def run_command(command: str, code: Path, checkpoint: Path, files: dict[str, Path], threads: int,
                env: dict[str, str]) -> float:
    """CPU seconds of one of ``COMMANDS`` with the code at ``code`` (this checkout's takes ``--threads``)."""
    cli = [sys.executable, "-m", "nerco_dist.cli"]
    threads_option = ["--threads", str(threads)] if code == REPO else []
    if command == "eval":
        return child_cpu_seconds(cli + ["eval", str(checkpoint), "--data", str(files["labelled"]), "--output",
                                        str(files["report"]), *threads_option], code, env)
    if command == "predict file":
        return child_cpu_seconds(cli + ["predict", str(checkpoint), str(files["lines"]), *threads_option], code, env)
    with subprocess.Popen(["cat", str(files["lines"])], stdout=subprocess.PIPE) as cat:
        return child_cpu_seconds(cli + ["predict", str(checkpoint), *threads_option], code, env, stdin=cat.stdout)


def summary(rows: list[dict], head: str) -> dict:
    """Each (code, command)'s median CPU seconds and its ratio to this checkout's eval."""
    runs: dict[str, list[float]] = {}
    for row in rows:
        runs.setdefault(f"{row['code']} {row['command']}", []).append(row["cpu_s"])
    medians = {name: round(statistics.median(values), 2) for name, values in runs.items()}
    ratios = {name: round(value / medians[f"{head} eval"], 2) for name, value in medians.items()}
    met = all(ratios[f"{head} {command}"] <= TARGET_RATIO for command in COMMANDS[1:])
    return dict(median_cpu_s=medians, ratio_to_eval=ratios, target_ratio=TARGET_RATIO, target_met=met)


def checkout_name() -> str:
    """This checkout's short commit, with ``+changes`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
    return head + ("+changes" if changed else "")


def add_arguments(parser) -> None:
    parser.add_argument("--split", default="msra/test.char.bmes", help="labelled split under --data-root")
    parser.add_argument("--against", help="an earlier commit whose eval and predict file are timed too")
    cpu_time_arguments(parser, "command")


def main() -> int:
    args = parse_args("predict", __doc__, add_arguments=add_arguments, interpret_on_cpu=False)
    require_cpu(args, "bench_predict.py")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    head = checkout_name()
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        folder = Path(tmp)
        files = dict(report=folder / "eval.json")
        files["labelled"], files["lines"], inputs = write_inputs(Path(args.data_root) / args.split,
                                                                 QUICK_SENTENCES if args.quick else None, folder)
        checkpoint = train_checkpoint(folder / "run", args.data_root, env)
        runs = [(head, REPO, command) for command in COMMANDS]
        if args.against:
            subprocess.run(["git", "worktree", "add", "--detach", str(folder / "against"), args.against], cwd=REPO,
                           check=True, capture_output=True)
            runs += [(args.against, folder / "against", command) for command in COMMANDS[:2]]
        for code in {code for _, code, _ in runs}:
            require_code_from(code, env)
        results = ResultsFile(args.out, dict(benchmark="predict", command=" ".join(sys.argv), split=args.split,
                                             inputs=inputs, checkpoint="configs/tiny.yaml with data.max_len=200",
                                             threads=args.threads, machine=machine_info("cpu")))
        try:
            for round_ in range(args.rounds):
                for name, code, command in runs:
                    seconds = run_command(command, code, checkpoint, files, args.threads, env)
                    results.append(dict(round=round_ + 1, code=name, command=command, cpu_s=round(seconds, 2)))
                    print(results.payload["rows"][-1], flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force", str(folder / "against")], cwd=REPO, check=False)
    results.set("summary", summary(results.payload["rows"], head))
    print(results.payload["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
