"""A few lines on one stage of gpu_all.sh, from the files it left in the results folder (standard library only:
it runs before the stage's packages are known to import).

    python3 benchmarks/gpu_summary.py setup|tests|crf|infonce|train RESULTS_DIR

The device tool returns only the last 12,000 characters of a run's output: these lines are what it shows of
the run; the full logs and JSONs come back in the archive.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The implementation each kernel benchmark is about, reported against the row's baseline.
KERNEL = {"crf": "triton", "infonce": "fused"}
MAX_LISTED = 15  # failed tests named; the rest are counted
OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")  # pytest -v


def setup(results: Path) -> list[str]:
    return [line for line in _log(results, "setup") if line.startswith(("Python", "ok:", "dry run:"))]


def tests(results: Path) -> list[str]:
    path = results / "gpu_tests.xml"
    if not path.is_file():  # cut short: pytest writes the XML at the end, its -v log line by line
        outcomes = [m.groups() for m in map(OUTCOME.match, _log(results, "tests")) if m]
        counts = collections.Counter(outcome for _, outcome in outcomes)
        return ([f"no junit XML; the log has {len(outcomes)} tests: "
                 + ", ".join(f"{n} {outcome.lower()}" for outcome, n in sorted(counts.items()))]
                + _listed([f"  {outcome} {test}" for test, outcome in outcomes if outcome in ("FAILED", "ERROR")]))
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"{counts['tests']} tests: {counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} "
             f"passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
             f"in {float(suite.get('time', 0)):.0f} s"]
    problems = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            problem = case.find(kind)
            if problem is not None:
                message = (problem.get("message") or "").splitlines()
                problems.append(f"  {kind.upper()} {case.get('name')}: {message[0][:200] if message else ''}")
    lines += _listed(problems)
    if counts["skipped"] == counts["tests"] > 0:
        reason = next(case.find("skipped").get("message", "") for case in suite.iter("testcase"))
        lines.append(f"  all skipped: {reason}")
    return lines


def kernel(results: Path, name: str) -> list[str]:
    payload = _json(results, name)
    if payload is None:
        return [f"no {name}_*.json"]
    rows = payload["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [f"{len(ok)}/{len(rows)} cases measured ({len(rows) - len(ok)} skipped by the budget), "
             f"{KERNEL[name]} vs {payload['baseline']}: ms (speedup)"]
    for row in ok:
        case = ",".join(str(v) for v in row["case"].values())
        cells = [f"{op} {ms if isinstance(ms, str) else f'{ms:.3g}'}"
                 + (f" ({row['speedup'][KERNEL[name]][op]:.3g}x)" if op in row["speedup"].get(KERNEL[name], {}) else "")
                 for op, ms in row["ms"].get(KERNEL[name], {}).items()]
        flag = f"  NONFINITE {row['nonfinite']}" if "nonfinite" in row else ""
        lines.append(f"  [{case}] " + " | ".join(cells) + flag)
    for target in payload.get("targets", []):
        case = ",".join(str(v) for v in target["case"].values())
        lines.append(f"  target {target['impl']} {target['op']} {target['metric']} <= {target['limit']} on [{case}]: "
                     f"{target['measured']} -> {'met' if target['met'] else 'MISSED'}")
    return lines


def train(results: Path) -> list[str]:
    payload = _json(results, "train")
    if payload is None:
        return ["no train_*.json"]
    lines = [f"  {r['model']} ({r['parameters'] / 1e6:.1f}M parameters) {r['stage']}/{r['phase']} batch {r['batch']}"
             f"{', tables ' + r['table_updates'] if 'table_updates' in r else ''}: "
             f"{r['tokens_per_s']:.0f} tokens/s" + (f", peak {r['peak_mem_gib']} GiB" if r["peak_mem_gib"] else "")
             for r in payload["rows"]]
    epoch = payload.get("msra_stage2_epoch", "not reached")
    if isinstance(epoch, dict):
        epoch = (f"{epoch['seconds']} s for {epoch['pieces']} pieces at batch {epoch['batch']} "
                 f"(target {epoch['target_s']} s: {'met' if epoch['met'] else 'MISSED'})")
    return lines + [f"  MSRA stage-2 epoch: {epoch}"]


def _listed(lines: list[str]) -> list[str]:
    return lines[:MAX_LISTED] + ([f"  ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else [])


def _log(results: Path, stage: str) -> list[str]:
    path = results / f"{stage}.log"
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def _json(results: Path, name: str) -> dict | None:
    paths = sorted(results.glob(f"{name}_*.json"))
    return json.loads(paths[0].read_text()) if paths else None


def main() -> int:
    stage, results = sys.argv[1], Path(sys.argv[2])
    summarize = {"setup": setup, "tests": tests, "train": train}.get(stage) or (lambda r: kernel(r, stage))
    try:
        lines = summarize(results)
    except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as e:  # a partial or odd file: say so, go on
        lines = [f"(no summary: {type(e).__name__}: {e})"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
