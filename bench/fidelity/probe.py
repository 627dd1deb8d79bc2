"""How much of a task the frozen features of a model already separate: a linear probe on the [CLS] hidden
state and on the mean of the token states of the last layer, trained on the fit rows and scored on the dev
rows that ``lr_sweep.py`` carves from a task's training split (never the study's validation split).

If the sparse student's features probe about as well as the dense teacher's, its weak transfer is a matter
of optimization (learning rate, the head, the pooler), not of what pruning left in the encoder.

    python bench/fidelity/probe.py --task bbc-news runs/fidelity/cpu-medium/teacher/model \
        runs/fidelity/cpu-medium/seed0/student-ofa/model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fidelity.inputs import TEXT_COLUMN
from bench.fidelity.lr_sweep import write_dev_split
from bench.fidelity.study import ROOT


@torch.no_grad()
def features(model_dir: str, texts: list, max_length: int, batch: int = 64) -> dict:
    """[CLS] and masked-mean last hidden states (the encoder only: no pooler, no head)."""
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    cls, mean = [], []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        cls.append(hidden[:, 0])
        mean.append((hidden * mask).sum(1) / mask.sum(1))
    return {"cls": torch.cat(cls), "mean": torch.cat(mean)}


def probe_accuracy(train_x, train_y, test_x, test_y, weight_decay: float = 1e-3, steps: int = 300) -> float:
    """Multinomial logistic regression on standardized features (full-batch L-BFGS), accuracy on test."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(test_x).argmax(1) == test_y).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model directories")
    parser.add_argument("--task", default="bbc-news", choices=sorted(TEXT_COLUMN))
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "fidelity" / "cpu-medium")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    files = write_dev_split(args.runs / "tasks" / f"{args.task}-train.jsonl", args.runs / "lr-sweep" / "tasks",
                            args.task)
    rows = {split: [json.loads(line) for line in Path(path).read_text().splitlines()] for split, path in files.items()}
    column = TEXT_COLUMN[args.task]
    names = sorted({str(r["label"]) for r in rows["train"]})        # labels may be names or integers
    labels = {split: torch.tensor([names.index(str(r["label"])) for r in rs]) for split, rs in rows.items()}
    out = {}
    for model in args.models:
        feats = {split: features(model, [r[column] for r in rs], args.max_length) for split, rs in rows.items()}
        out[model] = {kind: probe_accuracy(feats["train"][kind], labels["train"], feats["validation"][kind],
                                           labels["validation"]) for kind in ("cls", "mean")}
        print(f"{model}: linear probe on {args.task} dev rows ({len(labels['validation'])}), "
              f"[CLS] {100 * out[model]['cls']:.1f}%, mean of tokens {100 * out[model]['mean']:.1f}%", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
