"""A paper's claims checked against measured runs, seed by seed.

A claim says one measurement beats another ("the DIST head is more accurate on the tail than the
CLS head"). Both sides are read from the same seeds' final evaluations, so each seed gives one
paired difference: runs of one seed share their teacher and their data order, and pairing
removes that shared part of the spread. A claim *holds* when every seed's difference is positive,
*fails* when every one is negative or zero, and is *mixed* otherwise; with one seed the verdict
says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Metrics = Mapping[str, float]  # one run's flat final metrics (fractions), e.g. "dist/paper/tail"


@dataclass(frozen=True)
class Side:
    """One measurement: a metric key of the runs listed under ``runs``."""

    runs: str  # a key of the per-seed metrics mapping (a row, or "teacher NAME")
    metric: str  # e.g. "mean/overall", "cls/paper/head"
    label: str  # how a reader names it, e.g. "deitlt mean, Overall"


@dataclass(frozen=True)
class Claim:
    statement: str  # the paper's claim, in a sentence
    source: str  # where the paper shows it
    better: Side
    worse: Side


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    differences: tuple[float, ...]  # better - worse per seed, percentage points

    @property
    def mean(self) -> float:
        return sum(self.differences) / len(self.differences)

    @property
    def std(self) -> float:
        """Sample standard deviation of the paired differences (NaN with one seed)."""
        n = len(self.differences)
        if n < 2:
            return math.nan
        return math.sqrt(sum((d - self.mean) ** 2 for d in self.differences) / (n - 1))

    @property
    def agreeing(self) -> int:
        return sum(d > 0 for d in self.differences)

    @property
    def outcome(self) -> str:
        n, k = len(self.differences), self.agreeing
        one = " (one seed)" if n == 1 else ""
        if k == n:
            return "holds" + one
        if k == 0:
            return "fails" + one
        return "mixed"


def check(claims: Sequence[Claim], per_seed: Mapping[str, Sequence[Metrics]]) -> list[Verdict]:
    """The verdict of every claim whose two sides were measured (the others are left out).
    ``per_seed[key]`` lists one metrics mapping per seed, in the same seed order for every key."""
    verdicts = []
    for claim in claims:
        if claim.better.runs not in per_seed or claim.worse.runs not in per_seed:
            continue
        better, worse = per_seed[claim.better.runs], per_seed[claim.worse.runs]
        if len(better) != len(worse):
            raise ValueError(
                f"claim {claim.statement!r}: {len(better)} seed(s) of {claim.better.runs} "
                f"against {len(worse)} of {claim.worse.runs}; pair them seed by seed"
            )
        for side, runs in ((claim.better, better), (claim.worse, worse)):
            if any(side.metric not in m for m in runs):
                raise ValueError(
                    f"claim {claim.statement!r}: {side.runs} has no {side.metric} in every seed"
                )
        diffs = tuple(
            100 * (b[claim.better.metric] - w[claim.worse.metric])
            for b, w in zip(better, worse, strict=True)
        )
        verdicts.append(Verdict(claim, diffs))
    return verdicts


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def claims_markdown(verdicts: Sequence[Verdict], per_seed: Mapping[str, Sequence[Metrics]]) -> str:
    """A Markdown table: claim, the two sides (mean over seeds, percent), the paired
    difference (mean ± sample std, points), seeds agreeing, verdict."""

    def mean_of(side: Side) -> str:
        values = [100 * m[side.metric] for m in per_seed[side.runs]]
        return f"{sum(values) / len(values):.1f}"

    lines = [
        "| the paper's claim | source | better | worse | difference (points) | seeds | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        c = v.claim
        diff = _signed(v.mean) + ("" if math.isnan(v.std) else f" ± {v.std:.1f}")
        lines.append(
            f"| {c.statement} | {c.source} | {c.better.label}: {mean_of(c.better)} | "
            f"{c.worse.label}: {mean_of(c.worse)} | {diff} | "
            f"{v.agreeing} of {len(v.differences)} | **{v.outcome}** |"
        )
    return "\n".join(lines)
