"""Pre-training data: an offline demo corpus, rows built once and saved by settings hash, dynamic
masking at collate time, and a deterministic, resumable, world-size-independent batch order.

==================  =====================================================================
module              what it is
==================  =====================================================================
``corpus``          ``materialize_corpus``: Wikipedia sample, Austen, WordNet from registries
``wikimarkup``      ``clean_wikitext``: MediaWiki markup to prose paragraphs
``sentences``       ``split_sentences``: rule-based sentence splitter
``rows``            BERT rows: NSP segment pairs or MLM-only packing, per-document RNG
``prepare``         ``prepare_dataset`` / ``prepared_path`` / ``load_prepared`` (datasets)
``collator``        ``MaskingCollator``: 15% with 80/10/10, per-row seeds, padding to 8
``batches``         ``PretrainingBatches`` (batch sampler with state), ``PretrainingRows``
``cli``             ``add_data_commands``: ``materialize-corpus`` and ``prepare-data``
==================  =====================================================================

Imports here are light (no datasets/transformers until a function needs them).
"""
from sparse_pretrain.data.batches import PretrainingBatches, PretrainingRows, evaluation_batches
from sparse_pretrain.data.collator import MaskingCollator
from sparse_pretrain.data.prepare import load_prepared, prepare_dataset, prepared_path

__all__ = ["PretrainingBatches", "PretrainingRows", "evaluation_batches", "MaskingCollator",
           "prepare_dataset", "prepared_path", "load_prepared"]
