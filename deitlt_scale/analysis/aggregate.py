"""Eval figures of several runs (seeds) as mean and sample standard deviation.

``deitlt eval RUN1 RUN2 ... --aggregate`` evaluates each run as usual and hands their flat metric
dictionaries (fractions) here. The standard deviation is the sample one (``n - 1`` in the
denominator); with one run it is NaN. A metric missing from some run is aggregated over the runs
that have it, and its ``n`` says how many.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deitlt_scale.data.longtail import GROUP_NAMES

POSTHOC = ("la", "fusion", "calib")  # key prefixes of the post-hoc figures


@dataclass(frozen=True)
class Aggregate:
    mean: float
    std: float  # sample standard deviation; NaN with one value
    n: int
    values: tuple[float, ...]


def aggregate(runs: Sequence[Mapping[str, float]]) -> dict[str, Aggregate]:
    """Per metric key, the mean and sample standard deviation over ``runs`` (NaNs ignored)."""
    keys = sorted({k for run in runs for k in run})
    out: dict[str, Aggregate] = {}
    for key in keys:
        values = tuple(float(r[key]) for r in runs if key in r and not math.isnan(float(r[key])))
        if not values:
            continue
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        out[key] = Aggregate(statistics.fmean(values), std, len(values), values)
    return out


def format_aggregate(agg: Mapping[str, Aggregate], convention: str = "paper") -> str:
    """Overall/Head/Mid/Tail per head (``{head}/overall`` and ``{head}/{convention}/{group}``
    keys), then every post-hoc figure (``la/``, ``fusion/``, ``calib/``), in percent except
    tau, w and NLL; ``mean ± std (n)``."""
    heads = sorted(
        {
            k.split("/")[0]
            for k in agg
            if k.endswith("/overall") and k.count("/") == 1 and k.split("/")[0] not in POSTHOC
        }
    )
    lines = [f"{'head':<8}" + "".join(f"{c:>16}" for c in ("overall", *GROUP_NAMES))]
    for head in heads:
        keys = [f"{head}/overall"] + [f"{head}/{convention}/{g}" for g in GROUP_NAMES]
        lines.append(f"{head:<8}" + "".join(f"{_cell(agg.get(k), True):>16}" for k in keys))
    extra = [k for k in agg if k.split("/")[0] in POSTHOC]
    for key in extra:
        percent = not (key.endswith(("/tau", "/weight", "/nll")))
        lines.append(f"{key:<28}{_cell(agg[key], percent):>16}")
    n = max((a.n for a in agg.values()), default=0)
    lines.append(f"mean ± sample standard deviation over {n} runs (%, except tau, w and NLL)")
    return "\n".join(lines)


def _cell(a: Aggregate | None, percent: bool) -> str:
    if a is None:
        return "-"
    scale = 100.0 if percent else 1.0
    digits = 1 if percent else 2
    if math.isnan(a.std):
        return f"{scale * a.mean:.{digits}f}"
    return f"{scale * a.mean:.{digits}f} ± {scale * a.std:.{digits}f}"


def write_aggregate(agg: Mapping[str, Aggregate], runs: Sequence[Path], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "runs": [str(r) for r in runs],
        "metrics": {
            k: {
                "mean": a.mean,
                "std": None if math.isnan(a.std) else a.std,
                "n": a.n,
                "values": list(a.values),
            }
            for k, a in agg.items()
        },
    }
    path = out_dir / "aggregate.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    (out_dir / "aggregate.txt").write_text(format_aggregate(agg) + "\n")
    return path
