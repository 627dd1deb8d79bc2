"""One declarative schema for every recipe kind (``sparse_pretrain/runtime/schema.py``): pre-training,
fine-tuning, QAT and pipeline specs. Typed and ranged fields and unknown keys are rejected on load,
with one message that starts with the dotted key, before any model is built; the gaps the fuzz run
of issue 12 found (values accepted, tracebacks, late or unclear errors) are closed by the schema."""
from pathlib import Path

import pytest
import yaml

from finetune.recipe import load_finetune_recipe
from launcher.cli import main
from launcher.pipeline import PipelineError, load_pipeline
from sparse_pretrain.core.gmp_schedule import GMPSchedule, schedule_problems
from sparse_pretrain.recipe import load_recipe, recipe_from_dict
from sparse_pretrain.runtime.schema import ConfigError

ROOT = Path(__file__).resolve().parents[4]
PRETRAIN = ROOT / "configs" / "bert-base-uncased-90.yaml"
RT_TEACHER = ROOT / "configs" / "finetune" / "rt-teacher.yaml"
RT_SPARSE = ROOT / "configs" / "finetune" / "rt-transfer.yaml"
RT_QAT = ROOT / "configs" / "finetune" / "rt-qat.yaml"
FT_PRUNING = ROOT / "bench" / "fidelity" / "finetune-pruning-85.yaml"


def message(load, *args) -> str:
    with pytest.raises(ConfigError) as err:
        load(*args)
    text = str(err.value)
    assert "\n" not in text and "pydantic" not in text and "validation error" not in text, text   # ours, one line
    return text


# -- the gaps of issue 12, finding 8: each was accepted, a traceback, late or unclear -----------------

@pytest.mark.parametrize("override, expected", [
    ("training.max_grad_norm=-1", "training.max_grad_norm: must be >= 0, got -1"),
    ("training.eval_batches=0", "training.eval_batches: must be > 0, got 0"),
    ("training.adam_betas=[0.9]", "training.adam_betas: must be two numbers in [0, 1) (beta1, beta2), got [0.9]"),
    ("training.adam_betas=[0.9, 1.0]", "training.adam_betas: must be two numbers in [0, 1) (beta1, beta2), got "
                                       "[0.9, 1.0]"),
    ("training.adam_epsilon=0", "training.adam_epsilon: must be > 0, got 0"),
    ("training.adam_epsilon=-1e-8", "training.adam_epsilon: must be > 0, got -1e-08"),
    ("training.adam_epsilon=tiny", "training.adam_epsilon: must be a number > 0, got 'tiny'"),
    ("training.dataloader_workers=-1", "training.dataloader_workers: must be >= 0, got -1"),
    ("training.dataloader_workers=x", "training.dataloader_workers: must be an integer >= 0, got 'x'"),
    ("model.attn_implementation=flash", "model.attn_implementation: must be one of eager, sdpa, flash_attention_2, "
                                        "flash_attention_3, flex_attention, got 'flash'"),
    ("pruning.include=[]", "pruning.include: must be a non-empty list of regexes (module names to prune), got []"),
])
def test_pretraining_gaps_fail_on_load_naming_the_key(override, expected):
    assert message(load_recipe, PRETRAIN, [override]) == expected


@pytest.mark.parametrize("config, overrides, expected", [
    (RT_SPARSE, ["model.pattern_lock=maybe"], "model.pattern_lock: must be true or false, got 'maybe'"),
    (RT_TEACHER, ["training.weight_decay=-1"], "training.weight_decay: must be >= 0, got -1"),
    (RT_TEACHER, ["training.max_grad_norm=-1"], "training.max_grad_norm: must be >= 0, got -1"),
    (RT_TEACHER, ["training.save_every=0"], "training.save_every: must be > 0, got 0"),
    (RT_TEACHER, ["training.eval_every=-5"], "training.eval_every: must be > 0, got -5"),
    (RT_TEACHER, ["training.seed=abc"], "training.seed: must be an integer >= 0, got 'abc'"),
    (RT_TEACHER, ["training.output_dir=[a,b]"], "training.output_dir: must be a string, got ['a', 'b']"),
    (RT_TEACHER, ["training.eval_batch_size=0"], "training.eval_batch_size: must be > 0, got 0"),
    (RT_TEACHER, ["task.num_labels=-2"], "task.num_labels: must be >= 2, got -2"),
    (RT_TEACHER, ["task.name=reviews", "task.text_columns=[text]"],
     "task.data_files: task 'reviews' is not a known task (bbc-news, mnli, qnli, qqp, rt-sentiment, squad, sst2, "
     "trec): a custom "
     "task reads local files; set task.data_files: {train: FILE, validation: FILE}"),
    (RT_TEACHER, ["task.name=reviews", "task.data_files={train: a.csv, validation: b.csv}"],
     "task.text_columns: task 'reviews' is not a known task (bbc-news, mnli, qnli, qqp, rt-sentiment, squad, sst2, "
     "trec): a custom "
     "task names its text columns: set task.text_columns: [COLUMN] or [COLUMN, COLUMN] (and task.label_column, "
     "default label)"),
    (FT_PRUNING, ["pruning.include=[]"],
     "pruning.include: must be a non-empty list of regexes (module names to prune), got []"),
    (RT_QAT, ["qat.per_channel=maybe"], "qat.per_channel: must be true or false, got 'maybe'"),
    (RT_QAT, ["qat.reduce_range=2"], "qat.reduce_range: must be true or false, got 2"),
])
def test_finetuning_and_qat_gaps_fail_on_load_naming_the_key(config, overrides, expected):
    assert message(load_finetune_recipe, config, overrides) == expected


