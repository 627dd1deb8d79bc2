"""What the fine-tuning loop needs from a task, for the two kinds of task the paper transfers to:
sentence (pair) classification (GLUE, RT sentiment, custom sets) and extractive question answering
(SQuAD v1.1). Each head says which Hugging Face model class it trains, how its data becomes
features, which logits the student distils from the teacher, and how it is scored.

The loop in ``trainer.py`` stays the same for both; only these pieces differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from finetune.tasks.classification import (
    TaskSpec,
    check_teacher_labels,
    classification_metrics,
    load_task,
    tokenize_classification,
    with_data_labels,
)


@dataclass
class Features:
    """Tokenized data: the training features, one evaluation set per split, and the collator."""
    train: object
    eval: dict
    collate: Callable


class ClassificationHead:
    """``AutoModelForSequenceClassification``; KD on the class logits; accuracy (and F1 for QQP)."""
    kind = "classification"

    def __init__(self, spec: TaskSpec, max_seq_length: int):
        self.spec, self.max_seq_length = spec, max_seq_length

    @property
    def eval_splits(self):
        return self.spec.eval_splits

    def model_class(self):
        from transformers import AutoModelForSequenceClassification
        return AutoModelForSequenceClassification

    @property
    def label_names(self) -> Optional[list]:
        """The class names in id order (None: integer labels without names)."""
        return list(self.spec.label_names) or None

    def model_kwargs(self) -> dict:
        """``num_labels`` and, when the labels have names, ``id2label``/``label2id``: they go into the
        config ``save_pretrained`` writes, so the exported model (a ``text-classification`` pipeline)
        names its classes."""
        kwargs = {"num_labels": self.spec.num_labels}
        if self.spec.label_names:
            id2label = dict(enumerate(self.spec.label_names))
            kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
        return kwargs

    def check_teacher(self, teacher_config) -> None:
        check_teacher_labels(self.spec, teacher_config)

    def load(self, data_files: Optional[dict], seed: int):
        """The task's splits, columns and labels checked, string labels encoded; the head's spec then
        has the label map (inferred from the train split when the recipe gave none)."""
        data = load_task(self.spec, data_files, seed=seed)
        self.spec = with_data_labels(self.spec, data)
        return data

    def features(self, data, tokenizer) -> Features:
        from transformers import DataCollatorWithPadding
        tokenized = tokenize_classification(data, tokenizer, self.spec, self.max_seq_length)
        return Features(tokenized[self.spec.train_split], {s: tokenized[s] for s in self.eval_splits},
                        DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8))

    @staticmethod
    def distilled_logits(output) -> tuple:
        return (output.logits,)

    @torch.no_grad()
    def evaluate(self, model, loader, split: str, gather=lambda x: x) -> dict:
        """Metrics of ``model`` over ``loader``; ``gather`` collects every process's predictions
        (Accelerate's ``gather_for_metrics``; the identity in one process)."""
        predictions, labels = [], []
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            preds, refs = gather((logits.argmax(-1), batch["labels"]))
            predictions.append(preds.cpu().numpy())
            labels.append(refs.cpu().numpy())
        return classification_metrics(np.concatenate(predictions), np.concatenate(labels), self.spec.metrics)


class QuestionAnsweringHead:
    """``AutoModelForQuestionAnswering`` on SQuAD v1.1: sliding windows for training and
    evaluation (``squad.py``), KD on the start and end logits (their mean, as the paper's code
    does), exact match and F1 of the official script over whole questions."""
    kind = "question-answering"
    eval_splits = ("validation",)
    label_names = None
    HUB_NAME = "rajpurkar/squad"

    def __init__(self, max_seq_length: int, doc_stride: int, n_best_size: int, max_answer_length: int):
        self.max_seq_length, self.doc_stride = max_seq_length, doc_stride
        self.n_best_size, self.max_answer_length = n_best_size, max_answer_length
        self._examples, self._eval_features = {}, {}

    def model_class(self):
        from transformers import AutoModelForQuestionAnswering
        return AutoModelForQuestionAnswering

    @staticmethod
    def model_kwargs() -> dict:
        return {}

    @staticmethod
    def check_teacher(teacher_config) -> None:
        if not any(a.endswith("ForQuestionAnswering") for a in (teacher_config.architectures or [])):
            raise ValueError(f"distillation.teacher: a SQuAD teacher must be a question-answering model "
                             f"(its config says {teacher_config.architectures})")

    def load(self, data_files: Optional[dict], seed: int):
        """Local files in the official SQuAD v1.1 format (split -> path), or the hub's ``squad``."""
        import datasets

        from finetune.tasks.squad import load_squad
        if data_files:
            missing = [s for s in ("train", *self.eval_splits) if s not in data_files]
            if missing:
                raise ValueError(f"task squad: task.data_files has no {missing} (have {sorted(data_files)})")
            return datasets.DatasetDict({s: load_squad(p) for s, p in data_files.items()})
        return datasets.DatasetDict({s: load_squad(self.HUB_NAME, split=s) for s in ("train", *self.eval_splits)})

    def features(self, data, tokenizer) -> Features:
        from transformers import default_data_collator

        from finetune.tasks.squad import prepare_eval_features, prepare_train_features
        args = {"tokenizer": tokenizer, "max_seq_length": self.max_seq_length, "doc_stride": self.doc_stride}
        train = data["train"].map(prepare_train_features, batched=True, fn_kwargs=args,
                                  remove_columns=data["train"].column_names)
        model_columns = [c for c in train.column_names if c not in ("start_positions", "end_positions")]
        evals = {}
        for split in self.eval_splits:
            features = data[split].map(prepare_eval_features, batched=True, fn_kwargs=args,
                                       remove_columns=data[split].column_names)
            self._examples[split], self._eval_features[split] = data[split], features
            evals[split] = features.select_columns(model_columns)   # what the model reads
        return Features(train, evals, default_data_collator)

    @staticmethod
    def distilled_logits(output) -> tuple:
        return (output.start_logits, output.end_logits)

    @torch.no_grad()
    def evaluate(self, model, loader, split: str, gather=lambda x: x) -> dict:
        """Start/end logits of every window, gathered in order, decoded into one answer per question
        (n-best spans over all its windows) and scored with the official EM/F1."""
        from finetune.tasks.squad import postprocess_predictions, references_from, squad_metrics
        starts, ends = [], []
        for batch in loader:
            out = model(**batch)
            start, end = gather((out.start_logits, out.end_logits))
            starts.append(start.float().cpu().numpy())
            ends.append(end.float().cpu().numpy())
        examples, features = self._examples[split], self._eval_features[split]
        predictions = postprocess_predictions(examples, features, np.concatenate(starts), np.concatenate(ends),
                                              self.n_best_size, self.max_answer_length)
        return squad_metrics(predictions, references_from(examples))


def head_for(task) -> ClassificationHead | QuestionAnsweringHead:
    """The head of a recipe's ``task`` section."""
    if task.name == "squad":
        return QuestionAnsweringHead(task.max_seq_length, task.doc_stride, task.n_best_size, task.max_answer_length)
    from finetune.tasks.classification import task_spec
    return ClassificationHead(task_spec(task.name, task.text_columns, task.label_column, task.num_labels,
                                        task.labels), task.max_seq_length)

