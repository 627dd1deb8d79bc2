"""Custom classification tasks with string labels (``pos``/``neg``): the label map given by
``task.labels`` (id order) or inferred (the sorted distinct labels of the train split), checked
against every split, written into the exported model's config (``id2label``/``label2id``) and
metrics.json, and part of the run's identity; integer labels work as before."""
import json
from pathlib import Path

import pytest
import torch

from finetune.recipe import load_finetune_recipe
from finetune.tasks.classification import check_teacher_labels, load_task, task_spec, with_data_labels
from sparse_pretrain.runtime.schema import ConfigError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "fine", "dull"]
TRAIN = [("a good film", "pos"), ("a bad film", "neg"), ("a fine film", "pos"), ("a dull film", "neg")]


def write_csv(path: Path, rows) -> str:
    path.write_text("sentence,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {"train": write_csv(tmp_path / "train.csv", TRAIN),
            "validation": write_csv(tmp_path / "validation.csv", TRAIN[:2])}


def custom(files, *overrides):
    return load_finetune_recipe(None, ["task.name=films", "task.text_columns=[sentence]", "distillation.lambda_task=1",
                                       *(f"task.data_files.{s}={p}" for s, p in files.items()), *overrides])


def loaded(recipe):
    from finetune.heads import head_for
    head = head_for(recipe.task)
    return head, head.load(recipe.task.data_files, seed=0)


# -- the label map: given or inferred, checked against every split -----------------------------------

@pytest.mark.parametrize("given, names", [(None, ["neg", "pos"]), ("[pos, neg]", ["pos", "neg"])])
def test_string_labels_become_ids_of_the_given_or_the_sorted_train_labels(files, given, names):
    head, data = loaded(custom(files, *([f"task.labels={given}"] if given else [])))
    assert head.label_names == names and head.spec.num_labels == 2
    assert data["train"]["label"] == [names.index(label) for _, label in TRAIN]
    assert head.model_kwargs() == {"num_labels": 2, "id2label": dict(enumerate(names)),
                                   "label2id": {n: i for i, n in enumerate(names)}}


def test_an_eval_label_the_train_split_lacks_is_one_message_naming_it_and_its_file(files, tmp_path):
    files["validation"] = write_csv(tmp_path / "validation.csv", [("a film", "pos"), ("a film", "neutral")])
    with pytest.raises(ValueError) as err:
        loaded(custom(files))
    assert str(err.value) == (
        f"task.labels: task films: label(s) ['neutral'] in split 'validation' ({files['validation']}) are not in "
        "the train split's labels ['neg', 'pos'] (the label map: its distinct labels, sorted); set task.labels to "
        "every label in id order (e.g. [neg, pos, neutral]), or fix the file")
    with pytest.raises(ValueError, match=r"^task\.labels: task films: label\(s\) \['neg'\] in split 'train' .* "
                                         r"not in task\.labels \['pos', 'meh'\];"):
        loaded(custom(files, "task.labels=[pos, meh]"))
    head, _ = loaded(custom(files, "task.labels=[neg, neutral, pos]"))      # the fix the message gives
    assert head.label_names == ["neg", "neutral", "pos"] and head.spec.num_labels == 3


def test_a_count_that_disagrees_or_a_single_label_is_refused(files, tmp_path):
    with pytest.raises(ValueError, match=r"^task\.num_labels: is 3, but split 'train' \(.*train\.csv\) of task films "
                                         r"has 2 string label\(s\) \['neg', 'pos'\]; set task\.labels"):
        loaded(custom(files, "task.num_labels=3"))
    files["train"] = write_csv(tmp_path / "train.csv", [("a good film", "pos")])
    with pytest.raises(ValueError, match=r"^task\.labels: task films: split 'train' .* has one label \['pos'\]"):
        loaded(custom(files))


