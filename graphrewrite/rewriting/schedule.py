"""The alpha schedule: the in-graph update that slides every site from dense (alpha = 1) to compressed.

The rewrite saves it with the model (``make_update_function``); the training half
(graphrewrite.training.update) finds a loaded model's sites and calls the same ``update_sites``.

It follows the reference's TF-path update (``CompressionOp._create_update_op``, seed-spec §4.3), per
site, at global step ``step``:

    in_range = begin <= step and (end == -1 or step <= end)       (end inclusive)
    due      = last_update + frequency <= step
    if in_range and due:
        if last_update < 0:  factors := factorize(current A)      (first due update only,
                                                               not for calibrated factors)
        last_update := step
        alpha := max(alpha - alpha_decrement_value, 0)

and always sets the model's ``global_step`` to ``step``. Unlike the reference, ``last_update`` is
kept per site (it shared one counter among all ops of a spec name), and the Python-side update uses
the same schedule (the reference's never fired with end = -1 and had no frequency gate).

The same code runs eagerly (where the first factorisation uses LAPACK unless ``use_tpu``), inside
any tf.function or XLA cluster (``tf.linalg.svd``), and under tf.distribute, where it assigns
through the distributed variables in cross-replica context so every replica sees the same values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import views
from graphrewrite.hparams import UpdateOption
from graphrewrite.transforms import SizePlan, Transform


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The schedule hyperparameters of one site."""

    begin: int
    end: int
    frequency: int
    decrement: float
    update_option: int
    use_tpu: bool

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> Schedule:
        return cls(int(hp["begin_compression_step"]), int(hp["end_compression_step"]),
                   int(hp["compression_frequency"]), float(hp["alpha_decrement_value"]),
                   int(hp["update_option"]), bool(hp["use_tpu"]))


@dataclasses.dataclass(frozen=True)
class SiteHandle:
    """A site's variables with what updating them needs."""

    state: Any
    view: views.View
    size: SizePlan
    transform: Transform
    schedule: Schedule

    def updates_in(self, python_side: bool) -> bool:
        """Whether the update of this context moves this site's alpha (update_option, seed-spec §4.2):
        0 everywhere; 1 only from the Python helper; 2 (k-means + pruning: in-graph mask updates,
        Python k-means and alpha) only from the helper where the method has a mask, else as 0; 3 never."""
        option = self.schedule.update_option
        if not self.transform.blended or option == UpdateOption.NO_UPDATE:
            return False
        python_only = option == UpdateOption.PYTHON_UPDATE or (
            option == UpdateOption.TF_AND_PYTHON_UPDATE and self.masked)
        return python_side or not python_only

    @property
    def masked(self) -> bool:
        return "mask" in self.state.factors

    def raw_matrix(self) -> Any:
        """The current weight's matrix view."""
        return views.apply_tf(self.state.weight.read_value(), self.view)

    def matrix(self) -> Any:
        """The current weight's matrix view, with the current pruning mask where there is one."""
        import tensorflow as tf

        matrix = self.raw_matrix()
        if self.masked:
            matrix = matrix * tf.cast(self.state.factors["mask"].read_value(), matrix.dtype)
        return matrix


def _refactor(site: SiteHandle) -> Any:
    """Factors from the current A (the first due update). Methods with a mask keep the current one.

    Dictionary learning has no in-graph factorisation (nor had the reference): where the update
    runs in a graph, its factors stay those computed from A at rewrite time.
    """
    import tensorflow as tf

    matrix = site.matrix()
    host = not site.schedule.use_tpu or site.schedule.update_option == UpdateOption.PYTHON_UPDATE
    try:
        if tf.executing_eagerly() and host:
            values = site.transform.factorize(np.asarray(matrix, dtype=np.float32), site.size)
        else:
            values = site.transform.factorize_tf(matrix, site.size)
    except NotImplementedError:
        return tf.constant(False)
    assigns = [var.assign(tf.cast(values[name], var.dtype)) for name, var in site.state.factors.items()
               if name != "mask"]
    with tf.control_dependencies(assigns):
        return tf.constant(True)


