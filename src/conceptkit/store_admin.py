"""Looking after the store: list, clear, verify and clean up after interrupted processes.

`cache list` shows every artifact folder, a damaged one (unreadable or malformed manifest, a
link instead of a folder) with what is wrong; `cache clear` removes folders, and links as links,
never what they point to; `cache verify` also reads every file header (shards, slider files,
arrays) and checksum; `clean_leftovers` removes what killed writers leave behind (temporary
files and folders) wherever no process holds the owning artifact's lock.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import numpy as np

from conceptkit import harvest_shards
from conceptkit.errors import ArtifactNotFoundError, DamagedArtifactError
from conceptkit.store import KINDS, Artifact, check_name, kind_dir, remove_tree
from conceptkit.store_schema import model_spec
from conceptkit.tensor_files import BadTensorFile, read_header

LEFTOVER_RE = re.compile(r"^\.(?:deleting|old|tmp)-(?P<name>.+)-\d+$")  # folders named after an artifact and a pid


@dataclass(frozen=True)
class ArtifactInfo:
    kind: str
    key: str
    path: str
    prompt: str
    model: str
    size: int
    created: float
    complete: bool
    damaged: str = ""  # what is wrong with it; empty when it reads

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.created)


def _folders(base: Path) -> list[Path]:
    """An artifact kind's folders (and links to folders), not hidden bookkeeping."""
    return sorted(p for p in base.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.is_symlink()))


def artifact_info(art: Artifact) -> ArtifactInfo:
    """What `cache list` shows of one artifact; a damaged one is listed, with what is wrong."""
    damaged = ""
    m: dict[str, Any] = {}
    if art.path.is_symlink():
        damaged = f"{art.path} is a link, not a folder"
    else:
        try:
            m = art.manifest()
        except ArtifactNotFoundError:
            pass  # no manifest yet: a first write in progress or interrupted (incomplete, not damaged)
        except DamagedArtifactError as exc:
            damaged = exc.problem
    prompts = m.get("prompts") or [m.get("prompt") or ""]
    try:
        mtime = art.path.lstat().st_mtime
    except OSError:
        mtime = time.time()
    return ArtifactInfo(
        kind=art.kind, key=art.key, path=str(art.path),
        prompt=str(prompts[0]) + (f" (+{len(prompts) - 1})" if len(prompts) > 1 else ""),
        model=model_spec(m.get("model")), size=art.size(), created=float(m.get("created", mtime)),
        complete=bool(m.get("complete", False)) and not damaged, damaged=damaged,
    )


def list_artifacts(kind: str | None = None) -> list[ArtifactInfo]:
    infos = []
    for k in [kind] if kind else list(KINDS):
        base = kind_dir(k)
        if base.is_dir():
            infos += [artifact_info(Artifact(k, folder.name, folder)) for folder in _folders(base)]
    return infos


def clear(kind: str | None = None, key: str | None = None, on_wait=None) -> list[ArtifactInfo]:
    """Remove one artifact (kind and key), every artifact of a kind, or everything; returns what went."""
    if key is not None:
        check_name(key, "key")
        kinds = [kind] if kind else list(KINDS)
        targets = [artifact_info(Artifact(k, key, kind_dir(k) / key)) for k in kinds
                   if (kind_dir(k) / key).is_dir() or (kind_dir(k) / key).is_symlink()]
        if not targets:
            raise ArtifactNotFoundError(f"no artifact {key!r}; see `conceptkit cache list`")
    else:
        targets = list_artifacts(kind)
    for item in targets:
        art = Artifact(item.kind, item.key, Path(item.path))
        with art.lock(on_wait=on_wait):
            # rename first so a reader never sees a half-deleted artifact
            doomed = art.path.with_name(f".deleting-{art.key}-{os.getpid()}")
            os.replace(art.path, doomed)
            remove_tree(doomed)
    return targets


# ---------------------------------------------------------------- verify


@dataclass(frozen=True)
class Verdict:
    """What `cache verify` found for one artifact: no problems means it is sound."""

    kind: str
    key: str
    path: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _npy_problem(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
            start = fh.tell()
    except (OSError, ValueError) as exc:
        return f"{path.name} is not a readable .npy file ({exc})"
    if dtype.hasobject:
        return f"{path.name} holds Python objects (a pickle); refused"
    need = start + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        return f"{path.name} is truncated: {path.stat().st_size} bytes, its header describes {need}"
    return None


def _files_problems(art: Artifact, m: dict[str, Any]) -> list[str]:
    """Problems with the files a manifest names, by kind, then with every tensor file's header."""
    out: list[str] = []
    if art.kind == "harvest":
        out += list(harvest_shards.problems(art.path, m).values())
    elif art.kind == "neurons":
        out += [f"step-{s:04d}.safetensors is missing" for s in range(len(m["timesteps"]))
                if not (art.path / f"step-{s:04d}.safetensors").is_file()]
    elif art.kind == "sliders":
        out += [f"{s['file']} is missing" for s in m["sliders"] if not (art.path / s["file"]).is_file()]
    elif art.kind == "implant":
        out += [f"{f} is missing" for f in (m["file"], m.get("temporal_file"), m.get("layers_file")) if f and not (art.path / f).is_file()]
    for name in (m.get("arrays") or {}) if art.kind in ("cluster", "evaluate") else ():
        if not check_name_ok(name) or not (art.path / f"{name}.npy").is_file():
            out.append(f"array {name!r} is missing")
    for f in sorted(art.path.iterdir()):
        if f.is_symlink():
            out.append(f"{f.name} is a link (to {os.readlink(f)})")
        elif f.suffix == ".safetensors" and not f.name.startswith("shard-"):
            try:
                read_header(f)
            except BadTensorFile as exc:
                out.append(str(exc))
        elif f.suffix == ".npy" and (problem := _npy_problem(f)):
            out.append(problem)
    return out


def check_name_ok(name: str) -> bool:
    try:
        check_name(name)
        return True
    except Exception:  # noqa: BLE001 - any refusal means not a plain name
        return False


def verify(kind: str | None = None) -> list[Verdict]:
    """Read every artifact's manifest and file headers (and shard checksums); one verdict each."""
    out = []
    for item in list_artifacts(kind):
        art = Artifact(item.kind, item.key, Path(item.path))
        if item.damaged:
            out.append(Verdict(item.kind, item.key, item.path, [item.damaged]))
            continue
        out.append(Verdict(item.kind, item.key, item.path, _files_problems(art, art.manifest())))
    return out


# ---------------------------------------------------------------- leftovers


def _free(lock_path: Path) -> filelock.FileLock | None:
    """The lock at `lock_path`, acquired, if no process holds it; else None."""
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None
    return lock


def clean_leftovers(kind: str | None = None) -> int:
    """Remove temporary files and folders of killed writers where no lock holder owns them; bytes freed."""
    freed = 0
    for k in [kind] if kind else list(KINDS):
        base = kind_dir(k)
        if not base.is_dir():
            continue
        for item in list_artifacts(k):
            art = Artifact(k, item.key, Path(item.path))
            if art.temporary_files() and (lock := _free(base / f".{art.key}.lock")) is not None:
                try:
                    freed += art.sweep_temporary()
                finally:
                    lock.release()
        for p in base.iterdir():
            m = LEFTOVER_RE.match(p.name)
            if not m or not check_name_ok(m["name"]) or (lock := _free(base / f".{m['name']}.lock")) is None:
                continue
            try:
                freed += Artifact(k, p.name, p).size()
                remove_tree(p)
            finally:
                lock.release()
    return freed
