"""Tag schemes (BIO, BIOES, BMES), conversion to BIO, entity spans and semantic classes.

NerCo trains every corpus in BIO. Entities are read as conlleval reads them: an I- tag that does not
continue an entity of its own type starts a new one.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, NamedTuple, Sequence

OUTSIDE = "O"
SCHEMES = ("BIO", "BIOES", "BMES")
_TAG_RE = re.compile(r"^(?:O|([BIMES])-(\S+))$")


class Entity(NamedTuple):
    """A typed span ``[start, end)`` of character positions."""

    start: int
    end: int
    type: str


@functools.lru_cache(maxsize=4096)
def split_tag(tag: str) -> tuple[str, str | None]:
    """``'B-PER' -> ('B', 'PER')``, ``'O' -> ('O', None)``; raises ValueError on an ill-formed tag.

    Cached: a corpus has a handful of distinct tags and every reader, encoder and metric parses each tag.
    """
    m = _TAG_RE.match(tag)
    if m is None:
        raise ValueError(f"ill-formed tag {tag!r} (expected O or one of B/I/M/E/S followed by -TYPE)")
    return (OUTSIDE, None) if tag == OUTSIDE else (m.group(1), m.group(2))


def semantic_class(tag: str) -> str:
    """The entity type of a tag, position ignored (``B-PER``, ``I-PER``, ``S-PER`` -> ``PER``); ``O`` for O."""
    prefix, etype = split_tag(tag)
    return OUTSIDE if etype is None else etype


def detect_scheme(tags: Iterable[str]) -> str:
    """BMES when M- occurs, BIOES when I- occurs beside E-/S-, otherwise BIO."""
    prefixes = {split_tag(t)[0] for t in tags}
    if "M" in prefixes and "I" in prefixes:
        raise ValueError("tags mix I- (BIO/BIOES) and M- (BMES)")
    if "M" in prefixes:
        return "BMES"
    if prefixes & {"E", "S"}:
        return "BIOES"
    return "BIO"


_TO_BIO = {"B": "B", "I": "I", "M": "I", "E": "I", "S": "B"}


def to_bio(tags: Sequence[str]) -> list[str]:
    """Any scheme to BIO: B->B, I/M/E->I, S->B."""
    out = []
    for t in tags:
        prefix, etype = split_tag(t)
        out.append(OUTSIDE if etype is None else f"{_TO_BIO[prefix]}-{etype}")
    return out


def entities(tags: Sequence[str]) -> list[Entity]:
    """Entity spans of a tag sequence in any scheme, read conlleval-style."""
    spans: list[Entity] = []
    start, etype = None, None
    for i, t in enumerate(tags):
        prefix, typ = split_tag(t)
        continues = etype is not None and typ == etype and prefix in ("I", "M", "E")
        if etype is not None and not continues:
            spans.append(Entity(start, i, etype))
            start, etype = None, None
        if typ is not None and not continues:
            start, etype = i, typ
        if etype is not None and prefix in ("E", "S"):
            spans.append(Entity(start, i + 1, etype))
            start, etype = None, None
    if etype is not None:
        spans.append(Entity(start, len(tags), etype))
    return spans


def count_orphan_inside(bio: Sequence[str]) -> int:
    """How many entities of a BIO sequence start with I- (an I- not after B-/I- of its type; conlleval reads
    it as starting an entity). Takes BIO so that readers convert each sentence once."""
    count, previous = 0, None
    for tag in bio:
        prefix, etype = split_tag(tag)
        if prefix == "I" and etype != previous:
            count += 1
        previous = etype
    return count


def from_entities(length: int, spans: Iterable[Entity], scheme: str = "BIO") -> list[str]:
    """Tags of the given scheme for non-overlapping entity spans."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; expected one of {SCHEMES}")
    tags = [OUTSIDE] * length
    inner = "M" if scheme == "BMES" else "I"
    for s, e, typ in spans:
        if scheme == "BIO" or e - s > 1:
            tags[s] = f"B-{typ}"
            for i in range(s + 1, e):
                tags[i] = f"{inner}-{typ}"
            if scheme != "BIO":
                tags[e - 1] = f"E-{typ}"
        else:
            tags[s] = f"S-{typ}"
    return tags

