"""Disk and memory a run will need, checked before it starts (a full disk mid-run helps nobody)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conceptkit.errors import StoreError, UsageError

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def harvest_bytes(model, cfg, trajectories: int) -> int:
    """Bytes `trajectories` of a resolved harvest config take on disk: kept steps x records x latent."""
    scale = model.pipe.vae_scale_factor
    latent = int(model.pipe.unet.config.in_channels) * (cfg.height // scale) * (cfg.width // scale)
    kept = len([s for s in range(cfg.steps) if s % cfg.keep_every == 0 or s == cfg.steps - 1])
    return trajectories * kept * len(cfg.record) * latent * DTYPE_BYTES.get(cfg.store_dtype, 4)


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Refuse a run whose output will not fit on the disk that holds `folder` (5% kept free)."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > 0.95 * free:
        raise StoreError(f"{what} needs about {_size(needed)} on disk and {probe} has {_size(free)} free; free some "
                         "space, ask for fewer samples, or set CONCEPTKIT_HOME to a larger disk")


def check_memory(needed: int, what: str) -> None:
    """Refuse a step that would hold more in memory than the machine has available."""
    import psutil

    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        raise UsageError(f"{what} needs about {_size(needed)} of memory and {_size(available)} is available; "
                         "ask for fewer --samples or fewer --steps")
