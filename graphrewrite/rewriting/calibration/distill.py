"""Distillation: the factors trained so that the compressed model's outputs match the original's.

Every factorisation before this one fits each weight on its own (the first pass, error feedback:
a weight's output error on its rows). At a hard budget that is not what decides the model's
outputs: on the digits CNN at 19% of its kernel parameters the calibrated factors keep 51% of the
held-out images (uncompressed 98.9%), and every rank allocation that fits stays below 80%. With
``--distill-steps N`` compress then trains the factors of every site, and nothing else, by
gradient descent on the calibration examples against the original model's outputs: no labels,
no training loop of the user's. It is the model's own graph (``replay.Pruned``) run in the sandbox
with every site's weight read as ``transform.dense`` of trainable factors (alpha = 0, what the
exported model computes); the other variables keep their values, so the rewritten model at
alpha = 1 is the original model still.

- Examples: those of the calibration pass that the model check does not hold out train; the held-
  out ones (every statistics.HOLD_OUT_EVERY-th batch) measure the loss per example after every
  epoch, the epoch with the lowest mean is the one kept (early stopping), and its factors
  replace the ones before only where they are better there beyond noise (``modelcheck.decide``:
  paired differences, z below -Z_TO_SWITCH). Chosen on those examples, the figure after is a
  little optimistic.
- Loss (``--distill-loss``): ``mse``, per example and float output ``||y_c - y||^2`` over the
  output's mean square on the training examples, summed over outputs; ``softmax``, for classifiers whose outputs are
  logits: per float output of rank 2 or more the cross-entropy of the compressed model's softmax
  over the last axis against the original's, mean over rows (KL divergence up to the original's
  entropy, which does not depend on the factors); outputs of rank 0 or 1 keep the mse term. The
  argmax and the softmax ignore what all logits of a row share; the mean-square error counts it,
  and at the CNN's 19% that is most of it (README): mse distillation leaves the CNN where it was,
  softmax takes it to 95%.
- Examples between the examples (``mix``, on by default): where every input of the signature is
  float, each step trains on its batch mixed in pairs (mixup without labels: row i ``l x_i + (1 -
  l) x_p(i)``, ``l`` uniform) against the original model's outputs there, one more forward pass
  per step. The factors then have to match the original between the calibration examples too,
  not only on them: with 384 images the digits CNN at 19% keeps 96.9% with mixup and the decay
  below, 94.0% with neither (3000 steps, mean of 2 draws; README). Integer inputs (token ids)
  are not mixed: the examples train as they are and the manifest says why.
- Optimiser: Adam with relative steps (``Adam``: each factor's step ``DEFAULT_RATE`` times its
  initial root mean square) and cosine decay of the rate over the ``steps`` (``Adam.decay``),
  batches of the calibration pass's size in a seeded order (epochs over the training examples
  as needed). Measured: 0.1 is the best of 0.03 / 0.1 / 0.3 on the digits CNN at 19% (89-92%,
  94-95%, 83-85%, constant rate) and on the encoder of the README's zoo; 0.2 with the decay was
  worse (93-96%). Halving after an epoch that was not better, tried before, was worse.
- Gradients: ``tf.gradients`` (a GradientTape does not see the ops ``import_graph_def`` makes),
  through the imported graph's own ops, While loops included. A weight a loop reads through its
  handle (Keras 3's RNNs) is swapped for a variable holding its compressed value, loaded before
  each step; the loop's gradient for that variable is carried on to the factors by a second
  ``tf.gradients`` (``grad_ys``). A site the signature does not reach keeps its factors
  (``untouched``); an op without a gradient stops distillation, and the manifest says why.

Cost: ``steps`` forward and backward passes of one batch through the signature, in the sandbox
(with mixup one more forward pass of the original per step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import views
from graphrewrite.errors import GraphrewriteError, first_line
from graphrewrite.rewriting import loops
from graphrewrite.rewriting.calibration import replay
from graphrewrite.rewriting.calibration.modelcheck import decide
from graphrewrite.rewriting.calibration.statistics import HOLD_OUT_EVERY
from graphrewrite.rewriting.graph import Edge
from graphrewrite.rewriting.model import FunctionIR, LoadedModel
from graphrewrite.rewriting.plan import RewritePlan
from graphrewrite.transforms import Transform

LOSSES = ("mse", "softmax")
DEFAULT_RATE = 0.1
BEFORE, AFTER = "before", "after"


def distill(model: LoadedModel, plan: RewritePlan, transform: Transform, initial: dict[str, dict[str, np.ndarray]],
            steps: int, loss: str, progress: Callable[[str], None], rate: float | None = None,
            seed: int = 0, mixup: bool = True) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Trains ``initial`` (site id -> factors) in place as the module doc says, where kept; returns
    what the manifest records (None for ``steps`` 0 or without calibration) and, where it ran, the
    held-out loss per example of the factors kept (else None). ``rate``: Adam's
    learning rate (None: DEFAULT_RATE); ``mixup``: train on mixed examples where every input is
    float (``mix``)."""
    stats = model.calibration
    rate = DEFAULT_RATE if rate is None else rate
    if not steps or stats is None or stats.distill is None:
        return None, None
    if not stats.held_examples:
        return {"run": False, "why": "no held-out calibration examples to check it on (fewer than "
                                     f"{HOLD_OUT_EVERY} batches)"}, None
    progress(f"calibration: distilling the factors of {len(plan.sites)} sites, {steps} steps ({loss} loss)")
    result = _run(stats, plan, transform, initial, steps, loss, rate, seed, mixup)
    if "why" in result:
        return {"run": False, "why": result["why"]}, None
    # the factors before stand unless the distilled ones are better on the held-out examples beyond
    # their noise (with early stopping their mean is lower whenever a step was kept)
    kept, z = decide({BEFORE: result["scores"][BEFORE], AFTER: result["scores"][AFTER]})
    if kept == AFTER:
        for sid, factors in result["factors"].items():
            initial[sid] = factors
    return {"run": True, "steps": steps, "loss": loss, "rate": rate, "schedule": "cosine",
            "mixup": result["mixup"], "examples": result["examples"],
            "held_out": {name: float(np.mean(s)) for name, s in result["scores"].items()},
            "z": z[AFTER], "kept": kept == AFTER, "best_step": result["best_step"], "steps_run": result["steps_run"],
            "trained": result["trained"],
            "untouched": result["untouched"]}, result["scores"][kept]


