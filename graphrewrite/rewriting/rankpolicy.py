"""Rank choice beyond the reference's rule, from each weight's singular values (numpy only).

The reference picks ``k = min(m, n, ceil(min(m, n) * 100 / rank))`` from the shape alone, which
cuts a small classifier head as hard as a wide hidden layer. These policies look at the spectrum
``s`` (descending) of each weight's matrix view instead:

* ``energy(share)``: the fewest singular values whose squares hold ``share`` of ``sum(s**2)``.
* ``max_error(err)``: the fewest with relative Frobenius error
  ``sqrt(sum(s[k:]**2) / sum(s**2)) < err``.
* ``target_ratio(ratio)``: per-site k for the whole model, so that the rewritten weights keep at
  most ``ratio`` of their parameters with the least total relative squared error
  ``sum_i ||A_i - B_i C_i||_F**2 / ||A_i||_F**2 = sum_i sum(s_i[k_i:]**2) / sum(s_i**2)``: a greedy
  allocation that keeps, one step at a time, the singular values (or a whole weight, left dense)
  with the largest error reduction per parameter. The steps follow each weight's convex hull of
  error against parameters, where the per-parameter gains decrease (keeping a weight whole can beat
  the ranks just below its break-even), so the greedy choice is optimal up to the last step (a
  knapsack's fractional bound). Relative, not absolute, error: a ReLU network computes the same function when one layer
  is scaled up and the next down, so absolute errors of different layers are not comparable, while
  each layer's relative error is (to first order, it is that layer's relative output error for
  isotropic inputs, and these add up along the network). Measured on the digits models at 29% of
  the kernel parameters (bench_accuracy.py, two seeds): the absolute criterion cut the CNN's
  10-class head to rank 3 and lost 1.7 points; the relative one keeps rank 5 and loses 0.3, and it
  is as good or better in the three other cases.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Policy:
    """What the user asked for: at most one of energy, max_error, target_ratio (None: the rule)."""

    energy: float | None = None
    max_error: float | None = None
    target_ratio: float | None = None
    same_rank: bool = False  # with target_ratio: one k for every weight (``same_rank_ks``)

    @property
    def uses_spectrum(self) -> bool:
        return any(v is not None for v in (self.energy, self.max_error, self.target_ratio))

    def describe(self, rank: int) -> str:
        if self.energy is not None:
            return f"energy={self.energy:g}"
        if self.max_error is not None:
            return f"max_error={self.max_error:g}"
        if self.target_ratio is not None:
            return f"target_ratio={self.target_ratio:g}" + (", one rank for every weight" if self.same_rank else "")
        return f"rank={rank}"


def tail_energy(s: np.ndarray) -> np.ndarray:
    """``t[k] = sum(s[k:]**2)`` for k = 0..len(s)."""
    squares = np.asarray(s, np.float64) ** 2
    return np.concatenate([np.cumsum(squares[::-1])[::-1], [0.0]])


def relative_error(s: np.ndarray, k: int) -> float:
    """``||A - A_k||_F / ||A||_F`` of the best rank-k approximation."""
    tail = tail_energy(s)
    return float(np.sqrt(tail[k] / tail[0])) if tail[0] > 0 else 0.0


def kept_energy(s: np.ndarray, k: int) -> float:
    tail = tail_energy(s)
    return float(1.0 - tail[k] / tail[0]) if tail[0] > 0 else 1.0


def energy_k(s: np.ndarray, share: float) -> int:
    """The fewest leading singular values holding ``share`` of the squared spectrum (at least 1)."""
    tail = tail_energy(s)
    if tail[0] == 0:
        return 1
    kept = 1.0 - tail / tail[0]
    return max(1, int(np.argmax(kept >= share - 1e-12)))


def max_error_k(s: np.ndarray, err: float) -> int:
    """The fewest leading singular values with relative Frobenius error below ``err`` (at least 1)."""
    tail = tail_energy(s)
    if tail[0] == 0:
        return 1
    errors = np.sqrt(tail / tail[0])
    below = np.nonzero(errors < err)[0]
    return max(1, int(below[0]) if below.size else len(s))


def break_even_k(m: int, n: int, size: int) -> int:
    """The largest k whose factors ``k (m + n)`` are fewer than the ``m n`` of the dense weight (at
    most ``size`` singular values; 0 where no rank saves anything)."""
    return min(size, (m * n - 1) // (m + n))


def why_dense(s: np.ndarray, m: int, n: int) -> str:
    """Why an allocation leaves an ``m x n`` weight with singular values ``s`` dense, in figures: what
    its largest rank still below break-even would keep, against the whole weight."""
    k = break_even_k(m, n, len(s))
    if k == 0:
        return f"no rank saves anything (k = 1 keeps {m + n:,} of its {m * n:,} parameters)"
    return (f"rank at break-even saves nothing: k = {k} of {len(s)} would keep {k * (m + n):,} of its "
            f"{m * n:,} parameters ({k * (m + n) / (m * n):.1%}) at relative error {relative_error(s, k):.3g}; "
            f"whole, it costs {m * n - k * (m + n):,} more and has none")


def _choices(tail: np.ndarray, m: int, n: int) -> list[tuple[int | None, int, float]]:
    """A site's ``(k, parameters, relative squared error)`` choices on the lower convex hull of error
    against parameters, from k = 1 to dense (k None): the choices an optimal allocation makes, but
    for the last one it can afford. Going dense can cost less per unit of error removed than the
    ranks before it (it removes the whole remaining error for ``m n - k (m + n)`` parameters), so
    the ranks just below break-even fall off the hull."""
    points = [(k, k * (m + n), tail[k] / tail[0]) for k in range(1, max(1, break_even_k(m, n, len(tail) - 1)) + 1)]
    hull: list[tuple[int | None, int, float]] = []
    for point in [*points, (None, m * n, 0.0)]:
        # Drop the last choice while the step to it gains no more per parameter than the step past it.
        while len(hull) >= 2 and ((hull[-2][2] - hull[-1][2]) * (point[1] - hull[-1][1])
                                  <= (hull[-1][2] - point[2]) * (hull[-1][1] - hull[-2][1])):
            hull.pop()
        hull.append(point)
    return hull


def same_rank_ks(spectra: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]],
                 ratio: float) -> list[int | None]:
    """The largest k given to every site (None: dense, where k passes its break-even or its
    singular values) that keeps ``sum(params) <= ratio * sum(m * n)``; k = 1 everywhere where none
    fits. Blind to the spectra: the allocation distillation does best with on the digits CNN
    (graphrewrite.rewriting.calibration.fitting), where the errors of the weights alone say little."""
    def ks_at(k: int) -> list[int | None]:
        return [k if k <= break_even_k(m, n, len(s)) else None for s, (m, n) in zip(spectra, shapes)]

    def params(ks: Sequence[int | None]) -> int:
        return sum(m * n if k is None else k * (m + n) for k, (m, n) in zip(ks, shapes))

    budget = ratio * sum(m * n for m, n in shapes)
    k = 1
    while ks_at(k + 1) != ks_at(k) and params(ks_at(k + 1)) <= budget:  # params grow with k
        k += 1
    return ks_at(k) if params(ks_at(k)) <= budget else [1] * len(shapes)


def target_ratio_ks(spectra: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]],
                    ratio: float) -> list[int | None]:
    """Per-site k (None: leave the weight dense) meeting ``sum(params) <= ratio * sum(m * n)``.

    Every site starts at k = 1; the budget then goes, greedily, to the step with the largest
    relative squared-error reduction per parameter along each site's convex hull (``_choices``):
    the next singular value(s) of a site, or turning it dense. Along a hull these ratios decrease,
    so the allocation is optimal up to the steps it cannot afford; where a site's next hull step
    does not fit, the site goes on a rank at a time (the ranks the hull skipped).
    """
    budget = ratio * sum(m * n for m, n in shapes) - sum(m + n for m, n in shapes)
    tails = [tail_energy(s) for s in spectra]
    hulls = [_choices(t, m, n) if t[0] > 0 else [] for t, (m, n) in zip(tails, shapes)]
    ks: list[int | None] = [1] * len(spectra)
    at = [0] * len(spectra)  # each site's position on its hull
    heap: list[tuple[float, int, int, int | None, bool]] = []

    def push(i: int, single: bool) -> None:
        (m, n), tail, k = shapes[i], tails[i], ks[i]
        if k is None or tail[0] == 0:
            return
        if single:  # the next rank, or dense past break-even
            to = k + 1 if k + 1 <= break_even_k(m, n, len(spectra[i])) else None
            cost = m + n if to is not None else m * n - k * (m + n)
        elif at[i] + 1 < len(hulls[i]):
            to, params, _ = hulls[i][at[i] + 1]
            cost = params - k * (m + n)
        else:
            return
        gain = (tail[k] - (0.0 if to is None else tail[to])) / tail[0]
        if gain > 0:
            heapq.heappush(heap, (-gain / max(cost, 1), i, cost, to, single))  # (a 2x2: dense is no dearer)

    for i in range(len(spectra)):
        push(i, False)
    while heap:
        _, i, cost, to, single = heapq.heappop(heap)
        if cost > budget:
            if not single:
                push(i, True)  # the hull's step does not fit: its ranks one by one may
            continue
        budget -= cost
        ks[i] = to
        at[i] += not single
        push(i, single)
    return ks
