"""Shared helpers of the benchmark scripts: timing, tables, targets, the machine line."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def machine() -> str:
    cores = os.cpu_count()
    import tensorflow as tf

    return (f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''} "
            f"{cores} cores, Python {platform.python_version()}, TensorFlow {tf.__version__}").replace("  ", " ")


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int, per_round: int = 3,
                        warmup: int = 3) -> dict[str, float]:
    """Medians of several functions timed in alternation, so machine noise hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


class Targets:
    """Collects target checks; ``exit()`` is non-zero when one was missed."""

    def __init__(self) -> None:
        self.missed: list[str] = []

    def check(self, ok: bool, what: str) -> str:
        if not ok:
            self.missed.append(what)
        return "ok" if ok else "MISSED"

    def exit(self) -> None:
        if self.missed:
            print("targets missed: " + "; ".join(self.missed))
            sys.exit(1)
        print("all targets met")


def build_mlp(path: str, width: int = 2048, layers: int = 4) -> None:
    """A Keras 3 MLP of ``layers`` Dense ``width`` x ``width`` layers (relu), exported to ``path``."""
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((width,), name="x")
    h = x
    for i in range(layers):
        h = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(h)
    keras.Model(x, h).export(path, verbose=False)