def refit(model: LoadedModel, plan: RewritePlan, transform: Transform, before: Mapping[str, Mapping[str, np.ndarray]],
          factors: dict[str, dict[str, np.ndarray]], record: dict[str, Any], progress: Callable[[str], None],
          seed: int = 0) -> None:
    """Distils again, on every calibration example, once ``distill`` kept its factors: from the
    factors ``before`` distillation, as many epochs as early stopping chose on the held-out
    examples (``record["best_step"]`` steps over the training examples; here the steps scaled by
    all examples over those, the cosine decay over them), the held-out examples now trained on
    too. ``factors`` (site id -> factors, as written) takes the trained sites' new factors; the
    record gets ``refit``: run, examples, steps, steps run and ``loss_on_held_out``, the new
    factors' mean loss on the held-out examples, which they trained on (or run False and why).
    ``held_out`` before it stays that of the early-stopped factors it replaces: nothing is left
    out to measure the new ones on. Why: the examples are few, and a quarter of them held out is
    a quarter fewer to learn from; on the digits CNN at 19% with 512 examples (384 + 128 held
    out) distillation kept 96.33% of the held-out test images, this 98.00% (98.89%
    uncompressed; README). Where it fails (out of the sandbox's time or memory: the second
    distillation runs under the same limits) the early-stopped factors stay and the record says why.
    """
    if not record.get("run"):
        return
    if not (record.get("kept") and record.get("best_step")):
        record["refit"] = {"run": False, "why": "distillation was not kept"}
        return
    stats = model.calibration
    steps = max(1, int(round(record["best_step"] * stats.examples / record["examples"])))
    progress(f"calibration: distilling again on all {stats.examples} examples, {steps} steps (refit)")
    try:
        result = _run(stats, plan, transform, before, steps, record["loss"], record["rate"], seed,
                      record.get("mixup") is True, everything=True)
    except GraphrewriteError as exc:  # the early-stopped factors stand
        result = {"why": first_line(exc)}
    if "why" in result:
        record["refit"] = {"run": False, "why": result["why"]}
        return
    for sid, trained in result["factors"].items():
        factors[sid] = trained
    record["refit"] = {"run": True, "examples": result["examples"], "steps": steps, "steps_run": result["steps_run"],
                       "loss_on_held_out": float(np.mean(result["scores"][AFTER]))}


