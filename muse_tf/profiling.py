"""Wall time and peak memory of named stages: of this process, or of a process tree.

* :func:`rss_bytes` / :func:`reset_peak_rss`: this process's resident set and its peak
  (``VmHWM``) since the last reset (Linux ``/proc``).
* :class:`StageTimer`: ``with timer("build"): ...`` records each stage's wall seconds and
  this process's peak RSS inside it; :meth:`StageTimer.as_dict` is what ``metrics.json``
  and the benchmarks print.
* :class:`TreeRssSampler`: samples the summed RSS of a process and all its descendants
  (a Beam runner and its workers, a server), for stages run as subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["StageTimer", "TreeRssSampler", "reset_peak_rss", "rss_bytes", "tree_rss_bytes"]


def rss_bytes(field: str = "VmRSS", pid: int | str = "self") -> int:
    """The resident set (``VmRSS``) of a process, or its peak since the last reset
    (``VmHWM``); 0 where ``/proc`` does not say (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def reset_peak_rss() -> bool:
    """Starts a new ``VmHWM`` peak of this process (``5`` into ``/proc/self/clear_refs``);
    False where the system does not allow it (the peak then covers the process's life)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def tree_rss_bytes(pid: int) -> int:
    """Summed ``VmRSS`` of ``pid`` and all its descendants (shared pages count once per
    process, so this is an upper bound of what the tree holds)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        total += rss_bytes(pid=current)
        stack += _children(current)
    return total


class TreeRssSampler:
    """Peak of :func:`tree_rss_bytes` of ``pid``, sampled every ``interval`` seconds in a
    background thread until :meth:`stop` (a peak shorter than the interval can be missed)."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def stop(self) -> int:
        """Stops sampling; returns the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


class StageTimer:
    """Records wall seconds and this process's peak RSS of each named stage, in order.

    The peak of a stage is ``VmHWM`` read at its end after a reset at its start, so it is
    the stage's own peak (where the reset is refused, the process's peak so far). With a
    ``label`` it also prints a line when each stage starts and when it ends (seconds, peak
    and resident GB), so a run of hours shows where it is and what each part cost even
    when it dies before its metrics are written.
    """

    def __init__(self, label: str | None = None) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.label = label

    def _say(self, text: str) -> None:
        if self.label is not None:
            print(f"[{self.label}] {text}", flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        reset_peak_rss()
        self._say(f"stage {name!r} started (resident {rss_bytes() / 1e9:.2f} GB)")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = {"seconds": time.perf_counter() - start,
                                 "peak_rss_bytes": float(rss_bytes("VmHWM")),
                                 "rss_after_bytes": float(rss_bytes())}
            stage = self.stages[name]
            self._say(f"stage {name!r} took {stage['seconds']:.1f} s, peak "
                      f"{stage['peak_rss_bytes'] / 1e9:.2f} GB, resident after "
                      f"{stage['rss_after_bytes'] / 1e9:.2f} GB")

    def seconds(self, name: str) -> float:
        """Wall seconds of the finished stage ``name``."""
        return self.stages[name]["seconds"]

    def as_dict(self) -> dict[str, Any]:
        return {name: dict(values) for name, values in self.stages.items()}
