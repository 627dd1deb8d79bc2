"""How every entry point reports the errors a user can cause: one line, one process, exit code 2.

``run_main(prog, body)`` runs an entry point (``prune-ofa``, ``python -m sparse_pretrain``, ``python -m
finetune``) and reports the errors a user can cause (a bad recipe, a bad path, an input file that does
not exist, or a ValueError our own code raises about its input): one line naming the key or path, no
traceback, exit code 2, printed by one process only. Under ``prune-ofa launch`` a rank writes the line
to the launch's failure file instead (``$PRUNE_OFA_FAILURE_FILE``, first writer wins) and ``prune-ofa
launch`` prints it once and exits with its code (``launcher.launch.run`` reads it with
:func:`read_failure`). Without a launch, rank 0 prints at once; another rank waits
``OTHER_RANK_GRACE_S`` first, so that when every rank fails alike the launcher (torchrun, deepspeed,
srun --kill-on-bad-exit) has stopped it by then (it then exits with the same code, silently) and the
line appears once, while a failure only that rank sees is still shown. ``PRUNE_OFA_DEBUG=1`` turns all
of this off: tracebacks everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from sparse_pretrain.runtime.schema import ConfigError

#: names the file where the first rank that fails with a user error records it (set by prune-ofa launch)
FAILURE_FILE_ENV = "PRUNE_OFA_FAILURE_FILE"
#: set to 1 for tracebacks instead of one-line messages (and no filtering in prune-ofa launch)
DEBUG_ENV = "PRUNE_OFA_DEBUG"
#: exit code of a run stopped by a user error (as argparse's usage errors)
USER_ERROR_EXIT_CODE = 2
#: seconds a process other than the first waits before printing its user error (see the module docstring)
OTHER_RANK_GRACE_S = 5.0


class UserError(ConfigError):
    """Bad input that is not a recipe value's type or range: a path, a hub name, an architecture, a
    model that does not fit the run. The message starts with the key (or option) it comes from."""


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def process_rank() -> int:
    """This process's rank: ``RANK`` (torchrun, deepspeed, accelerate), else ``SLURM_PROCID`` (an srun
    task: a rank, or the node index of a one-task-per-node ``prune-ofa launch``), else 0."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def _project_dirs() -> tuple[str, ...]:
    dirs = []
    for package in ("sparse_pretrain", "finetune", "launcher"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            dirs += [os.path.join(os.path.realpath(d), "") for d in spec.submodule_search_locations]
    return tuple(dirs)


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this project's code (not a library)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.realpath(tb.tb_frame.f_code.co_filename).startswith(_project_dirs())


def user_error_message(err: BaseException) -> Optional[str]:
    """The one-line message of an error the user caused, or None for a programming error (which keeps
    its traceback). User errors: ConfigError (a bad recipe value; "invalid config: ..."), UserError
    and other ConfigError kinds (a bad path, hub name, architecture, pipeline), FileNotFoundError (an
    input that is not there), and a ValueError or OSError raised by this project's own code, which
    raises them only about its input and its files (a full disk, a directory it may not write); one
    raised inside a library is not one."""
    if type(err) is ConfigError:
        text = f"invalid config: {err}"
    elif isinstance(err, (ConfigError, FileNotFoundError)) or (isinstance(err, (ValueError, OSError))
                                                               and _raised_here(err)):
        text = str(err)
    else:
        return None
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def record_failure(path: str | Path, message: str, code: int = USER_ERROR_EXIT_CODE) -> bool:
    """Write ``message`` and ``code`` to the failure file unless another rank did first (a hard link of
    a complete file: atomic, first writer wins). False when the file cannot be written here (a rank on
    another host, where the launch's temporary directory does not exist)."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        scratch.write_text(json.dumps({"message": message, "code": code, "rank": process_rank()}))
        try:
            os.link(scratch, path)
        except FileExistsError:
            pass
        return True
    except OSError:
        return False
    finally:
        try:
            scratch.unlink()
        except OSError:
            pass


def read_failure(path: str | Path) -> Optional[dict]:
    """What :func:`record_failure` wrote (``message``, ``code``, ``rank``), or None."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def print_user_error(line: str, code: int = USER_ERROR_EXIT_CODE) -> None:
    """Print one user-error line from this process: at once on rank 0; on another rank after
    ``OTHER_RANK_GRACE_S``, by when a launcher that saw rank 0 fail alike has stopped this one. Stopped
    (SIGTERM, SIGINT, SIGHUP) during the grace it exits at once, silently, with ``code``: srun reports
    the highest exit code of its tasks, which stays the user error's, not 128 + SIGTERM."""
    if process_rank() != 0:
        def leave(signum, frame):
            os._exit(code)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # whatever handler a trainer installed
            try:
                signal.signal(signum, leave)
            except ValueError:       # not the main thread: the default action still stops it
                pass
        time.sleep(OTHER_RANK_GRACE_S)
    print(line, file=sys.stderr, flush=True)


#: written to stderr after a failure is recorded: ``prune-ofa launch`` keeps the stream up to it (in
#: the pipe's order, so nothing a rank printed before its failure is lost) and drops what follows
FAILURE_SENTINEL = b"\x1eprune-ofa: failure recorded\x1e\n"


def report_user_error(prog: str, message: str, code: int = USER_ERROR_EXIT_CODE) -> None:
    """To ``prune-ofa launch`` through its failure file when it started this process, else printed."""
    failure_file = os.environ.get(FAILURE_FILE_ENV)
    if failure_file and record_failure(failure_file, message, code):
        sys.stderr.flush()
        try:
            os.write(sys.stderr.fileno(), FAILURE_SENTINEL)   # one write: never split by a flush
        except (OSError, ValueError, AttributeError):
            pass
        return
    print_user_error(f"{prog}: {message}", code)


def run_main(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run an entry point's ``body``: its exit code (None: 0); a user error reported once, exit code 2."""
    try:
        return body() or 0
    except Exception as err:   # only user errors are handled; the rest is re-raised
        message = None if debug() else user_error_message(err)
        if message is None:
            raise
        report_user_error(prog, message)
        return USER_ERROR_EXIT_CODE


def note(line: str) -> None:
    """An informational line, printed by rank 0 only."""
    if process_rank() == 0:
        print(line, file=sys.stderr, flush=True)
