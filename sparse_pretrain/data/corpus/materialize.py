"""An offline demo corpus of real English prose, fetched from package registries only.

``materialize_corpus(out)`` writes one JSON Lines file per source (one document per line:
``{"text", "title", "source"}``, paragraphs separated by a blank line) and ``manifest.json``:

- ``wiki.jsonl``: the English Wikipedia sample shipped inside the ``gensim==4.4.0`` wheel (test data;
  about 110 articles, CC BY-SA), read straight from the wheel (``pip download --no-deps``; gensim is
  never installed) and cleaned by :func:`~sparse_pretrain.data.corpus.wikimarkup.clean_wikitext`.
  Document = article.
- ``austen.jsonl``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (public domain),
  ``apt-get download`` + unpacking the .deb in Python, the R lazy-load database read with PyPI
  ``rdata``. Document = chapter.
- ``wordnet.jsonl``: WordNet 3.0 glosses from Debian ``wordnet-base`` (short definitions and
  examples, WordNet licence). Document = 100 consecutive synsets of one lexicographer file.

Each source is optional: one that cannot be fetched is reported and skipped. A source already in
the manifest with its file present is not fetched again (``force`` rebuilds). Files are written to
a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
import xml.etree.ElementTree as ET
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

from sparse_pretrain.data.corpus.wikimarkup import clean_wikitext, join_paragraphs
from sparse_pretrain.runtime.atomic import replacing, write_text

SOURCES = ("wiki", "austen", "wordnet")
GENSIM_PIN = "gensim==4.4.0"
WIKI_MEMBERS = ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                "gensim/test/test_data/enwiki-table-markup.xml.bz2")
AUSTEN_DEB = "r-cran-janeaustenr"
WORDNET_DEB = "wordnet-base"
AUSTEN_TITLES = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}
MANIFEST = "manifest.json"


class SourceUnavailable(RuntimeError):
    """A source cannot be fetched or read here; the message says why and what to do."""


# -- fetching ----------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_gensim_wheel(cache: Path) -> Path:
    """The gensim wheel (any platform's: the test data is the same), downloaded once into cache."""
    found = sorted(cache.glob("gensim-4.4.0-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache)]
    attempts = [base + [GENSIM_PIN],
                base + ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", GENSIM_PIN]]
    errors = []
    for cmd in attempts:
        result = _run(cmd)
        found = sorted(cache.glob("gensim-4.4.0-*.whl"))
        if found:
            return found[0]
        errors.append(result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"])
    raise SourceUnavailable(f"pip download {GENSIM_PIN} failed ({errors[-1][0]}); PyPI must be reachable")


def fetch_deb(package: str, cache: Path) -> Path:
    """A Debian package's .deb, via ``apt-get download`` (no install, no dependencies)."""
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if not shutil.which("apt-get"):
        raise SourceUnavailable(f"{package}: needs apt-get (Debian/Ubuntu) to download the .deb")
    cache.mkdir(parents=True, exist_ok=True)
    result = _run(["apt-get", "download", package], cwd=cache)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise SourceUnavailable(f"apt-get download {package} failed ({last}); run `apt-get update` first "
                                "if the package lists are missing")
    return found[-1]


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's data archive into ``dest`` in Python (an ``ar`` archive holding
    ``data.tar.{xz,gz,zst}``; what ``dpkg-deb -x`` does, without needing dpkg)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SourceUnavailable(f"{deb.name}: not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                if not shutil.which("dpkg-deb"):
                    raise SourceUnavailable(f"{deb.name}: zstd-compressed; needs dpkg-deb")
                dest.mkdir(parents=True, exist_ok=True)
                subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
                return dest
            raw = {"xz": lzma.decompress, "gz": gzip.decompress, "bz2": bz2.decompress}.get(
                name.rsplit(".", 1)[-1], lambda b: b)(body)
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                tar.extractall(dest, filter="data")
            return dest
    raise SourceUnavailable(f"{deb.name}: no data archive inside")


# -- parsing (pure functions) ------------------------------------------------------------------

def wiki_documents(xml: bytes, min_chars: int = 200) -> Iterator[dict]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML dump, cleaned."""
    for _, element in ET.iterparse(io.BytesIO(xml)):
        if not element.tag.endswith("}page") and element.tag != "page":
            continue
        ns = element.findtext("{*}ns") or element.findtext("ns") or "0"
        redirect = element.find("{*}redirect") is not None or element.find("redirect") is not None
        title = element.findtext("{*}title") or element.findtext("title") or ""
        raw = element.findtext("{*}revision/{*}text") or element.findtext("revision/text") or ""
        element.clear()
        if ns.strip() != "0" or redirect or raw.lstrip().lower().startswith("#redirect"):
            continue
        text = clean_wikitext(raw)
        if len(text) >= min_chars:
            yield {"text": text, "title": title, "source": "wikipedia"}


_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b\.?", re.I)
_DROP_LINE = re.compile(r"^\s*(volume\s+[ivx]+|the end|finis)\.?\s*$", re.I)
_ITALICS = re.compile(r"_(\S(?:.*?\S)?)_")


def paragraphs_from_lines(lines: Iterable[str]) -> list[str]:
    """Hard-wrapped lines -> paragraphs (blank lines separate paragraphs), Austen's _italics_ unmarked."""
    return [re.sub(r"\s+", " ", _ITALICS.sub(r"\1", p)) for p in join_paragraphs(lines)]


def austen_chapters(book: str, lines: Iterable[str]) -> list[dict]:
    """One document per chapter of a novel given as its text lines (front matter dropped)."""
    title = AUSTEN_TITLES.get(book, book)
    chapters: list[tuple[str, list[str]]] = []
    for line in lines:
        line = str(line)
        if _CHAPTER.match(line):
            chapters.append((line.strip(), []))
        elif chapters and not _DROP_LINE.match(line):
            chapters[-1][1].append(line)
    docs = []
    for heading, body in chapters:
        text = "\n\n".join(paragraphs_from_lines(body))
        if text:
            docs.append({"text": text, "title": f"{title}, {heading.title()}", "source": "austen"})
    return docs


def read_r_lazyload(rdx: Path, rdb: Path) -> dict:
    """Variables of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs)."""
    try:
        import rdata
    except ImportError:
        raise SourceUnavailable("the Austen novels need the PyPI package `rdata` "
                                "(pip install rdata==1.1.0)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx.read_bytes())))
        blob = rdb.read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            raw = zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)])
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


def wordnet_documents(data_files: dict[str, str], synsets_per_document: int = 100) -> list[dict]:
    """Glosses of WordNet ``data.<pos>`` files (text by pos) grouped into documents: each line
    ``word: definition.`` followed by its example sentences."""
    groups: dict[tuple[str, str], list[str]] = {}
    for pos, text in data_files.items():
        for line in text.splitlines():
            if not line or line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            lex_file, word = parts[1], re.sub(r"\(.*?\)$", "", parts[4]).replace("_", " ")
            pieces = [p.strip() for p in gloss.strip().split(";") if p.strip()]
            definition = [p for p in pieces if not p.startswith('"')]
            examples = [p.strip('"').strip() for p in pieces if p.startswith('"')]
            if not definition:
                continue
            sentence = f"{word}: {'; '.join(definition)}."
            examples = [e[0].upper() + e[1:] + ("" if e[-1] in ".!?" else ".") for e in examples if e]
            groups.setdefault((pos, lex_file), []).append(" ".join([sentence] + examples))
    docs = []
    for (pos, lex_file), lines in groups.items():
        for k in range(0, len(lines), synsets_per_document):
            docs.append({"text": "\n".join(lines[k:k + synsets_per_document]),
                         "title": f"WordNet {pos} {lex_file} #{k // synsets_per_document}", "source": "wordnet"})
    return docs


# -- the sources -------------------------------------------------------------------------------

def wiki_source(cache: Path) -> tuple[list[dict], str]:
    wheel = fetch_gensim_wheel(cache)
    docs, seen = [], set()
    with zipfile.ZipFile(wheel) as z:
        for member in WIKI_MEMBERS:
            for doc in wiki_documents(bz2.decompress(z.read(member))):
                if doc["title"] not in seen:
                    seen.add(doc["title"])
                    docs.append(doc)
    return docs, f"{wheel.name}: {', '.join(m.rsplit('/', 1)[-1] for m in WIKI_MEMBERS)} (CC BY-SA)"


def austen_source(cache: Path) -> tuple[list[dict], str]:
    deb = fetch_deb(AUSTEN_DEB, cache)
    root = extract_deb(deb, cache / deb.stem)
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    books = read_r_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    docs = []
    for book in AUSTEN_TITLES:                    # publication order
        if book in books:
            docs += austen_chapters(book, books[book])
    return docs, f"{deb.name} (public domain)"


def wordnet_source(cache: Path) -> tuple[list[dict], str]:
    deb = fetch_deb(WORDNET_DEB, cache)
    root = extract_deb(deb, cache / deb.stem) / "usr/share/wordnet"
    texts = {pos: (root / f"data.{pos}").read_text(encoding="latin-1") for pos in ("noun", "verb", "adj", "adv")}
    return wordnet_documents(texts), f"{deb.name} (WordNet 3.0 licence)"


SOURCE_BUILDERS: dict[str, Callable[[Path], tuple[list[dict], str]]] = {
    "wiki": wiki_source, "austen": austen_source, "wordnet": wordnet_source}


# -- writing -----------------------------------------------------------------------------------

def write_jsonl(path: Path, docs: list[dict]) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"sources": {}}


def materialize_corpus(out: str | Path, sources: Iterable[str] = SOURCES, cache: str | Path | None = None,
                       force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write the requested sources into ``out`` (see the module docstring); returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache else out / ".cache"
    manifest = read_manifest(out)
    for name in sources:
        if name not in SOURCE_BUILDERS:
            raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
        entry = manifest["sources"].get(name)
        path = out / f"{name}.jsonl"
        if entry and "documents" in entry and path.is_file() and not force:
            log(f"{name}: already there ({entry['documents']} documents, {entry['chars']:,} chars)")
            continue
        started = time.time()
        try:
            docs, origin = SOURCE_BUILDERS[name](cache)
        except SourceUnavailable as err:
            log(f"{name}: skipped: {err}")
            manifest["sources"][name] = {"skipped": str(err)}
        else:
            write_jsonl(path, docs)
            chars = sum(len(d["text"]) for d in docs)
            manifest["sources"][name] = {"file": path.name, "documents": len(docs), "chars": chars,
                                         "words": sum(len(d["text"].split()) for d in docs),
                                         "origin": origin, "seconds": round(time.time() - started, 1)}
            log(f"{name}: {len(docs)} documents, {chars:,} chars -> {path}")
        write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
