"""Build a C++ CPU kernel of this package on first use and load it with ctypes (no torch headers, no ninja).

The shared library is compiled with the machine's own ``g++ -O3 -march=native`` into a per-user cache keyed
by the source, the flags, the compiler and the CPU, written atomically (a crash or a second process never
leaves half a library), and reused by every later process. When it cannot be built (no compiler, a compile
error, ``ARWKV_NATIVE=0``) the caller falls back to its PyTorch kernel after one line of warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from arwkv.atomic import write_file

logger = logging.getLogger(__name__)

FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    # reassociation lets the compiler vectorise the row reductions; NaN/Inf semantics are kept
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=fast",
)

_loaded: dict[Path, ctypes.CDLL | str] = {}


def cache_dir() -> Path:
    """``$ARWKV_CACHE/native``, else ``$XDG_CACHE_HOME/arwkv/native``, else ``~/.cache/arwkv/native``."""
    if os.environ.get("ARWKV_CACHE"):
        return Path(os.environ["ARWKV_CACHE"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arwkv" / "native"


def _cpu_id() -> str:
    try:  # -march=native: a library built for one CPU may not run on another that shares the cache
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor() + platform.machine()


def load(source: Path) -> ctypes.CDLL | str:
    """The built library for `source`, or a one-line reason why there is none (cached per process)."""
    source = Path(source)
    if source in _loaded:
        return _loaded[source]
    if os.environ.get("ARWKV_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _loaded[source] = "disabled by ARWKV_NATIVE=0"
        return _loaded[source]
    _loaded[source] = result = _build_and_load(source)
    if isinstance(result, str):
        logger.warning("arwkv: %s; using the slower PyTorch kernel instead", result)
    return result


def _build_and_load(source: Path) -> ctypes.CDLL | str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return f"no C++ compiler (g++) found to build {source.name} (install g++, or set ARWKV_NATIVE=0)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            b"\0".join(x.encode() for x in (source.read_text(), " ".join(FLAGS), version, _cpu_id()))
        ).hexdigest()[:16]
        lib = cache_dir() / f"{source.stem}-{key}.so"
        if not lib.exists():
            logger.info("arwkv: building %s with %s (once per machine)", source.name, compiler)

            def compile_to(tmp: Path) -> None:
                cmd = [compiler, *FLAGS, str(source), "-o", str(tmp)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                    raise RuntimeError(f"{compiler} failed on {source.name}: {last}")

            write_file(lib, compile_to)
        return ctypes.CDLL(str(lib))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"could not build the C++ kernel {source.name} ({e})"
