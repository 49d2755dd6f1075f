"""Paired comparisons over seeds: is a method's difference from a baseline larger than what the
seeds can resolve?

Runs of one pipeline with the same seed share the data order and the models they start from
(the SFT student, the teacher), so the seed-wise differences d_k = m_k - b_k of a method m and
the baseline b are paired. Their mean carries Student's t interval

    mean(d) ± t_{(1+level)/2, n-1} · sd(d) / sqrt(n)        (n seeds, sd the sample deviation)

and a difference is resolved where that interval excludes 0. The design's smallest detectable
difference, at the same two-sided level with the given power, is

    (t_{(1+level)/2, n-1} + t_{power, n-1}) · sd / sqrt(n)

with sd the pooled deviation of the differences (the root mean square of each method's sd(d)):
a true difference below it is more likely missed than found.
"""
import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional

from scipy import stats


@dataclass(frozen=True)
class Difference:
    """A method minus the baseline over the seeds both ran: the mean, the sample deviation of the
    differences (None for one seed) and the interval (None without a spread to estimate)."""
    mean: float
    sd: Optional[float]
    n: int
    low: Optional[float]
    high: Optional[float]

    @property
    def resolved(self) -> bool:
        """True where the interval excludes 0."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    return float(stats.t.ppf(p, df))


def paired(method: Dict[int, float], baseline: Dict[int, float], level: float = 0.95) -> Optional[Difference]:
    """The paired difference over the seeds present in both {seed: value} maps; None if none is.
    One common seed gives the difference alone (no interval); a zero spread a zero-width one."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    d = [method[s] - baseline[s] for s in seeds]
    mean = statistics.mean(d)
    if len(d) < 2:
        return Difference(mean, None, 1, None, None)
    sd = statistics.stdev(d)
    half = t_quantile((1 + level) / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return Difference(mean, sd, len(d), mean - half, mean + half)


def pooled_sd(sds: List[float]) -> float:
    """The root mean square of several deviations: one spread for the design."""
    return math.sqrt(statistics.mean(s * s for s in sds))


def resolvable(sds: List[float], n: int, level: float = 0.95) -> Optional[float]:
    """The interval's half-width at the pooled deviation of the differences `sds`: the smallest
    observed difference whose interval excludes 0; None for fewer than 2 seeds or no deviations."""
    if n < 2 or not sds:
        return None
    return t_quantile((1 + level) / 2, n - 1) * pooled_sd(sds) / math.sqrt(n)


def detectable(sds: List[float], n: int, level: float = 0.95, power: float = 0.8) -> Optional[float]:
    """The smallest true difference n paired seeds detect at this level with this power, at the
    pooled deviation of the differences `sds`; None for fewer than 2 seeds or no deviations."""
    if n < 2 or not sds:
        return None
    return (t_quantile((1 + level) / 2, n - 1) + t_quantile(power, n - 1)) * pooled_sd(sds) / math.sqrt(n)
