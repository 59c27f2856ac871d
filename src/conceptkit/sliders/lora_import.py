"""Other people's LoRA files (kohya `lora_unet_...`, diffusers/peft `unet....lora_A`) next to our sliders.

`generate --lora FILE[:SCALE]` and `evaluate sliders FILE` load a `.safetensors` LoRA (Concept
Sliders', ai-toolkit's, kohya sd-scripts', one of our exports) with diffusers' own converter
(`pipe.lora_state_dict`, `pipe.load_lora_weights`) as a peft adapter. Every UNet key is checked
against the UNet's modules and shapes before anything is loaded. Adapters are peft layers and our
SliderBank hooks sit on top of them, so both add up; at strength 0 the image is the base model's.

Strengths: one for every image through `set_adapters` (what plain diffusers does, so the image is
the same), or one per image (`set_weights([...])`, for `evaluate sliders`) through a forward hook
on each adapter's `lora_B` that multiplies its output per batch element (dim 0).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptkit.diffusion import window_steps
from conceptkit.errors import UsageError
from conceptkit.models.flow import FLOW_PIPELINES, denoiser
from conceptkit.sliders.sets import MAX_STRENGTH

ADAPTER_PREFIX = "conceptkit_lora_"


@dataclass(frozen=True)
class LoraSpec:
    """A parsed `--lora FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0  # strength; 0 = the base model


def parse_lora(text: str, what: str = "--lora") -> LoraSpec:
    """`FILE[:SCALE]`: the file must exist and end in .safetensors, SCALE must be finite (default 1); `what` names it in errors."""
    raw = text.strip()
    head, sep, tail = raw.rpartition(":")
    scale = 1.0
    if sep and head.lower().endswith(".safetensors"):
        try:
            scale = float(tail)
        except ValueError:
            raise UsageError(f"{what} {text!r}: scale {tail!r} is not a number; write FILE[:SCALE], e.g. age.safetensors:1.5") from None
        raw = head

    if not math.isfinite(scale) or abs(scale) > MAX_STRENGTH:
        raise UsageError(f"{what} {text!r}: scale must be finite, between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} (got {scale})")
    path = Path(raw).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"{what} {text!r}: only .safetensors LoRA files are read (never pickles); got {path.name!r}")
    if not path.is_file():
        raise UsageError(f"{what} {text!r}: no such file {path}")
    return LoraSpec(path, scale)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file checked against a pipeline: what it changes and how it is named."""

    path: Path
    sha256: str
    layout: str  # "kohya" | "peft"
    unet_modules: tuple[str, ...]  # diffusers module paths of the UNet it changes
    text_encoder_keys: int  # tensors for the text encoder(s); 0 for a UNet-only slider
    rank: int  # largest rank in the file

    @property
    def name(self) -> str:
        """The name UIs call it by: the file name without `.safetensors` (`<lora:NAME:1>`)."""
        return self.path.name[: -len(".safetensors")]

    def describe(self, scale: float) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "sha256": self.sha256, "layout": self.layout,
                "scale": round(float(scale), 6), "modules": len(self.unet_modules)}


# how keys of FLUX / SD3 LoRA files start (diffusers, OneTrainer, kohya on BFL names, bare BFL or diffusers names)
TRANSFORMER_LORA_KEYS = ("transformer.", "lora_transformer_", "lora_unet_double_blocks_", "lora_unet_single_blocks_",
                         "lora_unet_joint_blocks_", "double_blocks.", "single_blocks.", "joint_blocks.",
                         "diffusion_model.double_blocks.", "transformer_blocks.", "single_transformer_blocks.")


def inspect_lora(pipe, spec: LoraSpec, what: str = "--lora") -> LoraFile:
    """Check `spec.path` against `pipe` without changing it: readable, a LoRA, every UNet key a UNet module of the right shape."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    path = spec.path
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises several types for a bad file
        raise UsageError(f"{what} {path}: cannot read it as safetensors: {exc}") from exc
    flow = type(pipe).__name__ in FLOW_PIPELINES  # FLUX / SD3: the transformer's modules, `transformer.` keys
    foreign = next((k for k in keys if k.startswith(TRANSFORMER_LORA_KEYS)), None)
    if foreign is not None and not flow:
        raise UsageError(f"{what} {path} is a LoRA for a FLUX / SD3 transformer (key {foreign!r}); "
                         f"it cannot apply to this {type(pipe).__name__}'s UNet")
    if flow and foreign is None and any(k.startswith(("lora_unet_", "unet.", "lora_te")) for k in keys):
        raise UsageError(f"{what} {path} is a LoRA for an SD / SDXL UNet; it cannot apply to this {type(pipe).__name__}'s transformer")
    kohya = any(k.startswith("lora_unet_") for k in keys)
    if not kohya and not any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or "lora_down" in k for k in keys):
        raise UsageError(f"{what} {path}: no LoRA keys (lora_unet_..., lora_A/lora_B); first key {keys[0] if keys else 'none'!r}")
    try:
        state = pipe.lora_state_dict(str(path))
        state = state[0] if isinstance(state, tuple) else state  # SD / SDXL: (state, network alphas)
    except Exception as exc:  # diffusers' converter raises ValueError/KeyError on what it cannot map
        raise UsageError(f"{what} {path}: diffusers cannot convert it (LyCORIS/LoHa/LoKr are not LoRA): {_one_line(exc)}") from exc
    prefix = "transformer." if flow else "unet."
    unet_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    text_keys = sum(1 for k in state if k.startswith(("text_encoder.", "text_encoder_2.")))
    other = [k for k in state if not k.startswith((prefix, "text_encoder.", "text_encoder_2."))]
    if other and not unet_state:  # diffusers left it unprefixed: a bare peft/diffusers UNet dict
        unet_state, other = dict(state), []
    if other:
        raise UsageError(f"{what} {path}: key {other[0]!r} belongs to neither the UNet nor a text encoder")
    if not unet_state:
        raise UsageError(f"{what} {path}: no UNet keys (it only changes the text encoder); conceptkit applies UNet LoRAs")
    peft = unet_state if flow else convert_unet_state_dict_to_peft(unet_state)  # flow: already lora_A / lora_B
    modules = dict(denoiser(pipe).named_modules())
    names, rank = [], 0
    for key, value in sorted(peft.items()):
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        module = getattr(modules.get(name), "base_layer", modules.get(name))
        if module is None:
            raise UsageError(f"{what} {path}: key {key!r} matches no module of this {type(pipe.unet).__name__} "
                             "(a LoRA for another architecture?)")
        b = peft.get(key.replace(".lora_A.", ".lora_B."))
        want_in = getattr(module, "in_features", getattr(module, "in_channels", None))
        want_out = getattr(module, "out_features", getattr(module, "out_channels", None))
        if b is None or value.shape[1] != want_in or b.shape[0] != want_out:
            raise UsageError(f"{what} {path}: {name} is ({want_out}, {want_in}) in this UNet but the file's factors are "
                             f"{tuple(b.shape) if b is not None else None} x {tuple(value.shape)} (a LoRA for another model?)")
        if not (torch.isfinite(value).all() and torch.isfinite(b).all()):
            raise UsageError(f"{what} {path}: {name}'s factors hold NaN or infinite values")
        names.append(name)
        rank = max(rank, int(value.shape[0]))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraFile(path, digest, "kohya" if kohya else "peft", tuple(names), text_keys, rank)


def load_loras(model, texts: Sequence[str]) -> list[tuple[LoraFile, float]]:
    """Parse and check every `--lora FILE[:SCALE]` before anything is loaded."""
    specs = [parse_lora(t) for t in texts]
    return [(inspect_lora(model.pipe, s), s.scale) for s in specs]


def open_loras(model, texts: Sequence[str], cfg_batches: bool) -> LoraModification | None:
    """Check every `--lora FILE[:SCALE]`, then load them all at their strengths (None without any)."""
    checked = load_loras(model, texts)
    if not checked:
        return None
    mod = LoraModification(model.pipe, [f for f, _ in checked], cfg_batches)
    mod.set_weights({j: s for j, (_, s) in enumerate(checked)})
    return mod


class LoraModification:
    """LoRA files as peft adapters on a pipeline; a modification for `diffusion.sample`.

    Args:
        pipe: the diffusers pipeline (its UNet gets the adapters; a file's text-encoder keys too).
        files: checked files (`inspect_lora`), loaded in this order as adapters `conceptkit_lora_<i>`.
        cfg_batches: the UNet batch is [uncond; cond] (guidance > 1): per-image strengths repeat twice.
        start: fraction of the steps before which the adapters are off (0: from the first step, as plain loaders do).
    """

    def __init__(self, pipe, files: Sequence[LoraFile], cfg_batches: bool, start: float = 0.0):
        self.pipe, self.files, self.cfg_batches, self.start = pipe, list(files), cfg_batches, float(start)
        self.names = [f"{ADAPTER_PREFIX}{i}" for i in range(len(self.files))]
        self._had_peft = bool(getattr(denoiser(pipe), "peft_config", None))
        self._handles: list[Any] = []
        self._per_image: torch.Tensor | None = None  # (N, L) strengths, one row per UNet batch element
        self._scales = [0.0] * len(self.files)
        self._on = False
        try:
            for f, name in zip(self.files, self.names):
                pipe.load_lora_weights(str(f.path), adapter_name=name)
        except Exception as exc:  # diffusers/peft raise many types on a file they cannot place
            self.remove()
            raise UsageError(f"--lora: diffusers could not load it: {_one_line(exc)}") from exc
        self._coef_hooks()
        self._apply()

    def _coef_hooks(self) -> None:
        """A hook on each adapter's lora_B that scales its output per batch element (idle without per-image strengths)."""
        for j, name in enumerate(self.names):
            for module in denoiser(self.pipe).modules():
                lora_b = getattr(module, "lora_B", None)
                if isinstance(lora_b, nn.ModuleDict) and name in lora_b:
                    self._handles.append(lora_b[name].register_forward_hook(self._make_hook(j)))

    def _make_hook(self, j: int):
        def hook(_module, _args, output):
            w = self._per_image
            if w is None:
                return None
            if w.shape[0] != output.shape[0]:
                raise ValueError(f"per-image LoRA strengths for {w.shape[0]} samples, UNet batch {output.shape[0]}")
            return output * w[:, j].to(output.device, output.dtype).view(-1, *([1] * (output.ndim - 1)))

        return hook

    def set_weights(self, scales: dict[int, float] | list[dict[int, float]]) -> None:
        """{file index: strength} for every image, or a list of them, one per image; takes effect at `set_step`."""
        if isinstance(scales, list):
            w = torch.tensor([[float(sc.get(j, 0.0)) for j in range(len(self.files))] for sc in scales], dtype=torch.float32)
            self._per_image = w.repeat(2, 1) if self.cfg_batches else w
            self._scales = [1.0] * len(self.files)
        else:
            self._per_image = None
            self._scales = [float(scales.get(j, 0.0)) for j in range(len(self.files))]
        self._on = False
        self._apply()

    def set_step(self, i: int, n: int) -> None:
        on = i >= (window_steps(n, self.start) if self.start > 0 else 0)
        if on != self._on:
            self._on = on
            self._apply()

    def _apply(self) -> None:
        weights = self._scales if self._on else [0.0] * len(self.files)
        if self._per_image is not None:  # the hooks carry the strengths; adapters at 1 (or 0 outside the window)
            weights = [1.0 if self._on else 0.0] * len(self.files)
        self.pipe.set_adapters(self.names, weights)

    def remove(self) -> None:
        """Hooks off, adapters deleted; without adapters of its own before, the pipeline loses its peft layers too."""
        for h in self._handles:
            h.remove()
        self._handles = []
        loaded = [n for n in self.names if n in _adapter_names(self.pipe)]
        if loaded:
            if self._had_peft:
                self.pipe.delete_adapters(loaded)
            else:
                self.pipe.unload_lora_weights()

    def describe(self) -> dict[str, Any]:
        return {"kind": "loras", "start": self.start,
                "files": [f.describe(s) for f, s in zip(self.files, self._scales if self._per_image is None else [1.0] * len(self.files))]}


def _adapter_names(pipe) -> set[str]:
    return {n for names in pipe.get_list_adapters().values() for n in names}


def _one_line(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
