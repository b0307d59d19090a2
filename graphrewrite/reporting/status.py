"""The state of a rewritten model right now: alpha, global step, reconstruction error per site.

``inspect`` on a rewritten model loads it and adds, to each manifest site, its current ``alpha``
and ``reconstruction_error = ||A - W_c||_F / ||A||_F`` (A's matrix view against the weight the
current factors imply), and the model's ``global_step``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from graphrewrite import views
from graphrewrite.errors import InputModelError, first_line
from graphrewrite.rewriting import sandbox
from graphrewrite.transforms import SizePlan, make


def rewritten_status(path: str, data: dict[str, Any], spectra: bool = False) -> dict[str, Any]:
    """``data`` (a manifest) with each site's alpha and reconstruction error, and the global step.

    Args:
      path: the rewritten SavedModel (already scanned).
      data: its manifest.
      spectra: also add each site's singular values of A (``singular_values``, for plots).
    """
    import tensorflow as tf

    sandbox.probe_load(path, ["serve"])
    try:
        model = tf.saved_model.load(path)
    except (tf.errors.OpError, ValueError, KeyError, OSError) as exc:
        raise InputModelError(f"{path}: cannot load the SavedModel ({first_line(exc)})") from None
    states = list(getattr(model, "graphrewrite_sites", []))
    if len(states) != len(data["sites"]):
        raise InputModelError(f"{path}: the model's sites do not match its manifest")
    transform = make(data["hparams"], allow_larger=True)
    out = copy.deepcopy(data)
    out["global_step"] = int(model.global_step.numpy())
    for state, site in zip(states, out["sites"]):
        plan = SizePlan(site["matrix"][0], site["matrix"][1], site["k"], site["params_after"],
                        site.get("details", {}))
        a = views.apply_numpy(state.weight.numpy(), views.from_json(site["view"])).astype(np.float64)
        w_c = transform.numpy_dense({k: v.numpy() for k, v in state.factors.items()}, plan)
        norm = float(np.linalg.norm(a))
        site["alpha"] = float(state.alpha.numpy())
        site["reconstruction_error"] = float(np.linalg.norm(a - w_c) / norm) if norm else 0.0
        if spectra:
            site["singular_values"] = np.linalg.svd(a, compute_uv=False).tolist()
    return out
