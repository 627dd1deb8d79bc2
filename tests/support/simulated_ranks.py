"""Run a function on several simulated ranks (threads) that share a summing all-reduce, so the
sharded code paths run in one test process. Real multi-process runs are in test_distributed.py."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


class SimulatedWorld:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=60)
        self._lock = threading.Lock()
        self._total = None
        self.calls = 0

    def all_reduce_for(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            with self._lock:
                self._total = tensor.clone() if self._total is None else self._total + tensor
            self._barrier.wait()
            tensor.copy_(self._total)
            if self._barrier.wait() == 0:
                self._total = None
                self.calls += 1
            self._barrier.wait()
        return all_reduce

    def run(self, fn):
        """fn(rank, all_reduce) on every rank; returns the results in rank order."""
        with ThreadPoolExecutor(self.world_size) as pool:
            futures = [pool.submit(fn, r, self.all_reduce_for(r)) for r in range(self.world_size)]
            return [f.result() for f in futures]


def split_points(n: int, world_size: int, generator: torch.Generator) -> list[int]:
    """Uneven, random boundaries 0 = b0 <= b1 <= ... <= bW = n (a rank may hold nothing)."""
    cuts = sorted(torch.randint(0, n + 1, (world_size - 1,), generator=generator).tolist())
    return [0, *cuts, n]
