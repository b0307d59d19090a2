"""The training half's entry to the alpha schedule: ``compression_update(model, step)``.

It finds the sites of a loaded rewritten model (from its manifest) and runs the schedule of
graphrewrite.rewriting.schedule on them, the same code the saved in-graph update runs.
"""

from __future__ import annotations

import weakref
from typing import Any

from graphrewrite import views
from graphrewrite.rewriting.schedule import Schedule, SiteHandle, update_sites
from graphrewrite.transforms import SizePlan

_HANDLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_handles(model: Any) -> list[SiteHandle]:
    """The site handles of a loaded rewritten model (from its manifest asset; cached per object)."""
    from graphrewrite.rewriting import manifest as manifest_lib
    from graphrewrite.transforms import make as make_transform

    cached = _HANDLES.get(model)
    if cached is not None:
        return cached
    data = manifest_lib.read_from_object(model)
    transform = make_transform(data["hparams"], allow_larger=True)
    schedule = Schedule.from_hparams(data["hparams"])
    handles = []
    for state, site in zip(model.graphrewrite_sites, data["sites"]):
        size = SizePlan(site["matrix"][0], site["matrix"][1], site["k"], site["params_after"],
                        site.get("details", {}))
        handles.append(SiteHandle(state, views.from_json(site["view"]), size, transform, schedule))
    _HANDLES[model] = handles
    return handles


def compression_update(model: Any, step: Any) -> dict[str, Any]:
    """Runs the compression schedule of a rewritten model at global step ``step``.

    Correct eagerly, inside a tf.function or XLA cluster, inside ``strategy.run`` and in
    cross-replica context: under a tf.distribute strategy it assigns through the distributed
    variables, so every replica holds the same alpha and factors.

    Args:
      model: the object ``tf.saved_model.load`` returned for a rewritten model (or a re-saved one).
      step: int scalar, e.g. ``optimizer.iterations``.

    Returns:
      ``{"alpha": float32 [sites] in manifest order, "updated": bool}``.
    """
    import tensorflow as tf

    handles = model_handles(model)
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        def merged(strategy: Any, per_replica_step: Any) -> dict[str, Any]:
            local = strategy.experimental_local_results(per_replica_step)[0]
            return update_sites(handles, local, model.global_step, python_side=True)

        return tf.distribute.get_replica_context().merge_call(merged, args=(step,))
    return update_sites(handles, step, model.global_step, python_side=True)
