"""Small statistics shared by the service and the benchmarks."""

from __future__ import annotations

import math
from typing import Iterable


def percentile(xs: Iterable[float], p: float) -> float:
    """The p-th percentile of `xs` by nearest rank (index round(p/100 * (n-1)) of the sorted
    values); NaN when there are none."""
    s = sorted(xs)
    if not s:
        return math.nan
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
