"""Streaming statistics, merged exactly across micro-batches.

Each micro-batch is reduced on the tensor's own device to a handful of numbers; merging uses
Chan et al.'s parallel update for (count, mean, M2), so the merged mean and variance are those
of the concatenated batch (up to floating-point rounding), not an average of averages
(docs/theory.md#merging-statistics derives it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Below this ratio of M2 to the sum of squares (of the values, or of the values less a shift), moments
# taken from sums have lost more than ~1.3 significant digits, and the value is measured again
# centred (docs/theory.md#merging-statistics, "Cancellation"). One threshold for the torch path,
# its compiled pass and the ONNX path.
CANCELLATION_GUARD = 0.05


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of the finite values seen so far."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf

    def merge(self, count: int, mean: float, m2: float, minimum: float, maximum: float) -> None:
        if count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean += delta * count / total
            self.m2 += m2 + delta * delta * self.count * count / total
            self.count = total
        self.minimum = min(self.minimum, minimum)
        self.maximum = max(self.maximum, maximum)

    @property
    def variance(self) -> float:
        """Population variance (divide by n): the probe batch is the whole population measured."""
        return self.m2 / self.count if self.count else math.nan


# Fixed, data-independent histogram edges, so that histograms of different micro-batches (and of
# different layers) share their bins and merge exactly by adding counts. Symmetric-log: four
# bins per decade for 1e-8 <= |x| <= 1e4, one bin for |x| < 1e-8, and an overflow bin at each end.
HISTOGRAM_BINS_PER_DECADE = 4
HISTOGRAM_MIN_DECADE = -8
HISTOGRAM_MAX_DECADE = 4


def histogram_edges() -> list[float]:
    """Bin edges, ascending; bin i holds values in (edges[i-1], edges[i]] (bin 0: up to edges[0])."""
    steps = range(
        HISTOGRAM_MIN_DECADE * HISTOGRAM_BINS_PER_DECADE, HISTOGRAM_MAX_DECADE * HISTOGRAM_BINS_PER_DECADE + 1
    )
    positive = [10.0 ** (k / HISTOGRAM_BINS_PER_DECADE) for k in steps]
    return [-x for x in reversed(positive)] + positive
