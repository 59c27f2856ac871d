"""`conceptkit generate`: sample with sliders, sub-concepts and LoRA files applied, each PNG with its settings.

The command's orchestration only: the modifications live with their methods (`sliders.apply`,
`picasso.subconcepts`, `sliders.lora_import`) and are stepped along the denoising loop by
`diffusion.sample`. Sliders add up; at strength 0 the image is the base model's, bitwise.
`--random-sliders N` gives every image its own sparse random combination (SliderSpace's diversity
experiment, Gandikota et al. 2025, Sec. 5.2) and records it in the PNG.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptkit import __version__, store
from conceptkit.diffusion import sample, same_weights
from conceptkit.errors import UsageError
from conceptkit.figures import grid_image, with_column_labels
from conceptkit.infotext import write_png
from conceptkit.models.flow import cfg_batches as guidance_batches, check_guidance, denoiser
from conceptkit.picasso import subconcepts
from conceptkit.sliders.apply import SliderModification
from conceptkit.sliders.lora_import import open_loras, parse_lora
from conceptkit.sliders.pipeline import SliderInfo, SliderSet
from conceptkit.sliders.sets import MAX_STRENGTH, SliderRef, load_set, parse_ref, resolve, sets_for

SWEEP_RE = re.compile(r"^(?P<ref>[^=]+)=(?P<lo>[^:]+):(?P<hi>[^:]+):(?P<n>\d+)$")
Warn = Callable[[str], None]


@dataclass(frozen=True)
class Sweep:
    """`--sweep [SET/]LABEL=LO:HI:N`: one grid, N strengths in columns, seeds in rows."""

    ref: SliderRef  # scale unused
    strengths: tuple[float, ...]


def parse_sweep(text: str) -> Sweep:
    m = SWEEP_RE.match(text.strip())
    if not m:
        raise UsageError(f"malformed --sweep {text!r}: write [SET/]LABEL=LO:HI:N, e.g. age=-2:2:5")
    try:
        lo, hi, n = float(m["lo"]), float(m["hi"]), int(m["n"])
    except ValueError:
        raise UsageError(f"--sweep {text!r}: LO and HI must be numbers") from None
    if not 2 <= n <= 33 or not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) > MAX_STRENGTH:
        raise UsageError(f"--sweep {text!r}: N must be 2-33 and LO, HI between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}")
    ref = parse_ref(f"{m['ref']}=0")
    return Sweep(ref, tuple(float(x) for x in np.linspace(lo, hi, n)))


@dataclass(frozen=True)
class GenerateConfig:
    """What to draw and with which modifications."""

    prompt: str
    count: int = 4  # images (seeds seed .. seed+count-1); rows of a sweep
    seed: int = 0
    steps: int | None = None  # None: the model's default
    guidance: float | None = None  # None: the model's default
    out: Path = Path("conceptkit-images")  # output folder
    sliders: tuple[str, ...] = ()  # `[SET/]LABEL_OR_INDEX=SCALE`, added up
    random_sliders: int = 0  # N: each image gets N random sliders at random strengths
    random_scale: float = 2.0  # random strengths are uniform in [-random_scale, random_scale]
    slider_set: str | None = None  # the set --random-sliders draws from (default: the prompt's set)
    sweep: str | None = None  # `[SET/]LABEL=LO:HI:N`
    force: bool = False  # apply sliders trained for another base model (with a warning)
    batch_size: int = 8
    subconcepts: tuple[str, ...] = ()  # `KEY:C[:MODE[:SCALE]]`: Picasso sub-concepts applied (gates multiply)
    subconcept_grid: str | None = None  # `KEY[:MODE]`: one grid, the unmodified row then a row per sub-concept
    loras: tuple[str, ...] = ()  # `FILE[:SCALE]`: other people's LoRA files (kohya or peft), from the first step

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise UsageError("empty prompt: give the concept as text, e.g. 'a dog'")
        if not 1 <= self.count <= 1024:
            raise UsageError(f"--count must be between 1 and 1024 (got {self.count})")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {self.steps})")
        if self.guidance is not None and self.guidance < 0:
            raise UsageError(f"--guidance must be 0 or more (got {self.guidance})")
        if self.random_sliders < 0:
            raise UsageError(f"--random-sliders must be 0 or more (got {self.random_sliders})")
        if not self.random_scale > 0:
            raise UsageError(f"--random-scale must be positive (got {self.random_scale})")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        for text in self.sliders:
            parse_ref(text)
        if self.sweep is not None:
            parse_sweep(self.sweep)
        if self.slider_set is not None:
            store.check_name(self.slider_set, "slider set name")
        for text in self.subconcepts:
            subconcepts.parse_spec(text)
        if self.loras:
            for text in self.loras:
                parse_lora(text)
        if self.subconcept_grid is not None:
            if self.sliders or self.sweep or self.random_sliders or self.subconcepts or self.loras:
                raise UsageError("--subconcept-grid draws the sub-concepts alone: drop --slider, --sweep, "
                                 "--random-sliders, --subconcept and --lora")
            key, _, mode = self.subconcept_grid.partition(":")
            subconcepts.parse_spec(f"{key}:0" + (f":{mode}" if mode else ""))


@dataclass(frozen=True)
class GenerateResult:
    """The PNGs written, each with its settings."""

    files: list[dict[str, Any]] = field(default_factory=list)
    out: Path = Path(".")


def _check_model(sset: SliderSet, model, force: bool, warn: Warn) -> None:
    m = sset.manifest["model"]
    if same_weights(m, model):
        return
    msg = f"slider set {sset.name!r} was trained for {m.get('spec')} (weights {str(m.get('fingerprint'))[:12]}), not {model.spec}"
    if m.get("arch") != model.arch:
        raise UsageError(msg + f"; a {m.get('arch')} slider cannot apply to a {model.arch} UNet")
    if not force:
        raise UsageError(msg + "; pass --force to apply it anyway")
    warn("warning: " + msg)


def run(model, cfg: GenerateConfig, progress=None, warn: Warn = lambda _m: None) -> GenerateResult:
    """Draw `cfg.count` seeds (or a sweep grid) with the requested sliders; write PNGs to `cfg.out`."""
    check_guidance(model, cfg.guidance)
    steps = cfg.steps or model.default_steps
    guidance = model.default_guidance if cfg.guidance is None else cfg.guidance
    identity = model.identity()
    if cfg.subconcept_grid is not None:
        return _subconcept_grid(model, cfg, steps, guidance, identity, progress)
    # 1. resolve every slider named
    fixed = [(ref, *resolve(ref, cfg.prompt, identity)) for ref in map(parse_ref, cfg.sliders)]
    sweep = parse_sweep(cfg.sweep) if cfg.sweep else None
    swept = resolve(sweep.ref, cfg.prompt, identity) if sweep else None
    pool: list[tuple[SliderSet, SliderInfo]] = []
    if cfg.random_sliders:
        if cfg.slider_set:
            sets = [load_set(cfg.slider_set)]
        else:
            sets = sets_for(cfg.prompt, identity)
            if len(sets) != 1:
                raise UsageError(f"--random-sliders needs one set for {cfg.prompt!r}: "
                                 + (f"candidates {', '.join(s.name for s in sets)}" if sets else "none trained")
                                 + "; pass --set NAME")
        pool = [(sets[0], info) for info in sets[0].sliders]
        if cfg.random_sliders > len(pool):
            raise UsageError(f"--random-sliders {cfg.random_sliders} exceeds the {len(pool)} sliders of set {sets[0].name!r}")
    chosen = [(s, i) for _, s, i in fixed] + ([swept] if swept else []) + pool
    for sset in {s.name: s for s, _ in chosen}.values():
        _check_model(sset, model, cfg.force, warn)
    # 1b. resolve every sub-concept (all checked before any hook goes on)
    specs = [subconcepts.parse_spec(text) for text in cfg.subconcepts]
    resolved = [(spec, subconcepts.resolve(spec, model)) for spec in specs]
    # 1c. every --lora file checked against this UNet, then loaded first: slider hooks go on top of its layers
    cfg_batches = guidance_batches(model, guidance)
    lmod = open_loras(model, cfg.loras, cfg_batches=cfg_batches)
    try:
        mod = SliderModification(denoiser(model.pipe), chosen, cfg_batches=cfg_batches) if chosen else None
        subs = [subconcepts.SubconceptModification(denoiser(model.pipe), sub, spec.cluster, spec.mode, spec.scale) for spec, sub in resolved]
    except BaseException:
        if lmod:
            lmod.remove()
        raise
    mods = ([lmod] if lmod else []) + ([mod] if mod else []) + subs
    others = [m for m in mods if m is not mod]  # stepped along with the sliders
    base_scales: dict[tuple[str, int], float] = {}
    for ref, sset, info in fixed:
        base_scales[(sset.name, info.index)] = base_scales.get((sset.name, info.index), 0.0) + ref.scale
    common = {"prompt": cfg.prompt, "model": identity, "steps": steps, "guidance": guidance,
              "conceptkit": __version__, **({"modifications": [m.describe() for m in mods]} if mods else {}),
              **({"subconcepts": [str(spec) for spec in specs]} if specs else {}),
              **({"loras": lmod.describe()["files"]} if lmod else {})}
    out = Path(cfg.out)
    files: list[dict[str, Any]] = []
    seeds = list(range(cfg.seed, cfg.seed + cfg.count))
    try:
        if sweep:
            # 2a. one grid: a column per strength, a row per seed
            columns = []
            for k, value in enumerate(sweep.strengths):
                scales = dict(base_scales)
                key = (swept[0].name, swept[1].index)
                scales[key] = scales.get(key, 0.0) + value
                columns.append(_batched(model, mod, cfg, seeds, steps, guidance, scales, others))
                if progress:  # the bar counts images
                    progress((k + 1) * len(seeds), len(sweep.strengths) * len(seeds))
            grid = torch.stack(columns, 1).flatten(0, 1)  # (seeds*strengths, 3, H, W), row-major
            settings = {**common, "seeds": seeds, "sliders": _describe(base_scales, chosen),
                        "sweep": {"set": swept[0].name, "label": swept[1].label, "index": swept[1].index,
                                  "strengths": list(sweep.strengths), "rows": "seeds", "columns": "strengths"}}
            path = store.inside(out, f"{store.slugify(cfg.prompt)}-sweep-{swept[1].label}-{_digest(settings)}.png", "--sweep grid")
            labels = [f"{v:+g}" for v in sweep.strengths]
            write_png(with_column_labels(grid_image(grid, len(seeds), len(sweep.strengths)), labels, grid.shape[-1]), path, settings, model)
            files.append({"path": str(path), **{k: settings[k] for k in ("seeds", "sliders", "sweep", "subconcepts") if k in settings}})
        else:
            # 2b. one image per seed; random combinations drawn per image
            per_image = [dict(base_scales) for _ in seeds]
            if cfg.random_sliders:
                rng = np.random.default_rng(cfg.seed)
                for sc in per_image:
                    for j in rng.choice(len(pool), size=cfg.random_sliders, replace=False):
                        key = (pool[j][0].name, pool[j][1].index)
                        sc[key] = sc.get(key, 0.0) + float(rng.uniform(-cfg.random_scale, cfg.random_scale))
            done = 0
            for i in range(0, len(seeds), cfg.batch_size):
                chunk = seeds[i:i + cfg.batch_size]
                images = _batched(model, mod, cfg, chunk, steps, guidance, per_image[i:i + len(chunk)], others)
                for seed, img, sc in zip(chunk, images, per_image[i:i + len(chunk)]):
                    settings = {**common, "seed": seed, "sliders": _describe(sc, chosen),
                                **({"random_sliders": cfg.random_sliders} if cfg.random_sliders else {})}
                    path = store.inside(out, f"{store.slugify(cfg.prompt)}-{seed}-{_digest(settings)}.png", "image")
                    write_png(img, path, settings, model)
                    files.append({"path": str(path), "seed": seed, "sliders": settings["sliders"],
                                  **({"subconcepts": settings["subconcepts"]} if specs else {})})
                done += len(chunk)
                if progress:
                    progress(done, len(seeds))
    finally:
        for m in mods:
            m.remove()
    return GenerateResult(files, out)


def _subconcept_grid(model, cfg: GenerateConfig, steps: int, guidance: float, identity, progress) -> GenerateResult:
    """One PNG: the unmodified images in the first row, then one row per sub-concept; a column per seed."""
    key, _, mode = cfg.subconcept_grid.partition(":")
    spec = subconcepts.parse_spec(f"{key}:0" + (f":{mode}" if mode else ""))
    sub = subconcepts.resolve(spec, model)
    seeds = list(range(cfg.seed, cfg.seed + cfg.count))
    images = subconcepts.grid(model, sub, seeds, mode=spec.mode, steps=steps, guidance=guidance, batch_size=cfg.batch_size,
                              prompt=cfg.prompt, progress=progress and (lambda done, k: progress(done + 1, k + 1)))
    settings = {"prompt": cfg.prompt, "model": identity, "steps": steps, "guidance": guidance, "conceptkit": __version__,
                "seeds": seeds, "subconcept_grid": {"key": sub.key, "mode": spec.mode, "k": sub.k,
                                                    "rows": ["unmodified"] + [f"sub-concept {c}" for c in range(sub.k)],
                                                    "columns": "seeds"}}
    path = store.inside(Path(cfg.out), f"{store.slugify(cfg.prompt)}-subconcepts-{sub.key[:8]}-{spec.mode}-{_digest(settings)}.png",
                        "--subconcept-grid image")
    write_png(grid_image(images, sub.k + 1, len(seeds)), path, settings, model)
    return GenerateResult([{"path": str(path), "seeds": seeds, "subconcept_grid": settings["subconcept_grid"]}], Path(cfg.out))


def _batched(model, mod, cfg, seeds, steps, guidance, scales, others=()) -> torch.Tensor:
    if mod is not None:
        mod.set_weights(scales)
    return sample(model, cfg.prompt, seeds, steps, guidance, list(others) + ([mod] if mod else []))


def _describe(scales: dict[tuple[str, int], float], chosen) -> list[dict[str, Any]]:
    labels = {(s.name, i.index): i.label for s, i in chosen}
    return [{"set": k[0], "index": k[1], "label": labels[k], "scale": round(v, 6)} for k, v in sorted(scales.items()) if v != 0]


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
