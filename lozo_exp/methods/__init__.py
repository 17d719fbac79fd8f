"""The methods, registered by name: zeroth-order (MeZO, LOZO, LOZO-M, MeZO-LoRA), backprop
(FT, FT-LoRA) and evaluation only (zero-shot, ICL).

A method is one `Method` subclass with its config schema (see `base.py`), in a module of this
package, plus `conf/method/<name>.yaml`, which starts from the schema (`defaults:
[/<name>_schema@_here_, _self_]`). Every module here is imported, so adding one registers its
methods.
"""

from __future__ import annotations

import importlib
import pkgutil

from hydra.core.config_store import ConfigStore

from lozo_exp.config import RunConfig
from lozo_exp.methods.base import METHODS, Method, TrainingConfig, lr_factor, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "TrainingConfig", "build_method", "lr_factor", "register"]


def register_method_schemas() -> None:
    """Store each method's schema as the root config `<name>_schema`, which its yaml starts
    from (`defaults: [/<name>_schema@_here_, _self_]`); outside the `method` group, it is not
    one of the group's options."""
    store = ConfigStore.instance()
    for name, method in METHODS.items():
        store.store(name=f"{name}_schema", node=method.config)


def build_method(run: RunConfig) -> Method:
    """The `Method` of a composed run config (its `method.name`)."""
    return METHODS[run.method.name](run)
