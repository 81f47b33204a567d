"""Measuring helpers of the benchmarks: device synchronisation, timed rounds, peak memory, the
matrix-rate ceiling MFU divides by, and progress bars (on stderr, so stdout keeps only figures).

Every timed interval runs from an idle device to an idle device (:func:`sync` on both ends), so
queued CUDA work is counted in the round that queued it.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass


def sync(device) -> None:
    """Wait until ``device`` (a torch.device) has run everything queued; no-op on CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulCeiling:
    """The matrix-rate ceiling: FLOP/s of a large square matmul on the device (bf16 8192^3 on
    CUDA, fp32 1024^3 on CPU). :meth:`sample` is called before and between the timed rounds and
    the best rate seen is kept, so a moment of contention on a shared machine does not lower it."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        if device.type == "cuda":
            n, dtype, self.reps = 8192, torch.bfloat16, 10
        else:
            n, dtype, self.reps = 1024, torch.float32, 3
        self.n = n
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.best = 0.0
        kind = "bf16" if dtype == torch.bfloat16 else "fp32"
        threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
        self.description = (
            f"{kind} {n}x{n}x{n} matmul on {device.type}{threads}, best of the samples taken "
            "before and between the timed rounds"
        )
        for _ in range(2):  # kernel selection, clocks
            torch.mm(self.a, self.b)

    def sample(self, rounds: int = 1) -> float:
        import torch

        for _ in range(rounds):
            sync(self.device)
            start = time.perf_counter()
            for _ in range(self.reps):
                torch.mm(self.a, self.b)
            sync(self.device)
            seconds = (time.perf_counter() - start) / self.reps
            self.best = max(self.best, 2.0 * self.n**3 / seconds)
        return self.best


class Memory:
    """Peak memory of one recipe (see :class:`Timing`), from construction on."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.base = 0
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)

    def peak_mib(self) -> float:
        import resource

        import torch

        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_kind(device) -> str:
    """What :meth:`Memory.peak_mib` measures on ``device``, for the printed figures."""
    if device.type == "cuda":
        return "CUDA allocator peak above what was held before the recipe"
    return "process peak RSS so far"


@dataclass
class Timing:
    """One recipe's figures. ``round_rates`` are images/s of each timed round; the reported rate
    is their median. ``peak_mib`` is CUDA allocator memory above what was held before the recipe
    was built, or the process peak RSS on CPU (which covers everything run so far)."""

    round_rates: list[float]
    images_per_step: int
    peak_mib: float
    loss: float

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.round_rates)

    @property
    def seconds_per_step(self) -> float:
        return self.images_per_step / self.images_per_s


def time_rounds(recipe, steps: int, device) -> float:
    """Seconds for ``steps`` optimizer steps of ``recipe``, from an idle device to an idle one."""
    sync(device)
    start = time.perf_counter()
    recipe.run(steps)
    sync(device)
    return time.perf_counter() - start


def timed(recipe, rounds: int, steps: int, device, ceiling: MatmulCeiling) -> list[float]:
    """Images/s of each of ``rounds`` timed rounds of ``steps`` optimizer steps; the ceiling is
    sampled after each round."""
    rates = []
    for _ in range(rounds):
        rates.append(steps * recipe.images_per_step / time_rounds(recipe, steps, device))
        ceiling.sample()
    return rates


def progress(total: int, desc: str):
    """``range(total)`` with a transient progress bar on stderr."""
    from tqdm import tqdm

    return tqdm(range(total), desc=desc, file=sys.stderr, leave=False)