def test_schedule_command_refuses_an_empty_include_list(capsys):
    code = main(["schedule", "--config", str(PRETRAIN), "pruning.include=[]", "--steps", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prune-ofa schedule: invalid config: pruning.include: must be a non-empty"), err


def test_a_schedule_whose_mask_updates_miss_the_final_window_is_refused():
    """start=0, interval=3, policy_end=10, end=11: masks update at 0, 3, 6, 9 only, so they never
    reach final_sparsity (the last target is Eq. 1 at step 9)."""
    problems = dict(schedule_problems(0.0, 0.9, 0, 10, 11, 3))
    assert "interval" in problems
    text = problems["interval"]
    assert "0, 3, 6, 9" in text and "[10, 11]" in text and "end >= 12" in text, text
    with pytest.raises(ValueError, match=r"^interval: mask updates at 0, 3, 6, 9 "):
        GMPSchedule(final_sparsity=0.9, start=0, policy_end=10, end=11, interval=3)
    tree = {"pruning": {"start": 0, "policy_end": 10, "end": 11, "interval": 3}, "training": {
        "total_steps": 100, "warmup_steps": 1}}
    assert message(recipe_from_dict, tree).startswith("pruning.interval: mask updates at 0, 3, 6, 9 ")
    assert schedule_problems(0.0, 0.9, 0, 10, 12, 3) == []           # 12 is an update step: it is reached
    assert schedule_problems(0.0, 0.9, 0, 9, 11, 3) == []


# -- pipelines ---------------------------------------------------------------------------------------

def write_spec(tmp_path: Path, edit=None) -> Path:
    spec = {"name": "t", "output_root": str(tmp_path / "out"), "workdir": str(ROOT),
            "slurm": {"processes_per_node": 2, "time": "01:00:00", "signal_seconds": 60},
            "stages": {"teacher": {"kind": "pretrain", "config": "configs/minilm-l6-teacher.yaml"},
                       "report": {"kind": "report", "after": ["teacher"], "report": {"model": "@teacher/model"}}}}
    if edit:
        edit(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def pipeline_message(tmp_path, edit) -> str:
    with pytest.raises(PipelineError) as err:
        load_pipeline(write_spec(tmp_path, edit), check_partition=False)
    text = str(err.value)
    assert "\n" not in text and "pydantic" not in text, text
    return text


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s["slurm"].update(requeue="maybe"), "slurm.requeue: must be true or false or null, got 'maybe'"),
    (lambda s: s["slurm"].update(env=["A=1"]), "slurm.env: must be a mapping NAME: value, got ['A=1']"),
    (lambda s: s["slurm"].update(setup=5), "slurm.setup: must be a shell line or a list of them, got 5"),
    (lambda s: s["slurm"].update(launcher="magic"),
     "slurm.launcher: must be one of auto, deepspeed, torchrun, accelerate, srun, got 'magic'"),
    (lambda s: s["stages"]["teacher"].update(slurm={"partition": ["a", "b"]}),
     "stages.teacher.slurm.partition: must be a string or null, got ['a', 'b']"),
    (lambda s: s["stages"]["teacher"].update(slurm={"mem": [64]}),
     "stages.teacher.slurm.mem: must be a string or null, got [64]"),
    (lambda s: s.update(workdir=5), "workdir: must be a string or null, got 5"),
    (lambda s: s.update(output_root=["a"]), "output_root: must be a string, got ['a']"),
    (lambda s: s["stages"]["report"]["report"].update(model=5), "stages.report.report.model: must be a string, got 5"),
])
def test_pipeline_spec_gaps_fail_naming_the_dotted_key(tmp_path, edit, expected):
    assert pipeline_message(tmp_path, edit) == expected


def test_pipeline_unknown_keys_name_the_dotted_path_and_the_known_keys(tmp_path):
    text = pipeline_message(tmp_path, lambda s: s["stages"]["teacher"].update(slurm={"gpus_per_nod": 8}))
    assert text == ("stages.teacher.slurm.gpus_per_nod: unknown key (known: partition, account, time, nodes, "
                    "gpus_per_node, processes_per_node, cpus_per_task, mem, signal_seconds, requeue, launcher, "
                    "setup, env, extra, partition_gpus)")
    assert pipeline_message(tmp_path, lambda s: s.update(stage={})) == (
        "stage: unknown key (known: name, output_root, workdir, slurm, stages, classes, tasks, task_stages)")
    assert pipeline_message(tmp_path, lambda s: s["stages"]["report"]["report"].update(html=True)) == (
        "stages.report.report.html: unknown key (known: model, int8, metrics, baseline)")
    assert pipeline_message(tmp_path, lambda s: s["slurm"].update(nodes=0)) == "slurm.nodes: must be >= 1, got 0"
    assert pipeline_message(tmp_path, lambda s: s["stages"]["teacher"].pop("kind")) == (
        "stages.teacher.kind: must be set (one of prepare-data, pretrain, finetune, qat, report)")


