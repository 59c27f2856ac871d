"""The slider window in other UIs: a ComfyUI workflow with LoRA hook keyframes, an sd-webui-loractl prompt.

Our sliders act from step `s = window_steps(n, start)` of n on (SliderSpace, Gandikota et al.
2025, Sec. 4; `sliders.apply.SliderModification`); a plain LoRA loader applies them from step 0.
- ComfyUI (API format): `CreateHookLoraModelOnly` per slider (chained by `prev_hooks`), two
  `CreateHookKeyframe`s (strength 0 from 0%, 1 from p), `SetHookKeyframes`, then
  `PairConditioningSetProperties` puts the hooks on the positive and the negative conditioning
  (our sliders act on both halves of the CFG batch). A keyframe switches on at the first step whose
  sigma is at most `percent_to_sigma(p) = sigma((1 - p) * 999)`; p is placed halfway between the
  timesteps of steps s-1 and s of the "leading" grid `t_i = (n-1-i) * (1000 // n) + 1` that
  diffusers' DDIM/Euler (steps_offset=1), A1111's DDIM and ComfyUI's `ddim_uniform` share.
- sd-webui-loractl (A1111/Forge): `<lora:NAME:unet=0@s-1,W@s,W@n>`: keyframes in absolute steps
  (a last keyframe above 1 makes loractl read them as steps, not fractions), interpolated with
  `np.interp` at the 0-based step index, so the weight is 0 up to step s-1 and W from step s on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptkit.diffusion import window_steps
from conceptkit.errors import UsageError
from conceptkit.infotext import Infotext, format_infotext, lora_tag, slider_lora_name
from conceptkit.sliders.sets import find_slider, parse_ref

COMFY_STRENGTH = 20.0  # CreateHookLora / CreateHookKeyframe accept strengths in [-20, 20]
CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")  # ComfyUI's checkpoint extensions
COMFY_SAMPLER, COMFY_SCHEDULER = "ddim", "ddim_uniform"  # DDIM (eta 0) on the leading grid, like ours


@dataclass(frozen=True)
class ClientSettings:
    """What the exported workflow and prompt draw."""

    strengths: tuple[tuple[int, float], ...]  # (slider index, strength); each in [-20, 20]
    checkpoint: str | None = None  # the checkpoint file ComfyUI loads (its models/checkpoints/ name)
    seed: int = 0  # KSampler seed / A1111 Seed
    steps: int | None = None  # None: the set's harvest steps
    negative: str = ""  # negative prompt

    def __post_init__(self) -> None:
        for index, value in self.strengths:
            if not -COMFY_STRENGTH <= value <= COMFY_STRENGTH:
                raise UsageError(f"--slider {index}={value:g}: strengths must lie in [-20, 20] (ComfyUI's hook range)")
        c = self.checkpoint
        if c is not None and (not c.strip() or c.startswith(("/", "\\")) or ".." in Path(c).parts
                              or not c.lower().endswith(CHECKPOINT_EXTS)):
            raise UsageError(f"--checkpoint {self.checkpoint!r}: give the file name in ComfyUI/models/checkpoints, "
                             f"ending in {', '.join(CHECKPOINT_EXTS)}")
        if not 0 <= self.seed < 2 ** 64:
            raise UsageError(f"--seed must be in [0, 2^64) (got {self.seed})")
        if self.steps is not None and not 1 <= self.steps <= 10000:
            raise UsageError(f"--steps must be between 1 and 10000 (got {self.steps})")


def parse_strengths(sset, texts) -> tuple[tuple[int, float], ...]:
    """`LABEL_OR_INDEX=SCALE` references into set `sset` -> sorted (index, strength); repeats add up."""
    strengths: dict[int, float] = {}
    for text in texts:
        ref = parse_ref(text)
        if ref.set is not None and ref.set != sset.name:
            raise UsageError(f"--slider {text!r}: export takes sliders of set {sset.name!r} only")
        index = find_slider(sset, ref.slider).index
        strengths[index] = strengths.get(index, 0.0) + ref.scale
    return tuple(sorted(strengths.items()))


def leading_timesteps(n: int) -> list[int]:
    """The timesteps of n steps on the leading grid, first step first: (n-1-i) * (1000 // n) + 1."""
    ss = 1000 // n
    return [(n - 1 - i) * ss + 1 for i in range(n)]


def comfy_start_percent(n: int, start: float) -> float:
    """ComfyUI keyframe start_percent that switches on at our step `window_steps(n, start)` (0.0 when that is step 0)."""
    s = window_steps(n, start)
    if s == 0:
        return 0.0
    t = leading_timesteps(n)
    threshold = (t[s - 1] + t[s]) / 2  # on where the step's timestep <= threshold, i.e. from step s
    return round(1.0 - threshold / 999.0, 6)


def loractl_tag(name: str, strength: float, n: int, start: float) -> str:
    """sd-webui-loractl's tag: the UNet weight 0 before step s, `strength` from step s on; text encoder 0."""
    s = window_steps(n, start)
    if s == 0:
        return lora_tag(name, strength)
    return f"<lora:{name}:te=0:unet=0@{s - 1},{strength:g}@{s},{strength:g}@{max(n, 2)}>"


@dataclass(frozen=True)
class ClientExport:
    """The files written for the UIs and what they hold."""

    workflow: dict[str, Any] | None  # ComfyUI API-format graph
    a1111: dict[str, str] | None  # {"loractl": prompt with scheduled tags, "plain": prompt with plain tags, "infotext": ...}
    files: list[Path]
    first_step: int
    steps: int
    start_percent: float


def _resolved(sset, cfg: ClientSettings) -> tuple[int, list[tuple[Any, float]]]:
    steps = cfg.steps or int(sset.manifest["steps"])
    by_index = {s.index: s for s in sset.sliders}
    chosen = [(by_index[i], v) for i, v in cfg.strengths] if cfg.strengths else [(s, 0.0) for s in sset.sliders]
    return steps, chosen


def comfyui_workflow(sset, cfg: ClientSettings) -> dict[str, Any]:
    """ComfyUI API-format workflow: the checkpoint, the prompt, the sliders as LoRA hooks from the set's start on."""
    if cfg.checkpoint is None:
        raise UsageError(f"--checkpoint: name the checkpoint file ComfyUI loads for {sset.manifest['model']['spec']} "
                         "(in ComfyUI/models/checkpoints), e.g. --checkpoint sd15.safetensors")
    steps, chosen = _resolved(sset, cfg)
    start = float(sset.manifest.get("start", 0.0))
    g: dict[str, Any] = {}

    def node(class_type: str, title: str, **inputs) -> list:
        key = str(len(g) + 1)
        g[key] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return [key, 0]

    ckpt = node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=cfg.checkpoint)
    pos = node("CLIPTextEncode", "Prompt", text=sset.prompt, clip=[ckpt[0], 1])
    neg = node("CLIPTextEncode", "Negative prompt", text=cfg.negative, clip=[ckpt[0], 1])
    hooks = None
    for info, value in chosen:  # 1. one hook per slider, chained
        extra = {"prev_hooks": hooks} if hooks else {}
        hooks = node("CreateHookLoraModelOnly", f"slider {info.index} {info.label}",
                     lora_name=f"{slider_lora_name(sset.name, info.index, info.label)}.safetensors",
                     strength_model=float(value), **extra)
    p = comfy_start_percent(steps, start)
    if p > 0:  # 2. off until the slider window opens
        off = node("CreateHookKeyframe", "sliders off", strength_mult=0.0, start_percent=0.0)
        on = node("CreateHookKeyframe", f"sliders on from step {window_steps(steps, start)} of {steps}",
                  strength_mult=1.0, start_percent=p, prev_hook_kf=off)
        hooks = node("SetHookKeyframes", "slider window", hooks=hooks, hook_kf=on)
    conds = node("PairConditioningSetProperties", "sliders on both CFG halves", positive_NEW=pos, negative_NEW=neg,
                 strength=1.0, set_cond_area="default", opt_hooks=hooks)
    latent = node("EmptyLatentImage", "Size", width=int(sset.manifest["width"]), height=int(sset.manifest["height"]), batch_size=1)
    sampled = node("KSampler", "KSampler", model=[ckpt[0], 0], seed=int(cfg.seed), steps=int(steps),
                   cfg=float(sset.manifest["guidance"]), sampler_name=COMFY_SAMPLER, scheduler=COMFY_SCHEDULER,
                   positive=[conds[0], 0], negative=[conds[0], 1], latent_image=latent, denoise=1.0)
    image = node("VAEDecode", "VAE Decode", samples=sampled, vae=[ckpt[0], 2])
    node("SaveImage", "Save Image", images=image, filename_prefix=f"conceptkit/{sset.name}")
    return g


