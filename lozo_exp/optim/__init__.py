"""Zeroth-order optimizers: MeZO, LOZO and LOZO-M, and the fast engine that runs their steps."""

from lozo_exp.optim.engine import FastEngine
from lozo_exp.optim.lozo import LOZO, LOZOM
from lozo_exp.optim.zo import MeZO, ZeroOrderOptimizer, default_param_groups

__all__ = ["LOZO", "LOZOM", "FastEngine", "MeZO", "ZeroOrderOptimizer", "default_param_groups"]
