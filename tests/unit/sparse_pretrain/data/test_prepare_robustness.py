"""prepare-data leaves nothing half-done: SIGTERM mid-way removes its temporary directory (worker
processes included), the next run removes one a SIGKILL left (and only that), two runs of the same
settings keep the first to finish, and bad sources or a full disk give one clear line, exit code 2."""
from __future__ import annotations

import errno
import gc
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain_fixtures import env, make_corpus, minilm_dir, write_recipe
from sparse_pretrain.runtime.atomic import (
    OwnedTempDir,
    Terminated,
    owned_temp_dir,
    owned_temp_dirs,
    remove_stale_temp_dirs,
    sigterm_raises,
)

PRUNE_OFA = os.path.join(os.path.dirname(sys.executable), "prune-ofa")
os.environ["HF_HUB_OFFLINE"] = "1"


def recipe_file(tmp_path: Path, data_files, cache_dir: Path, num_proc: int = 1) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", model={"name_or_path": minilm_dir()},
                        data={"data_files": [str(f) for f in data_files], "cache_dir": str(cache_dir),
                              "max_seq_length": 64, "validation_fraction": 0.05, "num_proc": num_proc})


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """3,000 documents (2 MB): tokenizing and building rows take a second or two, time to signal."""
    return make_corpus(tmp_path_factory.mktemp("big") / "docs.jsonl", documents=3000)


# -- SIGTERM --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("num_proc,to_group", [(1, False), (2, True)], ids=["one-process", "workers-group"])
def test_sigterm_mid_way_removes_everything(tmp_path, big_corpus, num_proc, to_group):
    """SIGTERM while a map writes into the temporary directory: the process dies of the signal (after
    cleaning up), nothing is left under data.cache_dir, and no worker outlives it. ``to_group``: the
    whole process group gets it, workers too, as ``scancel`` signals every process of a job."""
    cache = tmp_path / "prepared"
    recipe = recipe_file(tmp_path, [big_corpus], cache, num_proc)
    process = subprocess.Popen([PRUNE_OFA, "prepare-data", "--config", str(recipe)], env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        writing = []
        while not writing:       # a datasets map is writing its output file inside the temporary directory
            writing = glob.glob(str(cache / ".*" / "cache" / "tmp*"))
            assert process.poll() is None, f"ended before it was mid-way:\n{process.communicate()}"
            assert time.time() < deadline, "never started writing"
            time.sleep(0.01)
        tree = psutil.Process(process.pid).children(recursive=True)
        if num_proc > 1:
            assert len(tree) >= num_proc, "the workers are not running"
        assert process.poll() is None                     # still working when signalled
        if to_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)        # does not hang
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGTERM, (process.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert entries(cache) == []                           # neither the temporary nor a final directory
    survivors = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, f"workers still running: {survivors}"


def test_sigterm_raises_once_then_hands_the_signal_on():
    received = []

    def record(signum, frame):
        received.append(signum)
    previous = signal.signal(signal.SIGTERM, record)
    try:
        with pytest.raises(Terminated):
            with sigterm_raises():
                with pytest.raises(Terminated):
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)                          # not reached: the handler raises at once
                os.kill(os.getpid(), signal.SIGTERM)       # during the cleanup: held back
                time.sleep(0.05)
                assert received == []
                raise Terminated("the first one, still on its way out")
        assert received == [signal.SIGTERM]                # the previous handler got it, once, after
        assert signal.getsignal(signal.SIGTERM) is record
        with sigterm_raises():                             # no signal: nothing handed on
            pass
        assert received == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)      # ignored before: left ignored
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- what a killed run left -----------------------------------------------------------------------

