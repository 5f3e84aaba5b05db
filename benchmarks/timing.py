"""What a timing benchmark fixes and records: threads, pinning, the machine's load, and the
summary of repeated interleaved measurements (median ratio and its range over repetitions)."""

from __future__ import annotations

import os
import platform
import statistics


def fix_threads(threads: int | None) -> str:
    """Use ``threads`` torch threads (None: torch's default) and, when given, pin this process
    (and the processes it starts) to that many of the cores it may run on, so that the OS does
    not move it between cores mid-measurement. Returns a line saying what was set."""
    import torch

    pinned = ""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for subprocesses
        if hasattr(os, "sched_setaffinity"):
            cores = sorted(os.sched_getaffinity(0))[:threads]
            os.sched_setaffinity(0, cores)
            pinned = f", pinned to core(s) {','.join(map(str, cores))}"
    return f"{torch.get_num_threads()} torch thread(s){pinned}"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def ratio_summary(ratios: list[float]) -> str:
    """``median [min-max]`` of one ratio over the repetitions."""
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
