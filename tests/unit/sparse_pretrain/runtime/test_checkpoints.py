"""The checkpoint protocol both recipes share (sparse_pretrain/runtime/checkpoints.py), in one process:
what ``latest`` names, what a kill leaves and the next start removes, retention, a failed save."""
from pathlib import Path

import pytest
import torch

from sparse_pretrain.runtime import checkpoints
from sparse_pretrain.runtime.schema import ConfigError


def one_rank(flag: int) -> int:
    return flag


def save(root: Path, step: int, keep: int = 2, write=None) -> Path:
    def engine_files(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((2,), float(step))}, directory / "engine.pt")
    return checkpoints.save(root, step, write or engine_files, {"trainer/rank00000.pt": {"step": step}}, rank=0,
                            any_rank=one_rank, keep=keep)


def test_latest_names_the_newest_complete_checkpoint_and_retention_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert checkpoints.latest(tmp_path) == tmp_path / checkpoints.name_for(6)
    assert checkpoints.record(checkpoints.latest(tmp_path)) == {"step": 6}
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoints.name_for(4), checkpoints.name_for(6)]
    assert torch.load(tmp_path / checkpoints.name_for(6) / "engine.pt")["w"].tolist() == [6.0, 6.0]


def test_what_a_kill_left_goes_at_the_next_start_and_latest_is_kept(tmp_path):
    save(tmp_path, 2)
    partial = tmp_path / f"{checkpoints.PARTIAL}{checkpoints.name_for(4)}"   # killed while writing step 4
    partial.mkdir()
    (partial / "engine.pt").write_bytes(b"half")
    unnamed = save(tmp_path / "other", 6).rename(tmp_path / checkpoints.name_for(6))  # renamed, latest not moved
    assert checkpoints.latest(tmp_path).name == checkpoints.name_for(2)
    checkpoints.remove_unfinished(tmp_path, keep=2)
    assert not partial.exists() and not unnamed.exists()
    assert [p.name for p in tmp_path.glob("step_*")] == [checkpoints.name_for(2)]


def test_a_failed_save_is_removed_leaves_the_previous_one_and_says_so(tmp_path):
    save(tmp_path, 2)

    def full_disk(directory: Path) -> None:
        directory.mkdir(parents=True)
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match=r"saving the training state at step 4 .* is intact and a rerun resumes from it"):
        save(tmp_path, 4, write=full_disk)
    assert not list(tmp_path.glob(f"{checkpoints.PARTIAL}*"))
    assert checkpoints.latest(tmp_path).name == checkpoints.name_for(2)


def test_a_checkpoint_of_the_earlier_format_is_refused_not_silently_restarted(tmp_path):
    old = tmp_path / "step_000200"
    old.mkdir()
    (old / "COMPLETE").write_text("")
    (tmp_path / "latest").write_text("step_000200\n")
    with pytest.raises(ConfigError, match="earlier prune-ofa"):
        checkpoints.latest(tmp_path)
