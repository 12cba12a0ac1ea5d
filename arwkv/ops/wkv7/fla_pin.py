"""Pin fla's RWKV-7 Triton kernels to one config each, so that Triton's autotuner never benchmarks.

fla decorates each kernel with ``triton.heuristics`` over ``triton.autotune`` over ``triton.jit``; the module
attribute is therefore a chain of wrappers whose ``.fn`` leads to an ``Autotuner``. The autotuner keeps its
candidates in the instance attribute ``configs`` and benchmarks only when that list has more than one entry
(then it compiles and times every candidate for each new key: ~196 forward and ~228 backward configs on
Hopper in fla-core 0.6.0, minutes of compilation on a fresh machine). Narrowing ``configs`` to one entry
leaves a single compilation per signature.

Which entry: the committed table ``fla_pins.json`` beside this file (override with $ARWKV_FLA_PIN_TABLE)
names one config per kernel; the member of the kernel's own list that matches it is kept ("pinned"), or the
closest member with the same meta-parameter names when this fla/GPU lists other values ("nearest"). Kernels
found in the table's modules but not named in it keep their first config with 4 warps ("fallback"). The
table's choices are untuned (its ``_doc`` says why each was picked); benchmarks/gpu_convert.sh measures them.

Enabled by ARWKV_FLA_PIN=1 (arwkv.ops.wkv7.fla applies it when it first loads fla); off by default, so that a
user's fla autotunes as its authors intended until the table is measured.

`CompileLog` also instruments the kernels so a caller can see the seconds each kernel's first calls took
(compilation dominates them) and which kernel is running when a time budget runs out.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from arwkv.errors import ArwkvError

PIN_ENV = "ARWKV_FLA_PIN"
TABLE_ENV = "ARWKV_FLA_PIN_TABLE"
TABLE_PATH = Path(__file__).with_name("fla_pins.json")

_applied: dict[int, tuple[Any, list]] = {}  # id(autotuner) -> (autotuner, its original configs)
_lock = threading.Lock()


class FlaPinError(ArwkvError, RuntimeError):
    """The pin table is missing or malformed, or fla's kernels are not where it says."""


@dataclass
class PinResult:
    kernel: str
    module: str
    status: str  # pinned | nearest | fallback
    config: dict[str, Any]
    candidates: int  # configs the autotuner had before