def test_pipeline_defaults_merge_per_key_and_slurm_times_may_be_minutes(tmp_path):
    def edit(spec):
        spec["slurm"].update(time=90, mem=0, env={"A": "1"})
        spec["stages"]["teacher"]["slurm"] = {"env": {"B": 2}, "time": "00:30:00"}
    pipeline = load_pipeline(write_spec(tmp_path, edit), check_partition=False)
    teacher, report = pipeline.stages["teacher"].resources, pipeline.stages["report"].resources
    assert ((teacher.time, teacher.mem, teacher.env, teacher.processes_per_node)
            == ("00:30:00", "0", {"A": "1", "B": 2}, 2))
    assert (report.time, report.env) == ("90", {"A": "1"})


# -- how the schema reads values ----------------------------------------------------------------------

def test_unknown_keys_list_the_known_ones_in_every_recipe_kind():
    assert message(load_recipe, PRETRAIN, ["pruning.final_sparsty=0.8"]) == (
        "pruning.final_sparsty: unknown key (known: method, scope, initial_sparsity, final_sparsity, start, "
        "policy_end, end, interval, block_shape, n, m, module_types, include, exclude)")
    assert message(load_recipe, PRETRAIN, ["optimizer.lr=1"]).startswith(
        "optimizer: unknown section (known: stage, model, data, training, pruning, distillation)")
    assert message(load_finetune_recipe, RT_QAT, ["qat.bits=4"]) == (
        "qat.bits: unknown key (known: enabled, per_channel, reduce_range)")
    assert message(load_finetune_recipe, FT_PRUNING, ["pruning.rewind=true"]).startswith(
        "pruning.rewind: unknown key (known: method, scope, ")


@pytest.mark.parametrize("override, expected", [
    ("training.lr_rewind=2", "training.lr_rewind: must be true or false, got 2"),        # 2 is not a bool
    ("training.lr_rewind=maybe", "training.lr_rewind: must be true or false, got 'maybe'"),
    ("training.total_steps='1000'", "training.total_steps: must be an integer > 0, got '1000'"),   # nor a string an int
    ("training.total_steps=1000.5", "training.total_steps: must be an integer > 0, got 1000.5"),
    ("training.learning_rate=true", "training.learning_rate: must be a number > 0, got True"),
    ("training.learning_rate=.nan", "training.learning_rate: must be a finite number, got nan"),
    ("pruning.final_sparsity=1.5", "pruning.final_sparsity: must be a number in [0, 1), got 1.5"),
    ("pruning.include=[3]", "pruning.include: must be a non-empty list of regexes (module names to prune), got [3]"),
    ("pruning.module_types=[Linear, 3]", "pruning.module_types: must be a non-empty list of module class names, e.g. "
                                         "[Linear], got ['Linear', 3]"),
    ("training.zero_stage=5", "training.zero_stage: must be an integer in [0, 3], got 5"),
    ("stage=finetune", "stage: must be one of teacher, student, got 'finetune'"),
    ("training=5", "training: must be a mapping, got 5"),
])
def test_values_are_strictly_typed_and_ranged(override, expected):
    assert message(load_recipe, PRETRAIN, [override]) == expected


def test_yaml_1_1_exponents_read_as_numbers_and_the_first_problem_counts_the_rest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("training: {learning_rate: 5e-5, adam_epsilon: 1e-6, new_parameters_learning_rate: 1e-3}\n")
    assert isinstance(yaml.safe_load(path.read_text())["training"]["learning_rate"], str)   # YAML 1.1 says so
    t = load_recipe(path).training
    assert (t.learning_rate, t.adam_epsilon, t.new_parameters_learning_rate) == (5e-5, 1e-6, 1e-3)
    path.write_text("distillation:   # every key commented out: the defaults\n")
    assert load_recipe(path).distillation == recipe_from_dict({}).distillation
    assert message(load_recipe, PRETRAIN, ["training.eval_batches=0", "training.max_grad_norm=-1",
                                           "model.colour=red"]) == (
        "model.colour: unknown key (known: name_or_path, teacher_name_or_path, attn_implementation, teacher_zero3) "
        "(and 2 more problem(s))")


def test_a_recipe_round_trips_through_its_dict():
    recipe = load_recipe(PRETRAIN, ["pruning.method=block", "pruning.block_shape=[1,8]"])
    tree = recipe.to_dict()
    assert tree["pruning"]["block_shape"] == [1, 8] and tree["training"]["adam_betas"] == [0.9, 0.999]
    assert recipe_from_dict(tree) == recipe
    finetune = load_finetune_recipe(FT_PRUNING)
    assert finetune.to_dict()["pruning"]["lr_rewind"] is True and finetune.to_dict()["qat"]["enabled"] is False