def _run(stats: Any, plan: RewritePlan, transform: Transform, factors: Mapping[str, Mapping[str, np.ndarray]],
         steps: int, loss: str, rate: float, seed: int, mixup: bool, everything: bool = False) -> dict[str, Any]:
    """The sandbox's ``train_factors`` (statistics.calibrate's ``distill``) for the plan's sites from
    ``factors``; ``everything``: on every example, all ``steps`` (``refit``)."""
    sites = [(s.id, s.variable.key, views.to_json(s.view), s.size) for s in plan.sites]
    return stats.distill(transform, sites, {sid: dict(f) for sid, f in factors.items()}, steps, loss, rate, seed,
                         mixup, everything=everything)


def distill_job(input_dir: str, tags: Sequence[str], object_based: bool, train: Mapping[str, np.ndarray],
                held: Mapping[str, np.ndarray], signature: str, batch: int, transform: Transform,
                sites: Sequence[tuple[str, str, Any, Any]], factors: Mapping[str, Mapping[str, np.ndarray]],
                steps: int, loss: str, rate: float, seed: int, seconds: float | None = None,
                mixup: bool = True, early_stopping: bool = True) -> dict[str, Any]:
    """Sandbox job: loads the model and runs ``train_factors`` (for at most about ``seconds``)."""
    from graphrewrite.rewriting import loader

    return train_factors(loader.load_reused(input_dir, tags, object_based), train, held, signature, batch, transform,
                         sites, factors, steps, loss, rate, seed, early_stopping=early_stopping, seconds=seconds,
                         mixup=mixup)


