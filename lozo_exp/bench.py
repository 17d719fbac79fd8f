"""`lozo-exp bench model=<model> ...` (or `python -m lozo_exp.bench`): how close a ZO step comes
to its floor.

In one process, on a random-init model (time and memory do not depend on weight values), it
times one forward, the floor terms, and one step of each ZO method — lozo-exp's fast engine, its
plain in-place path, and a faithful re-expression of the published step (perturbations written
into newly allocated tensors, draws replayed from the global generator) as the in-run baseline —
with the peak memory of each. The loss is the LM loss over the whole batch of random tokens.

- ``fwd``: one forward at batch B (two per ZO step are unavoidable).
- ``update_pass``: one in-place low-rank update of every weight (LOZO's one unavoidable write).
- ``weight_pass``: one read + write of every weight at memory bandwidth (``_foreach_mul_``).
- floor: LOZO 2·fwd + update_pass; MeZO 2·fwd + 3·weight_pass (z is full-rank, so the two
  perturbations and the folded restore+update each touch every weight once).

Prints a table and writes JSON (device, versions, shapes, median/min/max, peak memory, ratios
to the floor, to the baseline and of memory to one forward). Runs on CPU with small shapes.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor, nn

from lozo_exp import cli
from lozo_exp.config import ConfigError, RunConfig, validate
from lozo_exp.methods.zo import LOZOMConfig
from lozo_exp.models import load_model, load_tokenizer, resolve_model
from lozo_exp.optim import LOZO, LOZOM, FastEngine, MeZO, ZeroOrderOptimizer, add_direction, kernels
from lozo_exp.tracking import resolve_device, synchronize

log = logging.getLogger("lozo_exp.bench")

STEPS = (
    "fwd",
    "update_pass",
    "weight_pass",
    "ref_lozo",
    "ref_mezo",
    "plain_lozo",
    "plain_mezo",
    "fast_lozo",
    "fast_lozo-m",
    "fast_mezo",
    "fast_mezo_torch",
)
"""Everything the benchmark can time; ``bench.steps`` picks a subset."""


@dataclass
class BenchConfig:
    shapes: list[str] = field(default_factory=lambda: ["32x64", "16x384"])  # batch x length
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    warmup: int = 2
    repeats: int = 5
    out: str | None = None  # also write the JSON here (e.g. results/bench/opt-13b.json)


@dataclass
class BenchRunConfig(RunConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="bench_schema", node=BenchRunConfig)


def parse_shape(text: str) -> tuple[int, int]:
    try:
        b, n = (int(x) for x in text.lower().split("x"))
        if b >= 1 and n >= 1:
            return b, n
    except ValueError:
        pass
    raise ConfigError(f"bench.shapes entry {text!r} is not BATCHxLENGTH, e.g. 32x64")


def check(cfg: BenchRunConfig) -> None:
    """Reject bad bench settings in one paragraph, before the model is built."""
    validate(cfg)
    if not isinstance(cfg.method, LOZOMConfig):
        raise ConfigError(
            f"the benchmark reads eps, rank, interval and beta from method=lozo-m (the default); "
            f"got method={cfg.method.name}"
        )
    bad = [s for s in cfg.bench.steps if s not in STEPS]
    if bad:
        raise ConfigError(f"bench.steps {bad} are not among: {', '.join(STEPS)}")
    for s in cfg.bench.shapes:
        parse_shape(s)
    if cfg.bench.repeats < 1 or cfg.bench.warmup < 0:
        raise ConfigError("bench.repeats must be >= 1 and bench.warmup >= 0")


# -- the published step, re-expressed --------------------------------------------------------


class PublishedStep:
    """The published MeZO / LOZO step: the global generator re-seeded before each of the three
    perturbations and the update, every draw and every ``param + scale·eps·d`` written into a
    newly allocated tensor (``param.data = ...``)."""

    def __init__(self, model: nn.Module, low_rank: bool, eps: float, lr: float, rank: int,
                 interval: int) -> None:  # fmt: skip
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.low_rank, self.eps, self.lr, self.rank, self.interval = (
            low_rank, eps, lr, rank, interval)  # fmt: skip
        self.v: dict[str, Tensor] = {}
        self.count = 0

    def _draws(self, refresh: bool) -> Iterator[tuple[Tensor, Tensor]]:
        for name, p in self.params:
            if self.low_rank and p.dim() >= 2:
                if refresh or name not in self.v:
                    self.v[name] = torch.randn(p.size(1), self.rank, device=p.device, dtype=p.dtype)
                u = torch.randn(p.size(0), self.rank, device=p.device, dtype=p.dtype)
                yield p, u @ self.v[name].T
            else:
                yield p, torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p, d in self._draws(self.count % self.interval == 0):
            p.data = p.data + scale * d * self.eps

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        seed = self.count + 12345
        self._perturb(seed, 1)
        loss1 = closure()
        self._perturb(seed, -2)
        loss2 = closure()
        self._perturb(seed, 1)
        g = float(loss1 - loss2) / (2 * self.eps)
        torch.manual_seed(seed)
        for p, d in self._draws(False):
            p.data = p.data - self.lr * g * d
        self.count += 1
        return loss1


# -- timing ------------------------------------------------------------------------------


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median / min / max milliseconds of ``fn`` and the peak memory allocated while it ran."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "peak_mem_gib": peak,
    }


@contextmanager
def _triton(enabled: bool) -> Iterator[None]:
    kernels.set_enabled(enabled)
    try:
        yield
    finally:
        kernels.set_enabled(True)


class Bench:
    def __init__(self, cfg: BenchRunConfig, model: nn.Module, device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg, model, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.vocab = model.get_input_embeddings().num_embeddings

    def optimizer(self, name: str) -> ZeroOrderOptimizer:
        m = self.cfg.method
        common = dict(lr=1e-7, eps=m.eps, seed=0)
        named = self.model.named_parameters()
        if name == "mezo":
            return MeZO(named, **common)
        cls = LOZOM if name == "lozo-m" else LOZO
        extra = {"beta": m.beta} if cls is LOZOM else {}
        return cls(named, rank=m.rank, interval=m.interval, **common, **extra)

    def step_fn(self, name: str, closure: Callable[[], Tensor]) -> Callable[[], Any]:
        m = self.cfg.method
        kind, _, method = name.partition("_")
        if kind == "ref":
            ref = PublishedStep(self.model, method == "lozo", m.eps, 1e-7, m.rank, m.interval)
            return lambda: ref.step(closure)
        opt = self.optimizer(method.removesuffix("_torch"))
        if kind == "fast":
            opt.use_engine(FastEngine(opt, self.model))
        return lambda: opt.step(closure)

    def update_pass(self) -> Callable[[], None]:
        r = self.cfg.method.rank
        factors = [
            (p, torch.randn(p.size(0), r, dtype=p.dtype, device=p.device),
             torch.randn(p.numel() // p.size(0), r, dtype=p.dtype, device=p.device))
            if p.dim() >= 2 else (p, torch.randn_like(p), None)
            for p in self.params
        ]  # fmt: skip

        def run() -> None:  # one launch per tensor: the GPU starts on the first at once
            with torch.no_grad():
                for p, a, b in factors:
                    add_direction(p, (a, b), 1e-9)

        return run

    def weight_pass(self) -> None:
        with torch.no_grad():
            torch._foreach_mul_(self.params, 1.0)

    def shape(self, batch: int, length: int) -> dict[str, Any]:
        b = self.cfg.bench
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(4, self.vocab, (batch, length), generator=gen).to(self.device)

        def closure() -> Tensor:
            with torch.inference_mode():
                return self.model(input_ids=ids, labels=ids, use_cache=False).loss

        timings: dict[str, dict] = {}
        for name in b.steps:
            if name == "fwd":
                fn = closure
            elif name == "update_pass":
                fn = self.update_pass()
            elif name == "weight_pass":
                fn = self.weight_pass
            else:
                fn = self.step_fn(name, closure)
            with _triton(not name.endswith("_torch")):
                timings[name] = time_fn(fn, self.device, b.warmup, b.repeats)
            log.info("%dx%d %s: %.2f ms", batch, length, name, timings[name]["median_ms"])
        return {"batch": batch, "seq_len": length, "timings": timings, **ratios(timings)}


def ratios(t: dict[str, dict]) -> dict[str, Any]:
    """Floors and each step's ratio to its floor, to the published step and (memory) to fwd."""
    med = {k: v["median_ms"] for k, v in t.items()}
    floor = {}
    if "fwd" in med and "update_pass" in med:
        floor["lozo"] = 2 * med["fwd"] + med["update_pass"]
    if "fwd" in med and "weight_pass" in med:
        floor["mezo"] = 2 * med["fwd"] + 3 * med["weight_pass"]
    out: dict[str, dict] = {}
    for name, ms in med.items():
        if "_" not in name or name in ("update_pass", "weight_pass"):
            continue
        method = name.partition("_")[2].removesuffix("_torch")
        family = "mezo" if method == "mezo" else "lozo"
        ref = med.get(f"ref_{family}")
        fwd_mem = t.get("fwd", {}).get("peak_mem_gib")
        mem = t[name]["peak_mem_gib"]
        out[name] = {
            "to_floor": ms / floor[family] if family in floor else None,
            "to_ref": ms / ref if ref else None,
            "mem_to_fwd": mem / fwd_mem if mem and fwd_mem else None,
        }
    return {"floor_ms": floor, "ratios": out}


