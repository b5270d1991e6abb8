"""What training logs once at its start: each split's size and entities, the lexicon's matches in
the training split, the coverage of pretrained vectors, and what ``run.threads=auto`` chose. The numbers are
counted here from the files themselves, not with the project's readers."""

import logging
import os
from collections import Counter
from pathlib import Path

import jieba
import torch

from nerco_dist.cli import main
from nerco_dist.machine import apply_threads, auto_threads

from .conftest import LIMIT, TINY

OUTSIDE_CORPUS = "龘齉"  # characters Resume's dev split does not have


def bmes_sentences(path: Path, limit: int) -> list[list[tuple[str, str]]]:
    """The first ``limit`` blank-line separated sentences of a ``char tag`` file."""
    blocks = path.read_text(encoding="utf-8").strip().split("\n\n")[:limit]
    return [[tuple(line.split()) for line in block.splitlines() if line.strip()] for block in blocks]


def jieba_words() -> set[str]:
    with open(Path(jieba.__file__).parent / "dict.txt", encoding="utf-8") as f:
        return {word for line in f if len(word := line.split()[0]) >= 2}


def substrings_in(text: str, words: set[str], longest: int) -> list[str]:
    return [text[i:j] for i in range(len(text)) for j in range(i + 2, min(len(text), i + longest) + 1)
            if text[i:j] in words]


def test_training_logs_split_lexicon_and_vector_statistics_once(tmp_path, data_root, caplog):
    sentences = bmes_sentences(data_root / "resume/dev.char.bmes", LIMIT)
    n_chars = sum(len(s) for s in sentences)
    types = Counter(tag[2:] for s in sentences for _, tag in s if tag[:2] in ("B-", "S-"))
    per_type = ", ".join(f"{t} {n:,}" for t, n in sorted(types.items()))
    split_line = f"{len(sentences)} sentences, {n_chars:,} characters, {sum(types.values()):,} entities ({per_type})"
    words = jieba_words()
    longest = max(map(len, words))
    matches = [w for s in sentences for w in substrings_in("".join(c for c, _ in s), words, longest)]
    distinct_chars = sorted({c for s in sentences for c, _ in s})
    covered = distinct_chars[:5]
    vectors = tmp_path / "chars.vec"
    rows = [f"{c} " + " ".join(["0.1"] * 16) for c in covered + list(OUTSIDE_CORPUS)]
    vectors.write_text(f"{len(rows)} 16\n" + "\n".join(rows) + "\n", encoding="utf-8")

    caplog.set_level(logging.INFO, logger="nerco_dist")
    assert main(["train", str(TINY), "--data-root", str(data_root), "--set", f"run.out_dir={tmp_path / 'out'}",
                 "--set", "finetune.full.optim.epochs=1", "--set", "run.threads=1",
                 "--set", f"data.char_vectors={vectors}"]) == 0
    logged = [r.getMessage() for r in caplog.records]

    for split in ("train", "dev", "test"):  # tiny.yaml trains, selects and tests on the same sentences
        assert logged.count(f"{split}: {split_line}") == 1, logged
    lexicon = f"lexicon jieba: {len(words):,} words; in the training split {len(matches):,} matches, " \
              f"{len(set(matches)):,} distinct words"
    assert logged.count(lexicon) == 1, logged
    share = 100 * 5 / len(distinct_chars)
    coverage = (f"char vectors {vectors}: 5 of the vocabulary's {len(distinct_chars)} chars ({share:.1f}%); "
                f"{len(OUTSIDE_CORPUS)} frozen pretrained rows for chars training never saw")
    assert logged.count(coverage) == 1, logged
    assert not any(m.startswith(("bigram vectors", "word vectors", "run.threads=auto")) for m in logged)


def test_auto_threads_are_set_and_logged_with_why(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="nerco_dist"):
            apply_threads("auto")
        assert torch.get_num_threads() == auto_threads(4, 1.2, 1) == 3
    finally:
        torch.set_num_threads(before)
    assert [r.getMessage() for r in caplog.records] == [
        "run.threads=auto: 3 torch threads (4 cores, 1.2 busy, 1 rank on this node)"]
