"""The shipped fine-tuning recipes load, and the transfer/QAT ones carry the paper's settings."""
import re
from pathlib import Path

import pytest

from finetune.heads import QuestionAnsweringHead, head_for
from finetune.recipe import load_finetune_recipe
from sparse_pretrain.runtime.schema import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs" / "finetune").glob("*.yaml"))
PAPER_TASKS = ("squad", "mnli", "qqp", "qnli", "sst2")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_recipe_loads(path):
    recipe = load_finetune_recipe(path)
    assert recipe.training.output_dir == f"runs/{path.stem}"
    head = head_for(recipe.task)
    if recipe.model.pattern_lock:       # transfer and QAT: KD alone from the dense task teacher, T = 2
        d = recipe.distillation
        assert (d.lambda_kd, d.lambda_task, d.temperature) == (1.0, 0.0, 2.0) and d.teacher
    else:                               # the dense task teacher
        assert recipe.distillation.teacher is None and recipe.distillation.lambda_task == 1.0
    assert recipe.qat.enabled == path.stem.endswith("-qat")
    if recipe.task.name == "squad":
        assert isinstance(head, QuestionAnsweringHead)
        assert (recipe.task.max_seq_length, recipe.task.doc_stride) == (384, 128)


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_each_paper_task_has_teacher_transfer_and_qat_recipes_that_chain(task):
    teacher = load_finetune_recipe(f"configs/finetune/{task}-teacher.yaml")
    sparse = load_finetune_recipe(f"configs/finetune/{task}-transfer.yaml")
    qat = load_finetune_recipe(f"configs/finetune/{task}-qat.yaml")
    assert sparse.distillation.teacher == qat.distillation.teacher == f"{teacher.training.output_dir}/model"
    assert qat.model.name_or_path == f"{sparse.training.output_dir}/model"
    assert sparse.model.name_or_path == "runs/bert-base-uncased-85/model"   # configs/bert-base-uncased-85.yaml's export


def test_squad_doc_stride_must_be_smaller_than_the_window():
    from sparse_pretrain.runtime.schema import ConfigError
    with pytest.raises(ConfigError, match=re.escape("task.doc_stride")):
        load_finetune_recipe("configs/finetune/squad-transfer.yaml", ["task.doc_stride=384"])


def test_a_recipe_without_a_distillation_section_names_the_dotted_key():
    with pytest.raises(ConfigError, match=r"^distillation\.lambda_task: is 0 and there is no distillation\.teacher"):
        load_finetune_recipe(None, [])
