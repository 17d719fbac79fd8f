"""Zeroth-order optimizers: MeZO, LOZO and LOZO-M."""

from lozo_exp.optim.lozo import LOZO, LOZOM
from lozo_exp.optim.zo import MeZO, ZeroOrderOptimizer, default_param_groups

__all__ = ["LOZO", "LOZOM", "MeZO", "ZeroOrderOptimizer", "default_param_groups"]
