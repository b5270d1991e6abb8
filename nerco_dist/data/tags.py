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
_TAG_RE = re.compile(r"O|([BIMES])-(.+)", re.DOTALL)  # fullmatch; the type is checked by check_type


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
    m = _TAG_RE.fullmatch(tag)
    if m is None:
        raise ValueError(f"ill-formed tag {tag!r} (expected O or one of B/I/M/E/S followed by -TYPE)")
    if tag == OUTSIDE:
        return OUTSIDE, None
    try:
        return m.group(1), check_type(m.group(2))
    except ValueError as err:
        raise ValueError(f"ill-formed tag {tag!r}: {err}") from None


def check_type(etype: str) -> str:
    """``etype`` if it can name an entity type: not empty, printable, without spaces (it becomes part of a
    tag, a report's row and a file's column); otherwise a ValueError saying why."""
    if not etype or not etype.isprintable() or " " in etype:
        raise ValueError(f"entity type {etype!r} is empty or has a space or a control character")
    return etype


def semantic_class(tag: str) -> str:
    """The entity type of a tag, position ignored (``B-PER``, ``I-PER``, ``S-PER`` -> ``PER``); ``O`` for O."""
    prefix, etype = split_tag(tag)
    return OUTSIDE if etype is None else etype


class MixedSchemes(ValueError):
    """Tags mixing I- (BIO/BIOES) and M- (BMES); ``tag`` is the first that does not fit the scheme of the tags
    before it, so that a reader can name its line."""

    def __init__(self, tag: str):
        earlier = "BIO/BIOES" if tag.startswith("M-") else "BMES"
        super().__init__(f"tags mix I- (BIO/BIOES) and M- (BMES): {tag!r} does not fit the {earlier} tags before it")
        self.tag = tag


def detect_scheme(tags: Iterable[str]) -> str:
    """BMES when M- occurs, BIOES when I- occurs beside E-/S-, otherwise BIO; :class:`MixedSchemes` when both
    I- and M- occur (naming the first, in the order given, of the prefix that came second)."""
    prefixes = set()
    for t in tags:
        prefix = split_tag(t)[0]
        if {"I": "M", "M": "I"}.get(prefix) in prefixes:
            raise MixedSchemes(t)
        prefixes.add(prefix)
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


def repair_orphan_inside(bio: Sequence[str]) -> tuple[list[str], int]:
    """BIO tags with each I- that starts an entity (not after B-/I- of its type) turned into B-, as conlleval
    reads it, and how many there were. The entities are unchanged; the tags become a path the constrained
    CRF allows (O -> I-X is forbidden there), so training sees no gold sequence of zero probability."""
    out, count, previous = list(bio), 0, None
    for i, tag in enumerate(bio):
        prefix, etype = split_tag(tag)
        if prefix == "I" and etype != previous:
            out[i] = f"B-{etype}"
            count += 1
        previous = etype
    return out, count


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