def train_factors(model: LoadedModel, train: Mapping[str, np.ndarray], held: Mapping[str, np.ndarray],
                  signature: str, batch: int, transform: Transform, sites: Sequence[tuple[str, str, Any, Any]],
                  factors: Mapping[str, Mapping[str, np.ndarray]], steps: int, loss: str, rate: float,
                  seed: int, early_stopping: bool = True, seconds: float | None = None,
                  mixup: bool = True) -> dict[str, Any]:
    """``steps`` Adam steps on the factors of ``sites`` ((id, variable key, view as JSON, size
    plan)) from ``factors`` on the examples ``train``; returns the trained factors (``factors``),
    per held-out example the loss before and after (``scores``), how many examples trained, and
    which sites got gradients (``trained``; the others, ``untouched``, keep theirs). With
    ``early_stopping`` the factors returned are those after the epoch with the lowest held-out
    loss (``best_step``; 0: the factors given), else those after the last step. With ``seconds``,
    training stops at the first epoch's end past that many seconds (``steps_run`` says where).
    With ``mixup`` and only float inputs, each step trains on ``mix`` of its batch against the
    original model's outputs on those (``mixup`` in the result: whether it did, or why not)."""
    import time

    import tensorflow as tf

    deadline = None if seconds is None else time.monotonic() + seconds

    if loss not in LOSSES:
        raise ValueError(f"distillation loss {loss!r}: one of {LOSSES}")
    fir = model.functions[f"signature:{signature}"]
    pruned = replay.Pruned(fir, model, fir.outputs)
    names = sorted(train)
    specs = replay.input_specs(train, names)
    holders = {sid: {name: tf.Variable(np.asarray(value, np.float32), name=f"{sid}_{name}")
                     for name, value in factors[sid].items()} for sid, _, _, _ in sites}
    # weights a loop reads through their handle (Keras 3 RNNs) are swapped for a variable that
    # holds the compressed value: loaded before each step, its gradient taken, then carried on
    # to the factors (the loop's own gradient gives a read variable's, not a swapped tensor's)
    looped = {k: tf.Variable(tf.zeros(model.infos[k].shape, model.variables[k].dtype), trainable=False)
              for k in loop_handles(pruned, fir, {key for _, key, _, _ in sites})}

    def weights(keys: Any = None) -> dict[str, Any]:
        """Variable key -> the compressed weight its trainable factors give (of ``keys``; None: all)."""
        out = {}
        for sid, key, view, size in sites:
            if keys is not None and key not in keys:
                continue
            dense = transform.dense(holders[sid], size)
            value = views.invert_tf(dense, views.from_json(view), model.infos[key].shape)
            out[key] = tf.cast(value, model.variables[key].dtype)
        return out

    @tf.function(autograph=False)
    def fill() -> None:
        values = weights(looped)
        for key, holder in looped.items():
            holder.assign(values[key])

    def load() -> None:  # the loops' holders, from the factors now held
        if looped:
            fill()

    original = pruned.outputs(specs, name="original")

    def compressed(values: Sequence[Any], current: Mapping[str, Any]) -> list[Any]:
        outputs = pruned.run(pruned.feeds(values), {**current, **looped}, name="compressed")
        return [outputs[t] for t in pruned.wanted]

    train_batches, held_batches = replay.batches(train, names, batch), replay.batches(held, names, batch)
    targets = [[y.numpy() for y in original(*values)] for values in train_batches]
    held_targets = [[y.numpy() for y in original(*values)] for values in held_batches]
    floating = [np.issubdtype(y.dtype, np.floating) for y in targets[0]] if targets else []
    if not any(floating):
        return {"why": f"signature {signature!r} has no float outputs to match (integer outputs are not compared)"}
    # the mse terms' scale: each output's mean square over the training examples
    count = len(train[names[0]])
    scale = [max(sum(float(np.sum(np.square(ys[i].astype(np.float64)))) for ys in targets) / count, 1e-30)
             if f else 1.0 for i, f in enumerate(floating)]

    def per_example(ys: Sequence[Any], ys_c: Sequence[Any]) -> Any:
        """The loss of each example (row) of one batch, summed over the float outputs."""
        total = 0.0
        for i, (y, y_c) in enumerate(zip(ys, ys_c)):
            if not floating[i]:
                continue
            y, y_c = tf.cast(y, tf.float32), tf.cast(y_c, tf.float32)
            rows = tf.shape(y_c)[0] if y_c.shape.rank else 1
            if loss == "softmax" and y.shape.rank is not None and y.shape.rank >= 2:
                term = tf.nn.softmax_cross_entropy_with_logits(tf.nn.softmax(y), y_c)
            else:
                term = tf.square(y_c - y) / scale[i]
            total += tf.reduce_sum(tf.reshape(term, [rows, -1]), axis=1) if y_c.shape.rank else term
        return total

    target_specs = [tf.TensorSpec([None, *y.shape[1:]] if y.ndim else [], tf.as_dtype(y.dtype)) for y in targets[0]]
    variables = [v for site in holders.values() for v in site.values()]
    adam = Adam(variables, rate)
    not_float = [f"{n} ({train[n].dtype})" for n in names if not np.issubdtype(train[n].dtype, np.floating)]
    mixing: bool | str = True  # or why not
    if not mixup:
        mixing = "not asked"
    elif not_float:
        mixing = f"inputs not float: {', '.join(not_float)}"

    @tf.function(input_signature=[specs, target_specs],
                 autograph=False)
    def step(values: Any, ys: Any) -> Any:
        current = weights()
        value = tf.reduce_mean(per_example(ys, compressed(values, current)))
        # symbolic: a GradientTape does not see the ops import_graph_def makes
        grads = tf.gradients(value, variables + list(looped.values()))
        through = [(current[k], g) for k, g in zip(looped, grads[len(variables):]) if g is not None]
        if through:  # the loops' weights: on to their factors
            more = tf.gradients([w for w, _ in through], variables, grad_ys=[g for _, g in through])
            grads = [a if b is None else b if a is None else a + b for a, b in zip(grads[:len(variables)], more)]
        grads = grads[:len(variables)]
        adam.apply(grads)
        return [g is not None for g in grads]

    @tf.function(input_signature=[specs, target_specs],
                 autograph=False)
    def evaluate(values: Any, ys: Any) -> Any:
        return per_example(ys, compressed(values, weights()))

    def scores() -> np.ndarray:
        load()
        return np.concatenate([np.asarray(evaluate(values, ys), np.float64)
                               for values, ys in zip(held_batches, held_targets)])

    before = scores()
    best = (float(np.mean(before)), 0, before, [v.numpy() for v in variables])
    order = np.random.default_rng(seed)
    queue: list[int] = []
    reached = np.zeros(len(variables), bool)
    number = 0
    for number in range(1, steps + 1):
        if not queue:
            queue = list(order.permutation(len(train_batches)))
        index = queue.pop()
        load()
        adam.decay((number - 1) / steps)
        values, ys = train_batches[index], targets[index]
        if mixing is True:  # new examples between the batch's, and the original model's outputs there
            values = mix(values, order)
            ys = original(*values)
        try:
            done = step(values, ys)
        except (LookupError, ValueError, TypeError, NotImplementedError) as exc:  # no gradient for an op
            return {"why": f"no gradient through the model's graph: {type(exc).__name__}: {first_line(exc)}"}
        reached |= np.asarray([bool(r) for r in done])
        if not queue or number == steps:  # an epoch's end: the held-out loss picks the step kept
            now = scores()
            if not early_stopping or float(np.mean(now)) < best[0]:
                best = (float(np.mean(now)), number, now, [v.numpy() for v in variables])
            if deadline is not None and time.monotonic() > deadline:
                break
    for variable, value in zip(variables, best[3]):
        variable.assign(value)
    after = best[2]
    trained, untouched, position = [], [], 0
    for sid, values in holders.items():
        (trained if reached[position:position + len(values)].any() else untouched).append(sid)
        position += len(values)
    return {"factors": {sid: {name: v.numpy() for name, v in holders[sid].items()} for sid in trained},
            "scores": {BEFORE: before, AFTER: after}, "examples": count, "trained": trained, "untouched": untouched,
            "best_step": best[1], "steps_run": number, "mixup": mixing}


