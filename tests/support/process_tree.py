"""Killing a launched run for real: the launcher and every rank it started.

torch's elastic launcher (torchrun, and ``accelerate launch`` through it) starts each rank in a
session of its own, so killing the launcher's process group leaves the ranks running: they finish
the run, and a "resumed" run then trains nothing. Here the whole process tree is collected from
the parent links first, every process in it gets SIGKILL, and the caller is told which of them ran
the training module, after checking that each one is gone.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants, children first (collected before anything is killed, so
    a rank re-parented to init when its launcher dies is still on the list)."""
    root = psutil.Process(pid)
    return root.children(recursive=True)[::-1] + [root]


def is_gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_tree(pid: int, module: str, expected: int, timeout: float = 30.0) -> list[int]:
    """SIGKILL ``pid`` and every descendant; assert that ``expected`` of them ran ``-m module``
    (the ranks) and that every process of the tree is dead. Returns the ranks' PIDs."""
    processes = tree(pid)
    ranks = [p.pid for p in processes[:-1] if _runs_module(p, module)]   # the launcher's own command
    # line names the module too: only its descendants are ranks
    assert len(ranks) == expected, f"expected {expected} ranks running -m {module}, found {len(ranks)}"
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and not all(is_gone(p) for p in processes):
        time.sleep(0.05)
    alive = [p.pid for p in processes if not is_gone(p)]
    assert not alive, f"still alive after SIGKILL: {alive}"
    return ranks


def _runs_module(process: psutil.Process, module: str) -> bool:
    try:
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return any(a == "-m" and b == module for a, b in zip(cmdline, cmdline[1:]))


def wait_for(predicate, process, timeout: float = 300.0, what: str = "the condition") -> None:
    """Poll ``predicate()`` until true; fail if ``process`` (a Popen) ends first or time runs out."""
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended (exit code {process.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def latest_tag(checkpoints: Path) -> str:
    pointer = checkpoints / "latest"
    return pointer.read_text().strip() if pointer.is_file() else ""
