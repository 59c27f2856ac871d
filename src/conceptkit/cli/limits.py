"""The allowed range of every numeric option of every command, checked before any work starts.

One table, by parameter name, with overrides per command where the same name means something
else (`--count` is sliders in `sliders`, images in `generate`). A value outside its range, or a
float that is not finite, is refused with one line naming the option, the value and the range.
tests/test_limits.py checks that every numeric option of every command has an entry here.
"""

from __future__ import annotations

import math
from pathlib import Path

from conceptkit.errors import UsageError
from conceptkit.outputs import check_output_folder

SEED_MAX = 2**32 - 1  # the seed range UIs and most samplers use; trajectory i draws seed + i

# name: (lowest, highest); None on a side means unbounded there.
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "samples": (1, 100_000),  # trajectories: the paper's thousands, with room
    "steps": (1, 1000),  # denoising steps: a scheduler has 1000 training timesteps
    "guidance": (0.0, 100.0),
    "seed": (0, SEED_MAX),
    "batch_size": (1, 4096),
    "keep_every": (1, 1000),
    "height": (8, 8192),
    "width": (8, 8192),
    "count": (1, 100_000),  # images (generate, evaluate)
    "rank": (1, 128),
    "train_steps": (1, 1_000_000),
    "pairs": (1, 1024),
    "calibration_seeds": (0, 256),  # sliders: seeds of the strength calibration (0: none)
    "lr": (1e-8, 1.0),
    "start": (0.0, 0.99),
    "tau": (0.0, 1e12),  # quantile/relative/absolute are checked further by the clustering settings
    "k": (2, 256),
    "temporal_dim": (1, 1000),
    "pca_dim": (1, 4096),
    "fuzziness": (1.01, 10.0),
    "map_size": (1, 512),
    "fs_size": (1, 4096),
    "random_sliders": (0, 64),
    "random_scale": (0.0, 100.0),
    "per_image": (1, 64),
    "scale": (-100.0, 100.0),  # slider / sub-concept strength
    "effect_count": (1, 10_000),
    "effect_strength": (0.0, 100.0),
    "factor_seeds": (2, 4096),  # evaluate sliders on the toy: seeds of the factor table (2x as many base seeds)
}
# (command, name): a range that differs from the table's for that command.
COMMAND_LIMITS: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("sliders.train", "count"): (1, 64),  # K sliders: principal directions
    ("evaluate.cluster", "scale"): (0.0, 100.0),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fmt(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_value(name: str, value, low, high, option: str | None = None) -> None:
    """Refuse a non-finite float or a value outside [low, high], naming the option and the range."""
    option = option or flag(name)
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number (got {value})")
    if (low is not None and value < low) or (high is not None and value > high):
        where = (f"between {_fmt(low)} and {_fmt(high)}" if low is not None and high is not None
                 else f"at least {_fmt(low)}" if low is not None else f"at most {_fmt(high)}")
        raise UsageError(f"{option} must be {where} (got {_fmt(value)})")


def limit(command: str, name: str) -> tuple[float | None, float | None] | None:
    return COMMAND_LIMITS.get((command, name), LIMITS.get(name))


def check(command: str, values: dict) -> None:
    """Check every numeric option a command received; unknown names of numeric type are refused loudly."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = limit(command, name)
        if bounds is None:  # a new numeric option without a declared range is a bug, not user input
            raise RuntimeError(f"{command}: option {flag(name)} has no declared range in cli/limits.py")
        check_value(name, value, *bounds)


# Parameters that name a folder the command writes into (checked before any work starts).
OUTPUT_FOLDERS: dict[str, str] = {
    "out": "--out", "report": "--report", "export": "--export", "save_images": "--save-images", "plots": "--plots",
    "folder": "FOLDER",  # `sliders export NAME FOLDER`
}


def check_outputs(values: dict) -> None:
    for name, option in OUTPUT_FOLDERS.items():
        value = values.get(name)
        if isinstance(value, Path):
            check_output_folder(value, option)
