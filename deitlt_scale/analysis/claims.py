"""A paper's claims checked against measured runs, seed by seed, with a paired interval.

A claim says one measurement beats another ("the DIST head is more accurate on the tail than the
CLS head"). Both sides are read from the same seeds' final evaluations, so each seed gives one
paired difference: runs of one seed share their teacher and their data order, and pairing
removes that shared part of the spread. The verdict comes from the 95% confidence interval of the
mean difference (Student's t with n - 1 degrees of freedom, i.e. a two-sided paired t-test at
5%): the claim *holds* when the whole interval is above zero, *fails* (the opposite is measured)
when it is below zero, and is *undecided* when it contains zero. With one seed there is no
interval, and the verdict says so. How many seeds agree is reported beside it.
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
    statement: str  # the claim (the paper's, or a grid's own), in a sentence
    source: str  # where the paper shows it
    better: Side
    worse: Side


CONFIDENCE = 0.95
TIE = 1e-9  # points: an interval that ends this close to zero contains it (float noise)


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
    def ci(self) -> tuple[float, float]:
        """The :data:`CONFIDENCE` interval of the mean difference (NaNs with one seed)."""
        n = len(self.differences)
        if n < 2:
            return math.nan, math.nan
        from scipy.stats import t

        half = t.ppf(0.5 + CONFIDENCE / 2, n - 1) * self.std / math.sqrt(n)
        return self.mean - half, self.mean + half

    @property
    def agreeing(self) -> int:
        return sum(d > 0 for d in self.differences)

    @property
    def outcome(self) -> str:
        low, high = self.ci
        if math.isnan(low):
            return "one seed"
        if low > TIE:
            return "holds"
        if high < -TIE:
            return "fails"
        return "undecided"


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
    difference (mean and its 95% interval, points), seeds agreeing, verdict."""

    def mean_of(side: Side) -> str:
        values = [100 * m[side.metric] for m in per_seed[side.runs]]
        return f"{sum(values) / len(values):.1f}"

    lines = [
        "| claim | source | better | worse | difference (points, 95% CI) | seeds "
        "agreeing | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        c = v.claim
        low, high = v.ci
        interval = "" if math.isnan(low) else f" [{_signed(low)}, {_signed(high)}]"
        lines.append(
            f"| {c.statement} | {c.source} | {c.better.label}: {mean_of(c.better)} | "
            f"{c.worse.label}: {mean_of(c.worse)} | {_signed(v.mean)}{interval} | "
            f"{v.agreeing} of {len(v.differences)} | **{v.outcome}** |"
        )
    return "\n".join(lines)
