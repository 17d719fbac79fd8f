"""Zeroth-order optimizers: MeZO, LOZO and LOZO-M, the contract between an estimator and what
runs its steps (`Estimator`), and the fast engine that runs them."""

from lozo_exp.optim.engine import FastEngine
from lozo_exp.optim.estimator import Estimator, Factors, Placement, add_direction
from lozo_exp.optim.lozo import LOZO, LOZOM
from lozo_exp.optim.zo import MeZO, ZeroOrderOptimizer, default_param_groups, draw_key

__all__ = [
    "LOZO",
    "LOZOM",
    "Estimator",
    "Factors",
    "FastEngine",
    "MeZO",
    "Placement",
    "ZeroOrderOptimizer",
    "add_direction",
    "default_param_groups",
    "draw_key",
]
