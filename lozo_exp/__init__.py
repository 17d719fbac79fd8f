"""lozo-exp: zeroth-order fine-tuning of language models (LOZO, LOZO-M, MeZO and baselines).

The public API; each name is imported on first use, so `import lozo_exp` loads neither torch
nor Hydra:

- `run_config(overrides)`: the typed `RunConfig` that `lozo-exp train <overrides>` runs;
- `run(cfg, out_dir)`: train, test and write `results.json` (the runner every command uses);
- `ConfigError`: a bad setting, raised before anything expensive starts;
- `MeZO`, `LOZO`, `LOZOM`: the zeroth-order optimizers, `torch.optim.Optimizer`s.

The command line is `lozo-exp` (`lozo_exp.__main__`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "run_config": "lozo_exp.cli",
    "run": "lozo_exp.runner",
    "RunConfig": "lozo_exp.config",
    "ConfigError": "lozo_exp.config",
    "MeZO": "lozo_exp.optim",
    "LOZO": "lozo_exp.optim",
    "LOZOM": "lozo_exp.optim",
}
__all__ = ["LOZO", "LOZOM", "ConfigError", "MeZO", "RunConfig", "__version__", "run", "run_config"]

if TYPE_CHECKING:
    from lozo_exp.cli import run_config
    from lozo_exp.config import ConfigError, RunConfig
    from lozo_exp.optim import LOZO, LOZOM, MeZO
    from lozo_exp.runner import run


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lozo_exp' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
