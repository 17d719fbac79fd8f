"""`lozo-exp [COMMAND] [ARGS]` (or `python -m lozo_exp ...`): one command line for the suite.

With no command, or with Hydra overrides first, it trains (`train`); `lozo-exp --help` shows the
config groups and the commands. Each command is a module's `main(argv)`, imported only when run.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lozo_exp import cli

COMMANDS = {
    "train": "lozo_exp.train",  # fine-tune and test one run, or a sweep (-m)
    "report": "lozo_exp.report",  # tables and figures from run directories
    "kshot": "medium_models.kshot",  # LM-BFF k-shot splits
    "bench": "lozo_exp.bench",  # ZO step time against its floor
    "eval-bench": "large_models.eval_bench",  # batched vs one-at-a-time evaluation
    "demo": "lozo_exp.demo",  # a small pretrained model, zero-shot then fine-tuned, on a CPU
}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in COMMANDS else "train"
    first = args[0] if args else "-"
    if command == "train" and "=" not in first and not first.startswith(("-", "+", "~")):
        raise SystemExit(
            f"lozo-exp: {args[0]!r} is neither a command ({', '.join(COMMANDS)}) nor an override "
            f"(key=value); see lozo-exp --help"
        )
    if command != "train" and cli.torchrun_processes() > 1:
        raise SystemExit(
            f"lozo-exp: under torchrun only `train` runs across processes; run `lozo-exp "
            f"{command}` as one process (python -m lozo_exp {command} ...)"
        )
    importlib.import_module(COMMANDS[command]).main(args)


if __name__ == "__main__":
    main()