def test_integer_labels_are_ids_as_before(tmp_path):
    files = {s: write_csv(tmp_path / f"{s}.csv", [("a good film", 1), ("a bad film", 0)])
             for s in ("train", "validation")}
    spec = task_spec("films", ["sentence"], "label")
    data = load_task(spec, files)
    assert data["train"].features["label"].dtype == "int64" and data["train"]["label"] == [1, 0]
    assert with_data_labels(spec, data).label_names == () and with_data_labels(spec, data).num_labels == 2
    files["validation"] = write_csv(tmp_path / "validation.csv", [("a good film", 2)])
    with pytest.raises(ValueError, match=r"^task\.num_labels: task films: labels \[2\] in split 'validation' "
                                         r"\(.*validation\.csv\) are not integers in 0\.\.1"):
        load_task(spec, files)
    named = task_spec("films", ["sentence"], "label", labels=["neg", "pos"])   # integer ids, named
    assert load_task(named, {**files, "validation": files["train"]})["train"]["label"] == [1, 0]


def test_the_teacher_is_checked_against_the_inferred_map_once_the_data_is_read(files):
    three = type("Config", (), {"num_labels": 3, "id2label": {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}})()
    head, _ = loaded(custom(files))
    check_teacher_labels(task_spec("films", ["sentence"], "label"), three)   # before: the size is not known
    with pytest.raises(ValueError, match=r"^distillation\.teacher: predicts 3 labels, task films has 2$"):
        head.check_teacher(three)


@pytest.mark.parametrize("overrides, message", [
    (["task.labels=[pos, neg, pos]"], "task.labels: must name each label once, got ['pos', 'neg', 'pos'] (pos "
                                      "repeated)"),
    (["task.labels=[neg, pos]", "task.num_labels=3"], "task.num_labels: is 3, but task.labels names 2 labels"),
    (["task.labels=[pos]"], "task.labels: must be a list of two or more label names in id order"),
    (["task.labels=[no, yes]"], "task.labels: must be a list of two or more label names in id order, e.g. "
                                "[neg, pos] (quote a name YAML reads as a number or a boolean"),
])
def test_bad_label_maps_name_the_key_before_anything_loads(files, overrides, message):
    with pytest.raises(ConfigError) as err:
        custom(files, *overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_squad_has_no_labels():
    with pytest.raises(ConfigError, match=r"^task\.labels: task squad \(extractive question answering\) has no"):
        load_finetune_recipe(None, ["task.name=squad", "task.doc_stride=64", "task.labels=[a, b]"])


# -- run identity: a changed label map is another run ------------------------------------------------

def test_the_label_map_is_part_of_the_run_identity_and_absent_when_not_given(files):
    from finetune.trainer import finetune_identity
    inferred = finetune_identity(custom(files))
    assert not any(k.startswith("task.labels") for k in inferred)    # integer-label runs: the identity as before
    given = finetune_identity(custom(files, "task.labels=[neg, pos]"))
    swapped = finetune_identity(custom(files, "task.labels=[pos, neg]"))
    assert [k for k in given if given[k] != swapped.get(k)] == ["task.labels"] and given != inferred


# -- end to end: a tiny model trained on pos/neg, its export names the classes ------------------------

def tiny_classifier(out: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2)).save_pretrained(out)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(out)
    return out


@pytest.fixture
def fresh_accelerate():
    """Accelerate's process-wide state, reset before and after (an Accelerator is a singleton per process)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("given, names", [(None, ["neg", "pos"]), ("[pos, neg]", ["pos", "neg"])])
def test_the_exported_model_names_its_classes(files, tmp_path, fresh_accelerate, monkeypatch, given, names):
    from transformers import pipeline

    from finetune.trainer import run
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    out = tmp_path / "run"
    summary = run(custom(files, *([f"task.labels={given}"] if given else []), "task.max_seq_length=16",
                         f"model.name_or_path={tiny_classifier(tmp_path / 'student')}", "model.pattern_lock=false",
                         "distillation.lambda_task=1", "training.max_steps=1", "training.batch_size=4",
                         f"training.output_dir={out}"))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["label2id"] == {n: i for i, n in enumerate(names)}
    assert summary["labels"] == names and json.loads((out / "metrics.json").read_text())["labels"] == names
    predicted = pipeline("text-classification", model=str(out / "model"), device="cpu")("a good film")
    assert predicted[0]["label"] in names