def _update_site(site: SiteHandle, step: Any) -> Any:
    import tensorflow as tf

    sched, state = site.schedule, site.state
    last = state.last_update.read_value()
    in_range = step >= sched.begin
    if sched.end >= 0:
        in_range = tf.logical_and(in_range, step <= sched.end)
    due = tf.logical_and(in_range, last + sched.frequency <= step)

    def run() -> Any:
        # Calibrated factors were fitted to A's outputs at rewrite time: that was the first
        # factorisation, and redoing it from A alone would undo the calibration (README).
        refreshed = tf.constant(False) if site.size.details.get("factors") == "calibrated" else tf.cond(
            last < 0, lambda: _refactor(site), lambda: tf.constant(False))
        with tf.control_dependencies([refreshed]):
            new_alpha = tf.maximum(state.alpha.read_value() - sched.decrement, 0.0)
            ops = [state.alpha.assign(new_alpha), state.last_update.assign(step)]
        with tf.control_dependencies(ops):
            return tf.constant(True)

    return tf.cond(due, run, lambda: tf.constant(False))


@dataclasses.dataclass
class _StateView:
    """A site's variables as a shared update function receives them (its arguments)."""

    weight: Any
    factors: dict[str, Any]
    alpha: Any
    last_update: Any


def _shared_update_site(site: SiteHandle, step: Any, shared: dict[Any, Any]) -> Any:
    """``_update_site`` through one nested tf.function per kind of site, the variables passed as
    arguments: the saved update is traced and saved once per kind, not once per site."""
    import tensorflow as tf

    state = site.state
    names = sorted(state.factors)
    key = (id(site.transform), site.view, site.size.structure_key(), site.schedule, tuple(names))
    fn = shared.get(key)
    if fn is None:
        def body(step: Any, weight: Any, alpha: Any, last: Any, *factors: Any) -> Any:
            view = _StateView(weight, dict(zip(names, factors)), alpha, last)
            return _update_site(dataclasses.replace(site, state=view), step)

        fn = shared[key] = tf.function(body, autograph=False)
    return fn(step, state.weight, state.alpha, state.last_update, *(state.factors[n] for n in names))


def update_sites(sites: Sequence[SiteHandle], step: Any, global_step: Any, python_side: bool,
                 shared: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Runs the schedule on every site; returns ``{"alpha": [n] float32, "updated": bool}``.

    ``shared``: a cache of nested per-kind update functions (the saved update function uses one;
    the Python helper, which may run on distributed variables, updates each site inline).
    """
    import tensorflow as tf

    step = tf.cast(step, tf.int64)
    flags = [tf.constant(False)]
    extra = []
    for site in sites:
        if site.schedule.update_option != UpdateOption.NO_UPDATE:
            extra.extend(site.transform.scheduled_updates(site.state.factors, site.raw_matrix, step, site.size))
        with tf.control_dependencies(extra):
            if site.updates_in(python_side):
                flags.append(_update_site(site, step) if shared is None
                             else _shared_update_site(site, step, shared))
    with tf.control_dependencies(flags + extra):
        step_set = global_step.assign(step)
    with tf.control_dependencies([step_set]):
        alphas = [tf.identity(site.state.alpha.read_value()) for site in sites]
        alpha = tf.stack(alphas) if alphas else tf.zeros([0], tf.float32)
        return {"alpha": alpha, "updated": tf.reduce_any(tf.stack(flags))}


def make_update_function(root: Any, handles: Sequence[SiteHandle]) -> Any:
    """The ``compression_update(step)`` tf.function saved with the model (in-graph update)."""
    import tensorflow as tf

    sites = list(handles)
    shared: dict[Any, Any] = {}

    @tf.function(input_signature=[tf.TensorSpec([], tf.int64, name="step")], autograph=False)
    def compression_update(step: Any) -> dict[str, Any]:
        return update_sites(sites, step, root.global_step, python_side=False, shared=shared)

    return compression_update