def pin_requested() -> bool:
    """True when $ARWKV_FLA_PIN asks for the pins (1/true/yes/on)."""
    return os.environ.get(PIN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def load_table(path: str | Path | None = None) -> dict[str, Any]:
    """The pin table: `path`, else $ARWKV_FLA_PIN_TABLE, else fla_pins.json beside this module."""
    file = Path(path or os.environ.get(TABLE_ENV) or TABLE_PATH)
    try:
        table = json.loads(file.read_text())
    except FileNotFoundError:
        raise FlaPinError(
            f"fla pin table {file} does not exist; set {TABLE_ENV} to a table file or unset {PIN_ENV}"
        ) from None
    except json.JSONDecodeError as e:
        raise FlaPinError(
            f"fla pin table {file} is not valid JSON ({e}); fix it or unset {PIN_ENV}"
        ) from None
    if not isinstance(table.get("kernels"), dict) or not isinstance(table.get("modules"), list):
        raise FlaPinError(f"fla pin table {file} needs a 'modules' list and a 'kernels' object")
    return table


def config_dict(cfg: Any) -> dict[str, Any]:
    """A triton.Config as plain data (meta-parameters, warps, stages)."""
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def find_autotuner(obj: Any) -> Any | None:
    """The Autotuner inside a kernel object (through Heuristics or other wrappers), or None."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(8):  # wrappers are a short chain; stop at plain functions
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def choose(configs: list, entry: dict[str, Any] | None) -> tuple[Any, str]:
    """The member of `configs` that the table entry names (status pinned), the nearest one (nearest), or,
    without an entry, the first with 4 warps and the fewest stages (fallback)."""
    if entry is None:
        four = [c for c in configs if c.num_warps == 4] or list(configs)
        return min(four, key=lambda c: c.num_stages), "fallback"
    want_kw = dict(entry.get("kwargs", {}))
    want_w, want_s = int(entry["num_warps"]), int(entry["num_stages"])
    for c in configs:
        if dict(c.kwargs) == want_kw and c.num_warps == want_w and c.num_stages == want_s:
            return c, "pinned"
    same_names = [c for c in configs if set(c.kwargs) == set(want_kw)]
    if not same_names:
        raise FlaPinError(
            f"the pin table's meta-parameters {sorted(want_kw)} are not the ones this fla tunes "
            f"({sorted(configs[0].kwargs)}); update fla_pins.json for the installed fla"
        )

    def distance(c) -> tuple:
        kw = sum(abs(math.log2(max(c.kwargs[k], 1) / max(want_kw[k], 1))) for k in want_kw)
        return (kw, abs(math.log2(c.num_warps / want_w)), abs(c.num_stages - want_s))

    return min(same_names, key=distance), "nearest"


def narrow(tuner: Any, config: Any) -> None:
    """Leave `tuner` one candidate (keeping the full list for `restore`) and forget tuned results."""
    with _lock:
        if id(tuner) not in _applied:
            _applied[id(tuner)] = (tuner, list(tuner.configs))
        tuner.configs = [config]
        tuner.cache.clear()


def pinned_count() -> int:
    """How many autotuners are pinned in this process."""
    return len(_applied)


def restore() -> None:
    """Give every pinned autotuner its full config list back (tests; re-tuning experiments)."""
    with _lock:
        for tuner, configs in _applied.values():
            tuner.configs = configs
            tuner.cache.clear()
        _applied.clear()


def module_autotuners(module: Any) -> list[tuple[str, Any]]:
    """(kernel name, Autotuner) of the autotuned kernels *defined* in `module` (not those it imports)."""
    found, seen = [], set()
    for name, obj in sorted(vars(module).items()):
        tuner = find_autotuner(obj)
        if (
            tuner is None
            or id(tuner) in seen
            or getattr(tuner.base_fn, "__module__", None) != module.__name__
        ):
            continue
        seen.add(id(tuner))
        found.append((getattr(tuner.base_fn, "__name__", name), tuner))
    return found


def pin_module(module: Any, table: dict[str, Any]) -> list[PinResult]:
    """Pin every autotuned kernel defined in `module` after the table."""
    results = []
    for kernel, tuner in module_autotuners(module):
        before = _applied.get(id(tuner), (None, tuner.configs))[1]
        entry = table["kernels"].get(kernel)
        config, status = choose(before, entry)
        narrow(tuner, config)
        results.append(PinResult(kernel, module.__name__, status, config_dict(config), len(before)))
    return results


def apply(table: dict[str, Any] | None = None) -> list[PinResult]:
    """Import the table's fla modules and pin their kernels; returns what was done per kernel.

    Idempotent: a second call re-pins from the original lists (so an edited table takes effect).
    Raises FlaPinError when a module is missing (another fla layout than the table's) or an entry names
    meta-parameters the kernel does not tune.
    """
    table = table if table is not None else load_table()
    results: list[PinResult] = []
    for mod_name in table["modules"]:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise FlaPinError(
                f"cannot pin fla kernels: module {mod_name} does not import ({e}); the table is for fla "
                f"{table.get('fla', '?')} — unset {PIN_ENV} or update fla_pins.json"
            ) from None
        results.extend(pin_module(module, table))
    named = {r.kernel for r in results}
    missing = [k for k in table["kernels"] if k not in named]
    if missing:
        raise FlaPinError(
            f"the pin table names kernels this fla does not have: {', '.join(missing)}; "
            "update fla_pins.json for the installed fla"
        )
    return results


# ----------------------------------------------------------------------------------------------------------
# compile timing


def _compiled_count(tuner: Any) -> int | None:
    """Binaries the kernel's JITFunction holds (all devices); None when this Triton keeps them elsewhere."""
    fn = tuner.fn
    for _ in range(8):
        caches = getattr(fn, "device_caches", None)
        if caches is not None:
            try:
                return sum(len(entry[0]) for entry in caches.values())
            except (TypeError, IndexError):
                return None
        fn = getattr(fn, "fn", None)
        if fn is None:
            return None
    return None


@dataclass
class KernelTiming:
    kernel: str
    calls: int = 0
    compiles: int = 0  # new binaries (None-safe: counted by wall time > 0.5 s when Triton hides its cache)
    compile_s: float = 0.0  # wall seconds of the calls that compiled
    total_s: float = 0.0


class CompileLog:
    """Wraps each autotuned kernel's `run` to time it; `current` names the kernel running right now."""

    def __init__(self) -> None:
        self.kernels: dict[str, KernelTiming] = {}
        self.current: str | None = None
        self.order: list[str] = []  # kernels in the order they first compiled
        self._wrapped: list[tuple[Any, Any]] = []

    def instrument(self, modules: list[str]) -> int:
        """Wrap the autotuners of these (already importable) modules; returns how many."""
        count = 0
        for mod_name in modules:
            for _, tuner in module_autotuners(importlib.import_module(mod_name)):
                if "run" not in vars(tuner):  # not wrapped yet
                    self._wrap(tuner)
                    count += 1
        return count

    def _wrap(self, tuner: Any) -> None:
        name = tuner.base_fn.__name__
        timing = self.kernels.setdefault(name, KernelTiming(name))
        original = tuner.run

        def run(*args, **kwargs):
            before = _compiled_count(tuner)
            self.current = name
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                after = _compiled_count(tuner)
                new = (after - before) if before is not None and after is not None else int(dt > 0.5)
                timing.calls += 1
                timing.total_s += dt
                if new > 0:
                    timing.compiles += new
                    timing.compile_s += dt
                    if name not in self.order:
                        self.order.append(name)
                self.current = None

        tuner.run = run  # instance attribute: Heuristics calls `self.fn.run`, which finds it first
        self._wrapped.append((tuner, original))

    def uninstrument(self) -> None:
        for tuner, _ in self._wrapped:
            vars(tuner).pop("run", None)
        self._wrapped.clear()

    def compiled(self) -> list[KernelTiming]:
        """Kernels that compiled at least once, in the order they first did."""
        return [self.kernels[k] for k in self.order]

    def as_dict(self) -> dict[str, Any]:
        return {k: asdict(v) for k, v in self.kernels.items() if v.calls}


def autotuned_kernels() -> list[str]:
    """Kernels of any loaded fla module that benchmarked more than one config (i.e. were not pinned)."""
    import sys

    names = []
    for mod_name, module in list(sys.modules.items()):
        if not mod_name.startswith("fla.") or module is None:
            continue
        for kernel, tuner in module_autotuners(module):
            if len(tuner.configs) > 1 and tuner.cache:
                names.append(kernel)
    return sorted(set(names))
