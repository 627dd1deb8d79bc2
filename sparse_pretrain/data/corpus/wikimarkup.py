"""MediaWiki markup to plain prose paragraphs (our own small cleaner, in the spirit of WikiExtractor).

Kept: the article's paragraphs, link labels, bold/italic text. Dropped: templates ``{{...}}``,
tables ``{|...|}``, references, comments, files/images/categories/interlanguage links, headings,
list and indented lines, math/gallery-like blocks, and everything from a trailing section such as
"See also" or "References" on.
"""
from __future__ import annotations

import html
import re

TRAILING_SECTIONS = frozenset(s.lower() for s in (
    "See also", "References", "Notes", "Footnotes", "Citations", "Sources", "Bibliography",
    "Further reading", "External links", "Notes and references", "References and notes", "Works cited"))
DROP_LINK_NAMESPACES = frozenset(("file", "image", "category", "media", "wikt", "wiktionary"))

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*?/>|<ref[^>]*?>.*?</ref\s*>", re.S | re.I)
_BLOCK_TAGS = re.compile(r"<(math|gallery|timeline|score|chem|syntaxhighlight|source|pre|imagemap|graph|hiero)"
                         r"\b[^>]*>.*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_LEADING_PUNCT_IN_PARENS = re.compile(r"\(\s*[,;:]\s*")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _replace_links(text: str) -> str:
    """``[[target|label]]`` -> label; file/category/interlanguage links (nested ones too) -> ''."""
    out, i = [], 0
    while True:
        start = text.find("[[", i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        depth, j = 0, start
        while j < len(text):
            if text.startswith("[[", j):
                depth += 1
                j += 2
            elif text.startswith("]]", j):
                depth -= 1
                j += 2
                if depth == 0:
                    break
            else:
                j += 1
        inner = text[start + 2:j - 2] if depth == 0 else text[start + 2:]
        target = inner.split("|", 1)[0].strip()
        prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
        if prefix in DROP_LINK_NAMESPACES or (len(prefix) in (2, 3) and prefix.isalpha() and
                                              target.split(":", 1)[0].islower()):
            pass                                   # file, category or interlanguage link
        else:
            label = inner.rsplit("|", 1)[-1] if "|" in inner else target
            out.append(_replace_links(label) if "[[" in label else label)
        i = j
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Plain text of an article: paragraphs separated by a blank line, one paragraph per line."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _replace_links(text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = html.unescape(html.unescape(text))
    text = _TAG.sub("", text)                     # tags that were entity-escaped in the dump
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC.sub("", text)
    cleaned = []
    for p in join_paragraphs(_prose_lines(text)):
        p = _LEADING_PUNCT_IN_PARENS.sub("(", _EMPTY_PARENS.sub("", p))
        p = _SPACES.sub(" ", p)
        p = _SPACE_BEFORE_PUNCT.sub(r"\1", p).strip()
        if len(p) >= 20 and any(c.isalpha() for c in p):
            cleaned.append(p)
    return "\n\n".join(cleaned)


def _prose_lines(text: str):
    """The article's lines up to its trailing sections, markup-only lines (lists, tables, headings)
    turned into paragraph breaks."""
    for line in text.splitlines():
        line = line.strip()
        heading = _HEADING.match(line)
        if heading:
            if heading.group(2).strip().lower() in TRAILING_SECTIONS:
                return
            line = ""
        if line[:1] in ("*", "#", ":", ";", "|", "!", "{", "}") or line.lower().startswith("#redirect"):
            line = ""
        yield line


def join_paragraphs(lines) -> list[str]:
    """Hard-wrapped lines -> paragraphs: consecutive non-blank lines joined, blank lines separate."""
    paragraphs, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs
