"""The multi-task demo of pub_native and the pieces of its benchmarks.

Demo layer, kept out of the library: ``import pub_native`` loads only the optimizers, the
solver and the balancers. This package adds the embedded UCI Adult data and a CSV loader
(:mod:`.data`), the MMoE/PLE models (:mod:`.models`), every compared method behind one training
step (:mod:`.methods`), paired differences with t-intervals (:mod:`.stats`), the figures
(:mod:`.plots`), the comparison behind ``python -m pub_native demo`` (:mod:`.run`), and for
``benches/``: the MMoE paper's synthetic tasks (:mod:`.synthetic`) and the two-objective toy
problem (:mod:`.toy`).
"""

from .run import METHODS, DemoConfig, evaluate, format_table, main, roc_auc, run_demo

__all__ = ["DemoConfig", "METHODS", "evaluate", "format_table", "main", "roc_auc", "run_demo"]
