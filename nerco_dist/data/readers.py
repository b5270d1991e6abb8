"""Corpus readers: character CoNLL (BIO/BIOES/BMES), Weibo NER as published, CLUENER2020 JSON lines.

Every reader returns sentences with BIO tags (NerCo trains all corpora in BIO) and fails on bad input
with an :class:`InputError` naming the file, the line and the problem.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .tags import Entity, count_orphan_inside, detect_scheme, from_entities, split_tag, to_bio

log = logging.getLogger("nerco_dist")

FORMATS = ("auto", "conll", "weibo", "cluener")


@dataclass
class Sentence:
    chars: list[str]
    tags: list[str]  # BIO
    origin: str = ""  # "file:line" of its first line, for messages about it

    def __len__(self) -> int:
        return len(self.chars)


@dataclass
class Corpus:
    path: Path
    sentences: list[Sentence]
    source_scheme: str
    orphan_inside: int = 0  # entities that began with I- and were read as starting an entity

    def __len__(self) -> int:
        return len(self.sentences)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(path, "file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(path, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})", line) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise InputError(path, "empty file: no sentences")
    return text


def _looks_like_weibo(path: Path) -> bool:
    """Weibo tokens are one character followed by its position digits inside the word (``科0``)."""
    with open(path, "rb") as f:
        head = f.read(8192).decode("utf-8", errors="ignore")
    tokens = [ln.split()[0] for ln in head.splitlines()[:-1] if ln.strip()]
    return bool(tokens) and all(_weibo_character(t) is not None for t in tokens)


def _weibo_character(token: str) -> str | None:
    """``科0 -> 科``, ``110 -> 1`` (the character 1 at word position 10); a lost emoji ``\ufffd\ufffd0`` stays
    one token. None when the token has no position digits."""
    if len(token) >= 2 and token[1:].isdigit():
        return token[0]
    stripped = token.rstrip("0123456789")
    return stripped if stripped and stripped != token else None


def read_conll(path: str | Path, weibo: bool = False) -> Corpus:
    """Read ``char<space or tab>tag`` lines, blank line between sentences.

    With ``weibo=True`` each token is a character followed by its word-position digits; the character is
    the token minus those digits.
    """
    path = Path(path)
    sentences, all_tags = _conll_sentences(path, _read_text(path), weibo)
    try:
        scheme = detect_scheme(all_tags)
    except ValueError as err:
        raise InputError(path, str(err)) from None
    orphans = 0
    for s in sentences:
        s.tags = to_bio(s.tags)
        orphans += count_orphan_inside(s.tags)
    if orphans:
        log.warning("%s: %d entities begin with I- and no B-; read as starting an entity (as conlleval does)",
                    path, orphans)
    return Corpus(path, sentences, scheme, orphans)


def _conll_sentences(path: Path, text: str, weibo: bool) -> tuple[list[Sentence], set[str]]:
    """The sentences with their tags as written (the file's own scheme), and the set of tags seen."""
    sentences: list[Sentence] = []
    start = 0  # line of the sentence being read
    chars: list[str] = []
    tags: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if chars:
                sentences.append(Sentence(chars, tags, f"{path}:{start}"))
                chars, tags = [], []
            continue
        char, tag = _conll_token(path, line, lineno, weibo)
        if not chars:
            start = lineno
        chars.append(char)
        tags.append(tag)
    if chars:
        sentences.append(Sentence(chars, tags, f"{path}:{start}"))
    return sentences, {t for s in sentences for t in s.tags}


def _conll_token(path: Path, line: str, lineno: int, weibo: bool) -> tuple[str, str]:
    """The character and tag of a non-blank line; an :class:`InputError` naming the line if it is malformed."""
    fields = line.split()
    if len(fields) != 2:
        raise InputError(path, f"malformed line {line!r}: expected 'char tag'", lineno)
    token, tag = fields
    if weibo:
        token = _weibo_character(token)
        if token is None:
            raise InputError(path, f"Weibo token {fields[0]!r} is not a character followed by position digits",
                             lineno)
    elif len(token) != 1:
        raise InputError(path, f"token {token!r} is not a single character", lineno)
    try:
        split_tag(tag)
    except ValueError as err:
        raise InputError(path, str(err), lineno) from None
    return token, tag


def read_cluener(path: str | Path) -> Corpus:
    """CLUENER2020 JSON lines: ``{"text": ..., "label": {type: {mention: [[start, end_inclusive], ...]}}}``."""
    path = Path(path)
    text = _read_text(path)
    sentences: list[Sentence] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            sent_text = record["text"]
            labels = record.get("label", {}) or {}
            spans = []
            for etype, mentions in labels.items():
                for mention, positions in mentions.items():
                    for start, end in positions:
                        if not (0 <= start <= end < len(sent_text)) or sent_text[start : end + 1] != mention:
                            raise ValueError(f"span [{start}, {end}] of {etype} does not match mention {mention!r}")
                        spans.append(Entity(start, end + 1, etype))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(path, f"bad CLUENER record: {err}", lineno) from None
        spans.sort()
        for a, b in zip(spans, spans[1:]):
            if b.start < a.end:
                raise InputError(path, f"overlapping entities {a} and {b}", lineno)
        if not sent_text:
            continue
        sentences.append(Sentence(list(sent_text), from_entities(len(sent_text), spans, "BIO"), f"{path}:{lineno}"))
    if not sentences:
        raise InputError(path, "empty file: no sentences")
    return Corpus(path, sentences, "BIO", 0)


def read_corpus(path: str | Path, fmt: str = "auto") -> Corpus:
    """Read a corpus file; ``fmt`` is one of :data:`FORMATS` (``auto`` decides from the name and content)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; expected one of {FORMATS}")
    if fmt == "auto":
        if path.suffix in (".json", ".jsonl"):
            fmt = "cluener"
        else:
            fmt = "weibo" if path.is_file() and _looks_like_weibo(path) else "conll"
    if fmt == "cluener":
        return read_cluener(path)
    return read_conll(path, weibo=fmt == "weibo")