def mix(values: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Mixup (Zhang et al. 2018) without labels: row i of every input becomes ``l_i x_i + (1 -
    l_i) x_p(i)``, ``l_i`` uniform in [0, 1) and ``p`` a permutation of the batch, the same for all
    inputs. Distillation needs no labels for the new rows (the original model gives their
    outputs), so they add examples the factors must match the original on: with 384 calibration
    images the digits CNN's distilled factors fit those and few others (README's figures)."""
    rows = len(values[0])
    order, share = rng.permutation(rows), rng.uniform(size=rows)
    out = []
    for value in values:
        weight = share.reshape([-1] + [1] * (value.ndim - 1))
        out.append((weight * value + (1.0 - weight) * value[order]).astype(value.dtype))
    return out


def loop_handles(pruned: replay.Pruned, fir: FunctionIR, keys: set[str]) -> list[str]:
    """The variable keys among ``keys`` whose handle a loop of the pruned graph takes."""
    out = set()
    for node in pruned.stage.node:
        if node.op in loops.LOOP_OPS:
            for name in node.input:
                edge = Edge.parse(name)
                if not edge.control and edge.node in fir.handles and fir.handles[edge.node] in keys:
                    out.add(fir.handles[edge.node])
    return sorted(out)


class Adam:
    """Adam (Kingma and Ba, the defaults beta 0.9 / 0.999, epsilon 1e-7 as Keras has them) on
    ``variables``, each step scaled by the variable's initial root mean square: Adam moves every
    entry by about ``rate`` whatever its size, and the factors of a ResNet50's 53 weights are
    smaller than a digits CNN's (0.01 absolute helped the CNN and made no step of ResNet50's
    better); relative, one rate serves both. Written out so the sandbox needs TensorFlow alone."""

    def __init__(self, variables: Sequence[Any], rate: float, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-7) -> None:
        import tensorflow as tf

        self.variables, self.rate, self.beta1, self.beta2, self.epsilon = variables, rate, beta1, beta2, epsilon
        # relative steps: each variable's step is ``rate`` times its initial root mean square
        self.scales = [float(np.sqrt(np.mean(np.square(v.numpy(), dtype=np.float64)))) or 1.0 for v in variables]
        self.m = [tf.Variable(tf.zeros_like(v)) for v in variables]
        self.v = [tf.Variable(tf.zeros_like(v)) for v in variables]
        self.t = tf.Variable(0.0)
        self.factor = tf.Variable(1.0)  # the schedule's (``decay``)

    def decay(self, fraction: float) -> None:
        """Cosine decay (Loshchilov and Hutter's, without restarts): the rate times ``(1 +
        cos(pi fraction)) / 2`` from here on, ``fraction`` the share of the steps done."""
        self.factor.assign(0.5 * (1.0 + np.cos(np.pi * fraction)))

    def apply(self, grads: Sequence[Any]) -> None:
        """One step; variables whose gradient is None are left as they are."""
        import tensorflow as tf

        t = self.t.assign_add(1.0)
        scale = self.factor * self.rate * tf.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.beta1 ** t)
        for g, var, m, v, size in zip(grads, self.variables, self.m, self.v, self.scales):
            if g is None:
                continue
            m.assign(self.beta1 * m + (1.0 - self.beta1) * g)
            v.assign(self.beta2 * v + (1.0 - self.beta2) * tf.square(g))
            var.assign_sub(size * scale * m / (tf.sqrt(v) + self.epsilon))


__all__ = ["Adam", "DEFAULT_RATE", "LOSSES", "distill", "distill_job", "mix", "refit", "train_factors"]
