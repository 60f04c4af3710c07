"""A window of recent values kept in arrival order and in sorted order, for running medians."""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import overload


class SortedWindow(Sequence[float]):
    """The last ``maxlen`` values in arrival order, with a sorted copy for fast medians.

    ``median()`` (O(1)) and ``median_abs_deviation(center)`` (O(log n)) return exactly
    what ``statistics.median`` returns on the same values, while ``append`` costs
    O(n) memory moves and no sort. Indexing and iteration follow arrival order, as
    on a deque.

    Example:
        window = SortedWindow([3.0, 1.0, 2.0], maxlen=100)
        window.append(10.0)
        window.median()  # 2.5
    """

    __slots__ = ("_recent", "_sorted")

    def __init__(self, values: Iterable[float] = (), *, maxlen: int | None = None) -> None:
        self._recent: deque[float] = deque(maxlen=maxlen)
        self._sorted: list[float] = []
        for value in values:
            self.append(value)

    @property
    def maxlen(self) -> int | None:
        return self._recent.maxlen

    def append(self, value: float) -> None:
        """Add value as the newest; the oldest value leaves a full window. Raises ValueError on NaN."""
        if value != value:
            raise ValueError("SortedWindow cannot order NaN; append only comparable (non-NaN) values")
        recent = self._recent
        if recent.maxlen == 0:
            return
        if len(recent) == recent.maxlen:
            # Equal values keep arrival order in _sorted (insort_right), so the oldest value is
            # the first of its equals there. This keeps _sorted equal to sorted(recent), down to
            # which of 0.0 and -0.0 sits where.
            del self._sorted[bisect.bisect_left(self._sorted, recent[0])]
        recent.append(value)
        bisect.insort_right(self._sorted, value)

    def __len__(self) -> int:
        return len(self._recent)

    @overload
    def __getitem__(self, index: int) -> float: ...

    @overload
    def __getitem__(self, index: slice) -> list[float]: ...

    def __getitem__(self, index: int | slice) -> float | list[float]:
        if isinstance(index, slice):
            return list(self._recent)[index]
        return self._recent[index]

    def __iter__(self) -> Iterator[float]:
        return iter(self._recent)

    def __repr__(self) -> str:
        return f"SortedWindow({list(self._recent)!r}, maxlen={self.maxlen})"

    def median(self) -> float:
        """Return the median of the values, as statistics.median does; raises ValueError when empty."""
        ordered = self._sorted
        count = len(ordered)
        if count == 0:
            raise ValueError("median of an empty SortedWindow; append a value first")
        middle = count // 2
        if count % 2 == 1:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2

    def median_abs_deviation(self, center: float) -> float:
        """Return statistics.median(abs(value - center) for value in self), without scaling.

        The deviations of the values below center, read from center outwards, and those
        of the values from center up are two ascending runs, so their k-th smallest is a
        binary search over how many to take from each run.
        """
        ordered = self._sorted
        count = len(ordered)
        if count == 0:
            raise ValueError("median_abs_deviation of an empty SortedWindow; append a value first")
        split = bisect.bisect_left(ordered, center)

        def below(index: int) -> float:
            return abs(ordered[split - 1 - index] - center)

        def above(index: int) -> float:
            return abs(ordered[split + index] - center)

        runs = (below, split, above, count - split)
        middle = count // 2
        if count % 2 == 1:
            return _kth_smallest(*runs, middle)
        return (_kth_smallest(*runs, middle - 1) + _kth_smallest(*runs, middle)) / 2


def _kth_smallest(first: Callable[[int], float], first_len: int, second: Callable[[int], float], second_len: int,
                  k: int) -> float:
    """Return the k-th smallest value (0-based) of two ascending runs given as index functions."""
    smallest_count = k + 1  # the k-th smallest is the largest of the k + 1 smallest values
    low, high = max(0, smallest_count - second_len), min(smallest_count, first_len)
    while True:
        from_first = (low + high) // 2
        from_second = smallest_count - from_first
        if from_first < first_len and from_second > 0 and second(from_second - 1) > first(from_first):
            low = from_first + 1  # the k+1 smallest need more values of the first run
        elif from_first > 0 and from_second < second_len and first(from_first - 1) > second(from_second):
            high = from_first - 1  # they need fewer
        else:
            last_first = first(from_first - 1) if from_first > 0 else -math.inf
            last_second = second(from_second - 1) if from_second > 0 else -math.inf
            return max(last_first, last_second)


def median_of(values: Sequence[float]) -> float:
    """Return the median of values: O(1) work for a SortedWindow, statistics.median otherwise."""
    if isinstance(values, SortedWindow):
        return values.median()
    return statistics.median(values)
