"""Corpus readers: character CoNLL (BIO/BIOES/BMES), Weibo NER as published, CLUENER2020 JSON.

Every reader returns sentences with BIO tags (NerCo trains all corpora in BIO) and fails on bad input
with an :class:`InputError` naming the file, the line and the problem.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError
from .tags import (Entity, MixedSchemes, check_type, detect_scheme, entities, from_entities, repair_orphan_inside,
                   split_tag, to_bio)

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


def text_lines(text: str) -> list[str]:
    """``text`` cut at its line breaks, ``\\r\\n``, ``\\r`` or ``\\n`` (not at the other characters
    ``str.splitlines`` breaks at, such as U+2028 or U+0085, which a corpus may hold as tokens)."""
    lines = re.split(r"\r\n|\r|\n", text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def _looks_like_weibo(path: Path) -> bool:
    """Weibo tokens are one character followed by its position digits inside the word (``科0``)."""
    with open(path, "rb") as f:
        head = f.read(8192).decode("utf-8", errors="ignore")
    tokens = [fields[0] for fields in map(_fields, text_lines(head)[:-1]) if fields]
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
    sentences, first_line = _conll_sentences(path, _read_text(path), weibo)
    try:
        scheme = detect_scheme(first_line)
    except MixedSchemes as err:
        raise InputError(path, str(err), first_line[err.tag]) from None
    orphans = 0
    for s in sentences:
        orphans += repair_orphan_inside(to_bio(s.tags))[1]  # counted for the warning below
        # BIO from the entities as the file's own scheme reads them (an E-/S- followed by more of its type,
        # E-PER E-PER, is two entities, which a prefix-by-prefix mapping would join)
        s.tags = from_entities(len(s.tags), entities(s.tags))
    if orphans:
        log.warning("%s: %d %s with I- and no B-; read as B- (as conlleval reads them)", path, orphans,
                    "entity begins" if orphans == 1 else "entities begin")
    return Corpus(path, sentences, scheme, orphans)


def _conll_sentences(path: Path, text: str, weibo: bool) -> tuple[list[Sentence], dict[str, int]]:
    """The sentences with their tags as written (the file's own scheme), and each tag seen with the line of
    its first use (in the order of those lines)."""
    sentences: list[Sentence] = []
    first_line: dict[str, int] = {}
    start = 0  # line of the sentence being read
    chars: list[str] = []
    tags: list[str] = []
    for lineno, line in enumerate(text_lines(text), start=1):
        fields = _fields(line)
        if not fields:
            if chars:
                sentences.append(Sentence(chars, tags, f"{path}:{start}"))
                chars, tags = [], []
            continue
        char, tag = _conll_token(path, line, fields, lineno, weibo)
        if not chars:
            start = lineno
        chars.append(char)
        tags.append(tag)
        first_line.setdefault(tag, lineno)
    if chars:
        sentences.append(Sentence(chars, tags, f"{path}:{start}"))
    return sentences, first_line


def _fields(line: str) -> list[str]:
    """The fields of a CoNLL line, separated by spaces or tabs only: other white space (the ideographic space
    U+3000, a no-break space) is a character of Chinese text, not a separator."""
    return [f for f in line.replace("\t", " ").split(" ") if f]


def _conll_token(path: Path, line: str, fields: list[str], lineno: int, weibo: bool) -> tuple[str, str]:
    """The character and tag of a non-blank line; an :class:`InputError` naming the line if it is malformed."""
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
    """CLUENER2020 records ``{"text": ..., "label": {type: {mention: [[start, end_inclusive], ...]}}}``, as JSON
    lines, one JSON array or objects one after another (pretty-printed copies). BIO holds one entity per
    character, so nested or overlapping entities are flattened by :func:`_outermost` and counted in one
    warning."""
    path = Path(path)
    sentences: list[Sentence] = []
    dropped = 0
    for lineno, record in _json_values(path, _read_text(path)):
        text, spans = _cluener_record(path, lineno, record)
        kept = _outermost(spans)
        dropped += len(spans) - len(kept)
        if text:
            sentences.append(Sentence(list(text), from_entities(len(text), kept, "BIO"), f"{path}:{lineno}"))
    if dropped:
        log.warning("%s: %d entities nested in or overlapping another were dropped (the outermost kept)", path,
                    dropped)
    if not sentences:
        raise InputError(path, "empty file: no sentences")
    return Corpus(path, sentences, "BIO", 0)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_values(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """The JSON values of ``text`` (the elements, if it is one array), each with the line it starts on."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0  # the line of offset ``counted``, advanced as the values are read

    def skip_space(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    pos = skip_space(0)
    array = text.startswith("[", pos)
    if array:
        pos = skip_space(pos + 1)
    while pos < len(text) and not (array and text[pos] == "]"):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise InputError(path, f"bad CLUENER record: {err.msg} (column {err.colno})", err.lineno) from None
        yield line, value
        pos = skip_space(pos)
        if array and text.startswith(",", pos):
            pos = skip_space(pos + 1)
    if array and not (text.startswith("]", pos) and skip_space(pos + 1) == len(text)):
        raise InputError(path, "the JSON array is not closed by the file's last ]",
                         line + text.count("\n", counted, pos))


def _cluener_record(path: Path, lineno: int, record: Any) -> tuple[str, set[Entity]]:
    """The text and the entities of one record; a wrong shape is an :class:`InputError` at ``lineno``."""
    def bad(problem: str) -> InputError:
        return InputError(path, f"bad CLUENER record: {problem}", lineno)

    if not isinstance(record, dict):
        raise bad(f'expected an object {{"text": ..., "label": ...}}, got {_shown(record)}')
    text = record.get("text")
    if not isinstance(text, str):
        raise bad(f'"text" must be a string, got {_shown(text)}')
    labels = record.get("label") or {}  # unlabelled (CLUENER's test split): no entities
    if not isinstance(labels, dict):
        raise bad(f'"label" must be an object {{type: {{mention: [[start, end], ...]}}}}, got {_shown(labels)}')
    spans = set()
    for etype, mentions in labels.items():
        try:
            check_type(etype)
        except ValueError as err:
            raise bad(str(err)) from None
        if not isinstance(mentions, dict):
            raise bad(f"type {etype!r} must map each mention to its spans, got {_shown(mentions)}")
        for mention, positions in mentions.items():
            if not (isinstance(positions, list) and all(_is_span(p) for p in positions)):
                raise bad(f"spans of {etype} {mention!r} must be [[start, end_inclusive], ...], "
                          f"got {_shown(positions)}")
            for start, end in positions:
                if not (0 <= start <= end < len(text)) or text[start : end + 1] != mention:
                    raise bad(f"span [{start}, {end}] of {etype} does not match mention {mention!r}")
                spans.add(Entity(start, end + 1, etype))
    return text, spans


def _is_span(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value))


def _shown(value: Any) -> str:
    """A JSON value as it would be written, cut short for a message."""
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _outermost(spans: set[Entity]) -> list[Entity]:
    """The entities left when each one that overlaps an earlier-starting (or, starting together, a longer)
    one is dropped: of nested entities the outermost stays; of two types on one span, the first by name."""
    kept: list[Entity] = []
    for span in sorted(spans, key=lambda e: (e.start, -e.end, e.type)):
        if not kept or span.start >= kept[-1].end:
            kept.append(span)
    return kept


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


def read_bert_vocab(bert_dir: str) -> dict[str, int]:
    """A local BERT directory's vocab.txt as token -> id (nothing is downloaded)."""
    return {token: i for i, token in enumerate(bert_vocab_tokens(bert_dir))}


def bert_vocab_tokens(bert_dir: str) -> list[str]:
    """A local BERT directory's vocab.txt, the token of each id in order (nothing is downloaded)."""
    path = Path(bert_dir).expanduser() / "vocab.txt"
    if not path.is_file():
        raise InputError(path, f"model.bert={bert_dir!r} is not a local directory with vocab.txt: download the "
                               "model first (e.g. bert-base-chinese: config.json, weights, vocab.txt) and point "
                               "model.bert at that directory; nothing is downloaded at run time")
    with open(path, encoding="utf-8-sig") as f:
        return [line.rstrip("\n") for line in f]
