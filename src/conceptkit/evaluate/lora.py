"""`evaluate sliders FILE.safetensors`: a published LoRA slider measured like one of our sets, on the same seeds.

The file becomes a one-slider set (`LoraFileSet`) whose modification is a peft adapter
(`sliders.lora_import.LoraModification`) with per-image strengths, so `evaluate.sliders.run` draws the
same base images, random combinations and -/+ effect images as for a trained set. `--like SET`
takes the prompt, steps, guidance, encoder and model of a set, so both are drawn on the same seeds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptkit.diffusion import same_weights
from conceptkit.errors import UsageError
from conceptkit.sliders.lora_import import LoraFile, LoraModification, inspect_lora, parse_lora
from conceptkit.sliders.pipeline import SliderInfo


@dataclass(frozen=True)
class LoraEvalSettings:
    """How a LoRA file is drawn for the evaluation; every field enters the cache key."""

    prompt: str  # the concept the file slides, e.g. 'a person'
    steps: int  # denoising steps
    guidance: float  # classifier-free guidance scale
    start: float = 0.0  # fraction of the steps before which the LoRA is off (0: as plain loaders apply it)
    encoder: str = "auto"  # the embedding encoder (`--encoder` overrides it)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise UsageError("--prompt: a LoRA file carries no prompt; give the concept it slides, e.g. --prompt 'a person'")
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {self.steps})")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise UsageError(f"--guidance must be 0 or more (got {self.guidance})")
        if not 0.0 <= self.start < 1.0:
            raise UsageError(f"--start must be in [0, 1) (got {self.start})")


@dataclass(frozen=True)
class LoraFileSet:
    """A LoRA file dressed as a one-slider set: what `evaluate.sliders.run` reads of a set."""

    name: str
    path: Path
    manifest: dict[str, Any]
    sliders: tuple[SliderInfo, ...]
    file: LoraFile

    @property
    def prompt(self) -> str:
        return self.manifest["prompt"]

    def modification(self, model, cfg_batches: bool) -> LoraSliderModification:
        return LoraSliderModification(model, self, cfg_batches)


def is_lora_file(text: str) -> bool:
    """Whether `evaluate sliders` got a LoRA file rather than a set name."""
    return re.search(r"\.safetensors(:[^/\\]*)?$", text.strip(), re.IGNORECASE) is not None


def precheck(text: str, prompt: str | None, like: str | None, start: float | None) -> None:
    """What can be refused before a model loads: the file, a missing prompt, the start."""
    parse_lora(text, "LoRA file")
    if prompt is None and like is None:
        raise UsageError("--prompt: a LoRA file carries no prompt; give the concept it slides (--prompt 'a person') "
                         "or a set to compare with (--like SET)")
    if start is not None and not 0.0 <= start < 1.0:
        raise UsageError(f"--start must be in [0, 1) (got {start})")


def settings_for(model, like, prompt: str | None, steps: int | None, guidance: float | None,
                 start: float | None) -> LoraEvalSettings:
    """The options given, else the `like` set's values, else the model's defaults (start 0, encoder auto)."""
    m = like.manifest if like is not None else {}
    if like is not None and not same_weights(m["model"], model):
        raise UsageError(f"--like {like.name!r} was trained for {m['model'].get('spec')}, not {model.spec}; "
                         f"drop --model or pass --model {m['model'].get('spec')}")
    return LoraEvalSettings(
        prompt=prompt if prompt is not None else m.get("prompt", ""),
        steps=steps if steps is not None else int(m.get("steps", model.default_steps)),
        guidance=guidance if guidance is not None else float(m.get("guidance", model.default_guidance)),
        start=start if start is not None else 0.0, encoder=m.get("encoder", "auto"))


def lora_file_set(model, text: str, settings: LoraEvalSettings) -> LoraFileSet:
    """Check `text` (a .safetensors path) against `model` and wrap it for the evaluation."""
    spec = parse_lora(text, "LoRA file")
    if spec.scale != 1.0:
        raise UsageError(f"{text!r}: give the file without :SCALE; --effect-strength and --scale set the strengths")
    checked = inspect_lora(model.pipe, spec, "LoRA file")
    if checked.text_encoder_keys:
        raise UsageError(f"{spec.path}: it also changes the text encoder ({checked.text_encoder_keys} tensors); "
                         "evaluate sliders gives each image its own strength, which only UNet LoRAs allow")
    key = json.dumps({"lora_sha256": checked.sha256, "prompt": settings.prompt, "steps": settings.steps,
                      "guidance": settings.guidance, "start": settings.start}, sort_keys=True)
    manifest = {"name": checked.name, "prompt": settings.prompt, "model": model.identity(), "encoder": settings.encoder,
                "steps": settings.steps, "guidance": settings.guidance, "start": settings.start, "settings_key": key,
                "lora": {"path": str(checked.path), "sha256": checked.sha256, "layout": checked.layout,
                         "modules": len(checked.unet_modules), "rank": checked.rank}}
    info = SliderInfo(index=0, label=checked.name, explained_variance=0.0, file=checked.path.name)
    return LoraFileSet(checked.name, checked.path.parent, manifest, (info,), checked)


class LoraSliderModification:
    """The file's adapter with the interface `evaluate_sliders` uses: `slots`, `set_weights` keyed by (set, index)."""

    def __init__(self, model, lset: LoraFileSet, cfg_batches: bool):
        self.name = lset.name
        self.slots = {(lset.name, 0): (lset.name, 0)}
        self.banks: dict[str, Any] = {}  # no bank: random-direction controls do not apply to a file
        self.inner = LoraModification(model.pipe, [lset.file], cfg_batches, start=float(lset.manifest["start"]))

    def set_weights(self, scales) -> None:
        def one(sc: dict) -> dict[int, float]:
            return {0: float(sum(v for (s, i), v in sc.items() if s == self.name and i == 0))}

        self.inner.set_weights([one(sc) for sc in scales] if isinstance(scales, list) else one(scales))

    def set_step(self, i: int, n: int) -> None:
        self.inner.set_step(i, n)

    def remove(self) -> None:
        self.inner.remove()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()
