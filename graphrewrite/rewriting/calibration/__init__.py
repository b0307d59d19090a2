"""Data-aware compression (``compress --calibration``): the rewriting's calibrated half.

In the order data flows: ``reader`` reads and checks the example inputs; ``statistics`` runs one
pass of them through the original model (``passgraph``: the pass's tf.function) and keeps each
weight's Gram; ``shift`` finds the weights whose outputs matter only up to a shift of each row;
``feedback`` refits each weight to the compressed model's own inputs; ``modelcheck`` compares the
compressed model with the original on held-out examples; ``distill`` trains the factors on the
original's outputs; ``replay`` runs part of a model's graph with weights replaced; ``fitting``
runs them for a plan. The transforms' ``factorize_calibrated`` and graphrewrite.whiten hold the
math; graphrewrite.rewriting.pipeline calls ``statistics.calibrate`` and ``fitting``.
"""
