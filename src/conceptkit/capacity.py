"""Disk and memory a run will need, checked before it starts (a full disk mid-run helps nobody)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conceptkit.errors import StoreError, UsageError
from conceptkit.outputs import nearest_existing

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def human_size(n: float) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def harvest_bytes(model, cfg, trajectories: int) -> int:
    """Bytes `trajectories` of a resolved harvest config take on disk: kept steps x records x latent."""
    scale = model.pipe.vae_scale_factor
    latent = int(model.pipe.vae.config.latent_channels) * (cfg.height // scale) * (cfg.width // scale)
    kept = len([s for s in range(cfg.steps) if s % cfg.keep_every == 0 or s == cfg.steps - 1])
    return trajectories * kept * len(cfg.record) * latent * DTYPE_BYTES.get(cfg.store_dtype, 4)


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Refuse a run whose output will not fit on the disk that holds `folder` (5% kept free)."""
    probe = nearest_existing(Path(folder))
    free = shutil.disk_usage(probe).free
    if needed > 0.95 * free:
        raise StoreError(f"{what} needs about {human_size(needed)} on disk and {probe} has {human_size(free)} free; free some "
                         "space, ask for fewer samples, or set CONCEPTKIT_HOME to a larger disk")


def check_memory(needed: int, what: str) -> None:
    """Refuse a step that would hold more in memory than the machine has available."""
    import psutil

    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        raise UsageError(f"{what} needs about {human_size(needed)} of memory and {human_size(available)} is available; "
                         "ask for fewer --samples or fewer --steps")
