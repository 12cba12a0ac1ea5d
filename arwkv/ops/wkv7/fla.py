"""Finding flash-linear-attention's Triton RWKV-7 kernels (CUDA only); fla takes our layout as is and
`dispatch.wkv7_fla_call` calls them.

The installed fla must be in `FLA_REQUIRED`: 0.4.2-0.5.2 compute wrong results on the safe-gate tensor-core
path with more than one head (fla PR #1085, fixed in 0.6.0), which is exactly the path arwkv uses; the
upper bound is the newest minor series whose kernels this project has read (`fla_pins.json` too).
`check_fla()` turns a missing or wrong fla into one line (installed version, required range, the fix).
With $ARWKV_FLA_PIN=1 the kernels are pinned to one Triton config each when fla is first loaded here
(`fla_pin.py`: no autotuning).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import warnings

import torch

from arwkv.errors import ArwkvError

FLA_REQUIRED = ">=0.6.0,<0.7"
_FLA_MIN, _FLA_BELOW = (0, 6, 0), (0, 7)
FLA_INSTALL = "pip install 'fla-core>=0.6.0,<0.7' (or pip install 'arwkv[gpu]')"
# fla-core ships the `fla` ops; flash-linear-attention adds layers/models on top of it
_DISTRIBUTIONS = ("fla-core", "flash-linear-attention")


class FlaVersionError(ArwkvError, ImportError):
    """flash-linear-attention is missing, or its version is outside FLA_REQUIRED."""


def fla_version() -> str | None:
    """The installed fla version (fla-core's, else flash-linear-attention's), or None when neither is."""
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string; a pre-release (0.6.0rc1) counts as its release."""
    m = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(x or 0) for x in m.groups()) if m else ()


def check_fla(version: str | None = None) -> str:
    """The installed fla version when it is in FLA_REQUIRED; else FlaVersionError with one line saying
    which version is there, which range is needed and how to fix it. `version` overrides the lookup."""
    version = fla_version() if version is None else version
    if version is None:
        raise FlaVersionError(
            f"flash-linear-attention is not installed (need fla {FLA_REQUIRED}): {FLA_INSTALL}"
        )
    release = _release(version)
    if not (_FLA_MIN <= release and release[:2] < _FLA_BELOW):
        why = (
            " (0.4.2-0.5.2 give wrong results on the safe-gate path with several heads, fla PR #1085)"
            if release < _FLA_MIN
            else " (newer than the kernels this adapter and its pin table were written for)"
        )
        raise FlaVersionError(
            f"fla {version} is installed but arwkv needs fla {FLA_REQUIRED}{why}: {FLA_INSTALL}"
        )
    return version


@functools.cache
def load_fla() -> tuple:
    """(chunk_rwkv7, fused_recurrent_rwkv7) after the version check, pinned when $ARWKV_FLA_PIN=1.

    Raises FlaVersionError (wrong or missing fla) or ImportError (fla present but its Triton stack does not
    load); a pin table that does not fit this fla raises fla_pin.FlaPinError.
    """
    check_fla()
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    from arwkv.ops.wkv7 import fla_pin

    if fla_pin.pin_requested():
        fla_pin.apply()
    return chunk_rwkv7, fused_recurrent_rwkv7


def fla_problem() -> str | None:
    """Why fla cannot run here (one line), or None when it can."""
    if not torch.cuda.is_available():
        return "fla's kernels need a CUDA device and none is available"
    try:
        load_fla()
    except FlaVersionError as e:
        return str(e)
    except Exception as e:  # fla raises assorted errors when triton or the driver is missing
        return f"flash-linear-attention {fla_version()} does not load here: {type(e).__name__}: {e}"
    return None


@functools.cache
def fla_available() -> bool:
    """True when a CUDA device exists and an fla in FLA_REQUIRED loads (pinned when asked).

    An installed fla that cannot be used is said once (a warning), since `backend="auto"` then falls back
    to the chunked kernel, which is correct but far slower on a GPU."""
    problem = fla_problem()
    if problem is not None and torch.cuda.is_available() and fla_version() is not None:
        warnings.warn(f"{problem}; backend='auto' uses the chunked kernel instead", stacklevel=2)
    return problem is None
