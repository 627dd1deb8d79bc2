"""A small rule-based English sentence splitter (no model or NLTK download).

A newline is always a boundary (BERT's input format is one sentence per line, and the demo corpus
writes one paragraph per line). Inside a line, a boundary is ``.``, ``!`` or ``?`` (plus closing
quotes or brackets) followed by whitespace and an upper-case letter, a digit or an opening quote,
unless the word before the period is a known abbreviation (``Mr.``, ``e.g.``) or a single
capital (an initial, ``J. R. R. Tolkien``). Good enough to pack sentences into rows; an odd wrong
split only moves a row boundary.
"""
from __future__ import annotations

import re

ABBREVIATIONS = frozenset("""
mr mrs ms messrs mme mlle dr prof st sr jr rev hon esq capt col gen lt sgt maj cmdr adm gov sen rep pres
vs etc e.g i.e cf al approx ca no nos vol vols fig figs pp ed eds est dept univ assn bros co corp inc ltd
jan feb mar apr jun jul aug sep sept oct nov dec mt ft u.s u.k a.m p.m b.c a.d
""".split())

_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S+)$")


def _is_abbreviation(before: str) -> bool:
    match = _LAST_WORD.search(before)
    if not match:
        return False
    word = match.group(1).lstrip("\"'(\u201c\u2018[").lower()
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into stripped, non-empty sentences (see the module docstring)."""
    sentences = []
    for line in text.splitlines():
        line = line.strip()
        start = 0
        for match in _BOUNDARY.finditer(line):
            punct_end = match.start() + len(match.group(0).rstrip())
            if line[match.start()] == "." and _is_abbreviation(line[start:match.start()]):
                continue
            sentences.append(line[start:punct_end].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]
