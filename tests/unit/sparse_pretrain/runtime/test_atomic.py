"""Atomic writes (sparse_pretrain/runtime/atomic.py): a file or a directory is either the old one or the
complete new one, after an exception and after a SIGKILL in the middle of writing."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_pretrain.runtime.atomic import replacing, replacing_dir, write_text

ROOT = Path(__file__).resolve().parents[4]


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk went away")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    with replacing_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with replacing_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk went away")
    assert (target / "weights").read_text() == "old"
    with replacing_dir(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]      # no temporary, no .old


KILLED_MID_WRITE = """
import os, signal, sys
from sparse_pretrain.runtime.atomic import replacing, replacing_dir
kind, target = sys.argv[1], sys.argv[2]
with (replacing(target) if kind == "file" else replacing_dir(target)) as tmp:
    if kind == "file":
        tmp.write_text("half")
    else:
        (tmp / "weights").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_sigkill_mid_write_leaves_the_old_version(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        write_text(target, "old")
    else:
        with replacing_dir(target) as tmp:
            (tmp / "weights").write_text("old")
    done = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, kind, str(target)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr        # it really died mid-write
    assert (target.read_text() if kind == "file" else (target / "weights").read_text()) == "old"
