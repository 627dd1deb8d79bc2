"""How `make test` splits the suite over two xdist workers (tests/support/xdist_split.py), checked on a
small suite of its own: each module on one worker, the longest module handed out first."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SUPPORT = Path(__file__).resolve().parents[1] / "support"

RECORD = """
import json, os, time
def record(name):
    with open(os.environ["SPLIT_LOG"], "a") as f:
        f.write(json.dumps({"test": name, "worker": os.environ["PYTEST_XDIST_WORKER"], "at": time.time()}) + "\\n")
"""


def test_each_module_runs_on_one_worker_and_the_longest_starts_first(tmp_path):
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(SUPPORT)!r})\n"
                                          "from xdist_split import pytest_collection_modifyitems, "
                                          "pytest_xdist_make_scheduler  # noqa: F401\n")
    (tmp_path / "record.py").write_text(RECORD)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    for module in ("a", "b", "c"):          # collected first; four quick tests each
        (tmp_path / f"test_{module}.py").write_text(textwrap.dedent(f"""
            import pytest
            from record import record
            @pytest.mark.parametrize("i", range(4))
            def test_quick(i):
                record("{module}")
        """))
    (tmp_path / "test_z_long.py").write_text(textwrap.dedent("""
        import pytest
        from record import record
        @pytest.mark.slow
        @pytest.mark.parametrize("i", range(3))
        def test_long(i):
            record("z_long")
    """))
    log = tmp_path / "log.jsonl"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "xdist", "-n", "2", "--dist", "loadgroup",
                           "-p", "no:cacheprovider", "-q", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SPLIT_LOG": str(log), "PYTHONPATH": str(tmp_path),
                                            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(runs) == 3 * 4 + 3
    workers = {}
    for run in runs:
        workers.setdefault(run["test"], set()).add(run["worker"])
    assert workers == {m: {next(iter(w))} for m, w in workers.items()}, workers     # one worker per module
    assert len(set().union(*workers.values())) == 2                                # and both workers used
    long_worker = next(iter(workers["z_long"]))
    first_on_it = min((r for r in runs if r["worker"] == long_worker), key=lambda r: r["at"])
    assert first_on_it["test"] == "z_long"           # collected last, handed out first