def owned_by_child(target: Path, stay: bool) -> tuple[Path, subprocess.Popen]:
    """A temporary directory for ``target`` made by another process, which exits (as if killed)
    unless ``stay``."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sparse_pretrain.runtime.atomic import owned_temp_dir; "
                               f"print(owned_temp_dir({str(target)!r}), flush=True); "
                               f"time.sleep(600 if {stay} else 0)"],
        env=env(), stdout=subprocess.PIPE, text=True)
    path = Path(child.stdout.readline().strip())
    (path / "partial.arrow").write_bytes(b"\0" * 1000)
    if not stay:
        child.wait()
    return path, child


def prepare_recipe(tmp_path, *overrides):
    from sparse_pretrain.recipe import load_recipe
    return load_recipe(None, [f"model.name_or_path={minilm_dir()}", f"data.data_files=[{tmp_path}/docs.jsonl]",
                              f"data.cache_dir={tmp_path}/prepared", "data.max_seq_length=64",
                              "data.num_proc=1", *overrides])


@pytest.mark.slow
def test_next_run_removes_a_dead_runs_temporary_directory_and_keeps_a_live_ones(tmp_path):
    from sparse_pretrain.data.prepare import INFO_FILE, prepare_dataset, prepared_path
    make_corpus(tmp_path / "docs.jsonl", documents=40)
    recipe = prepare_recipe(tmp_path)
    final = prepared_path(recipe)
    final.parent.mkdir(parents=True)
    dead, _ = owned_by_child(final, stay=False)
    other_settings, _ = owned_by_child(final.with_name("corpus-64-0123456789abcdef"), stay=False)
    live, live_child = owned_by_child(final, stay=True)
    try:
        host_and_suffix = dead.name.split("@", 1)[1]
        reused = final.parent / f".{final.name}.{os.getpid()}-1@{host_and_suffix}"   # this PID, started at
        reused.mkdir()                                     # another time: the PID was reused, its owner gone
        elsewhere = final.parent / f".{final.name}.{os.getpid()}-1@another-host.abcd1234"
        elsewhere.mkdir()                                  # another host's: cannot be asked, kept
        logged = []
        assert prepare_dataset(recipe, log=logged.append) == final
        assert not dead.exists() and not other_settings.exists() and not reused.exists()
        assert live.is_dir() and (live / "partial.arrow").is_file() and elsewhere.is_dir()
        assert (final / INFO_FILE).is_file() and oct(final.stat().st_mode & 0o777) == "0o755"
        assert any(f"PID {live_child.pid}" in line and "building these settings too" in line for line in logged)
        assert any(str(dead) in line and "killed" in line for line in logged)
        assert sorted(p.name for p in final.parent.iterdir()) == sorted([final.name, live.name, elsewhere.name])
    finally:
        live_child.kill()
        live_child.wait()
    prepare_dataset(recipe, log=lambda *_: None)          # already prepared; its owner gone now
    assert not live.exists() and elsewhere.is_dir()


def test_owner_is_read_back_from_the_name(tmp_path):
    made = owned_temp_dir(tmp_path / "rows-64-abc")
    (found,) = owned_temp_dirs(tmp_path)
    assert found.path == made and found.target == "rows-64-abc" and found.pid == os.getpid()
    assert found.owner_alive() is True
    assert OwnedTempDir(made, "rows-64-abc", os.getpid(), found.host, "1").owner_alive() is False  # reused PID
    assert OwnedTempDir(made, "rows-64-abc", os.getpid(), "elsewhere", found.start).owner_alive() is None
    assert remove_stale_temp_dirs(tmp_path) == [] and made.is_dir()
    (tmp_path / ".rows-64-abc.x1y2z3w4").mkdir()          # not ours (no owner in the name): never touched
    assert [o.path for o in owned_temp_dirs(tmp_path)] == [made]


def test_two_runs_of_the_same_settings_keep_the_first_to_finish(tmp_path, monkeypatch):
    """A second run that finds the final directory there when it finishes keeps it (the same rows:
    the settings hash names them) instead of deleting rows a trainer may already read."""
    import datasets

    from sparse_pretrain.data.prepare import INFO_FILE, prepare_dataset, prepared_path
    make_corpus(tmp_path / "docs.jsonl", documents=40)
    recipe = prepare_recipe(tmp_path)
    final = prepared_path(recipe)
    real_save, first, logged = datasets.DatasetDict.save_to_disk, {}, []

    def save_while_another_run_finishes(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        if not first:                                      # the other run starts and finishes meanwhile
            first["started"] = True
            first["path"] = prepare_dataset(recipe, log=logged.append)
            first["inode"] = os.stat(final / INFO_FILE).st_ino
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", save_while_another_run_finishes)
    assert prepare_dataset(recipe, log=logged.append) == final == first["path"]
    assert os.stat(final / INFO_FILE).st_ino == first["inode"]                  # the first one's, untouched
    assert any("building these settings too" in line for line in logged)        # the other saw this one
    assert any("finished these settings first" in line for line in logged)
    assert entries(final.parent) == [final.name]                                # no temporary directory left


# -- clear messages -------------------------------------------------------------------------------

def run_cli(capsys, recipe: Path) -> tuple[int, str, str]:
    from launcher.cli import main
    code = main(["prepare-data", "--config", str(recipe)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "prepare-data: " in lines[0]
    return lines[0]


def bad_source(tmp_path: Path, case: str) -> tuple[list, str]:
    """(data_files, the path the message must name) for one kind of bad source."""
    docs = make_corpus(tmp_path / "docs.jsonl", documents=5)
    if case == "empty file":
        (tmp_path / "empty.jsonl").write_text("")
        return [docs, tmp_path / "empty.jsonl"], str(tmp_path / "empty.jsonl")
    if case == "blank file":
        (tmp_path / "blank.jsonl").write_text("\n \n")
        return [tmp_path / "blank.jsonl"], str(tmp_path / "blank.jsonl")
    if case == "directory":
        return [tmp_path], str(tmp_path)
    if case == "unknown format":
        (tmp_path / "docs.xml").write_text("<doc>text</doc>\n")
        return [docs, tmp_path / "docs.xml"], str(tmp_path / "docs.xml")
    if case == "two formats":
        (tmp_path / "docs.txt").write_text("Some text.\n")
        return [docs, tmp_path / "docs.txt"], str(tmp_path / "docs.txt")
    if case == "missing file":
        return [tmp_path / "nothere.jsonl"], str(tmp_path / "nothere.jsonl")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty file", "blank file", "directory", "unknown format", "two formats",
                                  "missing file"])
def test_bad_source_is_one_line_before_any_work(tmp_path, capsys, case):
    data_files, path = bad_source(tmp_path, case)
    cache = tmp_path / "prepared"
    code, out, err = run_cli(capsys, recipe_file(tmp_path, data_files, cache))
    line = one_line(err)
    assert code == 2 and path in line, line
    expected = {"empty file": "is empty", "blank file": "is empty", "directory": "directory",
                "unknown format": ".jsonl", "two formats": "format", "missing file": "matches no file"}[case]
    assert expected in line, line
    if case == "unknown format":
        assert "data.data_format" in line, line
    assert "tokenizing" not in out and not cache.exists()          # refused before any work, nothing written


@pytest.mark.slow
def test_bad_source_in_a_real_process(tmp_path):
    """The same through the installed command: exit code 2, one line, no traceback."""
    data_files, path = bad_source(tmp_path, "empty file")
    done = subprocess.run([PRUNE_OFA, "prepare-data", "--config",
                           str(recipe_file(tmp_path, data_files, tmp_path / "prepared"))],
                          env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and path in one_line(done.stderr) and "is empty" in done.stderr, done.stderr


def test_prepare_itself_refuses_a_directory(tmp_path):
    """Called without the CLI's preflight (``python -m launcher.data_commands``, or in-process)."""
    from sparse_pretrain.data.prepare import prepare_dataset
    (tmp_path / "corpus").mkdir()
    make_corpus(tmp_path / "corpus" / "docs.jsonl", documents=5)
    recipe = prepare_recipe(tmp_path, f"data.data_files=[{tmp_path}/corpus]")
    with pytest.raises(ValueError, match=f"{tmp_path}/corpus' is a directory.*{tmp_path}/corpus/\\*\\.jsonl"):
        prepare_dataset(recipe, log=lambda *_: None)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs the right to mount: root outside a restricted container)."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: the injected ENOSPC test covers the message")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the injected ENOSPC test covers it")
    yield where
    gc.collect()                 # datasets still mapping deleted files keep the mount busy
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_names_the_path_the_free_and_the_needed_space(tmp_path, capsys, big_corpus, small_disk):
    cache = small_disk / "prepared"
    code, out, err = run_cli(capsys, recipe_file(tmp_path, [big_corpus], cache))
    line = one_line(err)
    assert code == 2 and str(cache) in line and "no space left" in line, line
    assert "MB free" in line and "MB needed" in line, line            # the disk's 2 MB; ~7x the 2 MB input
    assert entries(cache) == []                                       # nothing half-written kept


def test_full_disk_injected(tmp_path, capsys, monkeypatch):
    """Where no tmpfs can be mounted: ENOSPC raised while the rows are saved."""
    import datasets

    def no_space(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"\0" * 100)    # half-written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", no_space)
    make_corpus(tmp_path / "docs.jsonl", documents=40)
    cache = tmp_path / "prepared"
    code, out, err = run_cli(capsys, recipe_file(tmp_path, [tmp_path / "docs.jsonl"], cache))
    line = one_line(err)
    assert code == 2 and str(cache) in line and "no space left" in line and "needed" in line, line
    assert entries(cache) == []
