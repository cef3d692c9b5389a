"""The multi-task demo of pub_native: PUB against the gradient balancers on census-income data.

Demo layer, kept out of the library: ``import pub_native`` loads only the optimizers, the
solver and the gradient balancers; this package adds the embedded UCI Adult data and a CSV
loader (:mod:`pub_native.demo.data`), the MMoE/PLE models (:mod:`pub_native.demo.models`) and
the comparison behind ``python -m pub_native demo`` (:mod:`pub_native.demo.run`).
"""

from .run import METHODS, DemoConfig, evaluate, format_table, main, roc_auc, run_demo

__all__ = ["DemoConfig", "METHODS", "evaluate", "format_table", "main", "roc_auc", "run_demo"]
