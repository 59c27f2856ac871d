"""Training checkpoints as safetensors plus a JSON sidecar: no pickle anywhere, atomic on disk.

A checkpoint is a folder `<stage>/step-NNNNNNN/` holding `tensors.safetensors` (model, EMA and the
optimizer's state flattened to names) and `state.json` (step counters, optimizer hyper-parameters,
anything else JSON). `<stage>/latest.json` names the newest complete folder and is replaced
atomically, so a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: flat tensors by name and the JSON state."""

    tensors: dict[str, torch.Tensor]
    state: dict


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer's state dict into named tensors and JSON-able parameter groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            tensors[f"opt/{idx}/{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> None:
    """Inverse of `flatten_optimizer`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name every tensor of a state dict `prefix/name` (contiguous, detached copies)."""
    return {f"{prefix}/{k}": v.detach().clone().contiguous() for k, v in state_dict.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors named `prefix/...`, with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write `folder/step-NNNNNNN/`, then point `folder/latest.json` at it; keep the newest `keep`.

    Args:
        folder: the stage's checkpoint folder.
        step: the step counter (names the checkpoint).
        tensors: every tensor to save, flat names.
        state: JSON-able counters and settings.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.json.tmp"
    pointer.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(pointer, root / "latest.json")
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_latest(folder: str | Path) -> Checkpoint | None:
    """The checkpoint `folder/latest.json` points at, or None if there is none."""
    pointer = Path(folder) / "latest.json"
    if not pointer.exists():
        return None
    path = Path(folder) / json.loads(pointer.read_text())["path"]
    return Checkpoint(tensors=load_file(str(path / "tensors.safetensors")), state=json.loads((path / "state.json").read_text()))


def replace_folder(tmp: Path, final: Path) -> None:
    """Swap a freshly written folder `tmp` into place at `final`, leaving no moment without one.

    The old folder is first renamed aside, then `tmp` renamed to `final`, then the old one removed.
    """
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