def command_line() -> str:
    """The command as a user would type it (where the JSON and Hydra's files went left out)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("bench.out=", "hydra."))]
    return "python -m lozo_exp.bench " + shlex.join(args)


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": name or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} ({report['dtype']}) on {report['env']['device']}"]
    lines.append(
        f"{'shape':>8} {'step':>16} {'median ms':>10} {'/floor':>7} {'/ref':>6} {'mem/fwd':>8}"
    )
    for shape in report["shapes"]:
        tag = f"{shape['batch']}x{shape['seq_len']}"
        for name, t in shape["timings"].items():
            r = shape["ratios"].get(name, {})
            cells = [f"{r[k]:.2f}" if r.get(k) is not None else "" for k in
                     ("to_floor", "to_ref", "mem_to_fwd")]  # fmt: skip
            lines.append(
                f"{tag:>8} {name:>16} {t['median_ms']:>10.2f} {cells[0]:>7} {cells[1]:>6} "
                f"{cells[2]:>8}"
            )
        for k, v in shape["floor_ms"].items():
            lines.append(f"{tag:>8} {'floor_' + k:>16} {v:>10.2f}")
    return "\n".join(lines)


def run_bench(cfg: BenchRunConfig, out_dir: Path) -> dict[str, Any]:
    cfg.model = resolve_model(cfg.model)  # a local checkpoint's family from its config
    check(cfg)
    device = resolve_device(cfg.trainer.device)  # checked by validate() in check()
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = load_model(cfg.model, tokenizer, device).eval()  # OPT-66B does not fit in host memory
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bench = Bench(cfg, model, device)
    report = {
        "command": command_line(),
        "env": environment(device),
        "model": cfg.model.name,
        "dtype": cfg.model.dtype,
        "params": n_params,
        "weight_gib": weight_bytes / 2**30,
        "build_s": build_s,
        "method": {"eps": cfg.method.eps, "rank": cfg.method.rank, "interval": cfg.method.interval},
        "warmup": cfg.bench.warmup,
        "repeats": cfg.bench.repeats,
        "shapes": [bench.shape(*parse_shape(s)) for s in cfg.bench.shapes],
    }
    text = json.dumps(report, indent=2, default=lambda x: None if isinstance(x, float) and
                      not math.isfinite(x) else x) + "\n"  # fmt: skip
    paths = [out_dir / "bench.json"] + ([Path(cfg.bench.out)] if cfg.bench.out else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(table(report))
    print("JSON:", ", ".join(str(p) for p in paths))
    return report


def bench(dict_cfg: DictConfig) -> None:
    """The Hydra job: a bad setting ends as one paragraph (`cli.run_hydra`)."""
    hydra_cfg = HydraConfig.get()
    cli.set_verbosity(bool(hydra_cfg.verbose))
    try:
        run_bench(cli.to_object(dict_cfg), Path(hydra_cfg.runtime.output_dir))
    except ConfigError as err:
        cli.fail(err)  # here, not through Hydra, which would print its own line first


def main(argv: Sequence[str] | None = None) -> None:
    register_schema()
    cli.run_hydra(bench, "bench", argv)


if __name__ == "__main__":
    main()