def a1111_prompts(sset, cfg: ClientSettings) -> dict[str, str]:
    """The prompt with sd-webui-loractl's scheduled tags, with plain tags, and the infotext to paste into A1111."""
    steps, chosen = _resolved(sset, cfg)
    start = float(sset.manifest.get("start", 0.0))
    names = [(slider_lora_name(sset.name, info.index, info.label), value) for info, value in chosen]
    scheduled = " ".join([sset.prompt, *(loractl_tag(n, v, steps, start) for n, v in names)])
    plain = " ".join([sset.prompt, *(lora_tag(n, v) for n, v in names)])
    params = {"Steps": str(steps), "Sampler": "DDIM", "CFG scale": f"{float(sset.manifest['guidance']):g}",
              "Seed": str(cfg.seed), "Size": f"{int(sset.manifest['width'])}x{int(sset.manifest['height'])}"}
    return {"loractl": scheduled, "plain": plain, "infotext": format_infotext(Infotext(scheduled, cfg.negative, params))}


def write_clients(sset, folder: Path, formats: tuple[str, ...], cfg: ClientSettings) -> ClientExport:
    """Write `<set>-comfyui.json` and/or `<set>-a1111.txt` next to the kohya files in `folder`."""
    steps, _ = _resolved(sset, cfg)
    start = float(sset.manifest.get("start", 0.0))
    workflow = comfyui_workflow(sset, cfg) if "comfyui" in formats else None  # everything checked before writing
    prompts = a1111_prompts(sset, cfg) if "a1111" in formats else None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    if workflow is not None:
        files.append(folder / f"{sset.name}-comfyui.json")
        files[-1].write_text(json.dumps(workflow, indent=2) + "\n")
    if prompts is not None:
        s = window_steps(steps, start)
        files.append(folder / f"{sset.name}-a1111.txt")
        files[-1].write_text(
            f"# conceptkit slider set {sset.name}: the sliders act from step {s} of {steps} (start {start:g}).\n"
            "# With the sd-webui-loractl extension (A1111/Forge), this prompt keeps that window:\n"
            f"{prompts['loractl']}\n"
            "# Without it, plain <lora:...> tags act from the first step (a different image at the same strength):\n"
            f"{prompts['plain']}\n"
            "# Generation parameters (paste into the prompt box and press the arrow to read them back):\n"
            f"{prompts['infotext']}\n")
    return ClientExport(workflow, prompts, files, window_steps(steps, start), steps, comfy_start_percent(steps, start))
