"""Harvest shards on disk: names, ranges, checksums and the checks a shard passes before it is used.

A shard `shard-AAAAAA-BBBBBB.safetensors` holds trajectories [A, B): `final` (n, C, h, w),
`seeds` (n,), `prompt_index` (n,), `timesteps` (T,), and `x0` / `xt` (n, T, C, h, w) as recorded.
Its sha256 sits in the manifest's `checksums` (harvests written before checksums existed have
none and are checked from their headers only). Two shards whose ranges overlap (two
`accelerate launch`es on one key) make the harvest damaged: the reader refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptkit.store_schema import SHARD_RE
from conceptkit.tensor_files import FLOATS, BadTensorFile, read_header, sha256

STORE_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:06d}-{stop:06d}.safetensors"


def shard_ranges(path: Path) -> list[tuple[int, int]]:
    """The trajectory ranges [start, stop) of the shard files in `path`, sorted."""
    if not Path(path).is_dir():
        return []
    ranges = [(int(m[1]), int(m[2])) for f in Path(path).iterdir() if (m := SHARD_RE.match(f.name))]
    return sorted(ranges)


def overlaps(ranges: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs of sorted ranges that share trajectories (or are empty / reversed: paired with themselves)."""
    out = []
    for i, (a, b) in enumerate(ranges):
        if b <= a:
            out.append(((a, b), (a, b)))
        out += [((a, b), (c, d)) for c, d in ranges[i + 1:] if c < b]
    return out


def disjoint(ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(kept, dropped): the sorted ranges kept greedily so that none overlap, and the rest."""
    kept, dropped, end = [], [], 0
    for a, b in ranges:
        if a >= end and b > a:
            kept.append((a, b))
            end = b
        else:
            dropped.append((a, b))
    return kept, dropped


@dataclass(frozen=True)
class Expected:
    """What the manifest says every shard holds."""

    record: tuple[str, ...]  # x0 and/or xt
    steps_kept: int | None  # T, the kept steps (None: not known yet)
    store_dtype: str | None  # float16 | float32 | bfloat16 (None: any float)

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> Expected:
        settings = manifest.get("settings") or {}
        dtype = settings.get("store_dtype")
        timesteps = manifest.get("timesteps") or None
        return cls(tuple(manifest.get("record") or ()), len(timesteps) if timesteps else None,
                   dtype if dtype in STORE_DTYPES else None)


def check_shard(path: Path, start: int, stop: int, expected: Expected, checksum: str | None = None) -> str | None:
    """What is wrong with shard `path` for trajectories [start, stop), or None when it is sound."""
    try:
        header = read_header(path)
    except BadTensorFile as exc:
        return str(exc)
    n, t = stop - start, header.tensors
    for name in ("final", "seeds", "prompt_index", "timesteps", *expected.record):
        if name not in t:
            return f"{path.name} lacks tensor {name!r}"
    for name in ("seeds", "prompt_index", "timesteps"):
        if t[name].dtype != "I64" or len(t[name].shape) != 1:
            return f"{path.name}: {name} is {t[name].dtype} {list(t[name].shape)}, expected a 1-d I64 tensor"
    steps = t["timesteps"].shape[0]
    if expected.steps_kept is not None and steps != expected.steps_kept:
        return f"{path.name} holds {steps} steps, the manifest {expected.steps_kept}"
    want = STORE_DTYPES.get(expected.store_dtype or "")
    final = t["final"].shape
    for name, rank in (("final", 4), ("seeds", 1), ("prompt_index", 1), *((r, 5) for r in expected.record)):
        spec = t[name]
        if len(spec.shape) != rank or spec.shape[0] != n:
            return f"{path.name}: {name} has shape {list(spec.shape)}, expected {rank} dimensions and {n} trajectories"
        if rank == 5 and (spec.shape[1] != steps or spec.shape[2:] != final[1:]):
            return f"{path.name}: {name} has shape {list(spec.shape)}, expected [{n}, {steps}, {', '.join(map(str, final[1:]))}]"
        if name not in ("seeds", "prompt_index") and (spec.dtype not in FLOATS or (want and spec.dtype != want)):
            return f"{path.name}: {name} is {spec.dtype}, expected {want or 'a float type'}"
    if checksum is not None and sha256(path) != checksum:
        return f"{path.name} does not match its checksum (the file changed after it was written)"
    return None


def problems(folder: Path, manifest: dict[str, Any]) -> dict[tuple[int, int], str]:
    """Every unsound shard of a harvest folder, by range: overlapping, malformed or not matching its checksum."""
    ranges = shard_ranges(folder)
    expected = Expected.of(manifest)
    checksums = manifest.get("checksums") or {}
    out: dict[tuple[int, int], str] = {}
    _, dropped = disjoint(ranges)
    for r in dropped:
        out[r] = f"{shard_name(*r)} overlaps another shard (two runs wrote this harvest at once)"
    for a, b in ranges:
        if (a, b) not in out:
            problem = check_shard(Path(folder) / shard_name(a, b), a, b, expected, checksums.get(shard_name(a, b)))
            if problem:
                out[(a, b)] = problem
    return out
