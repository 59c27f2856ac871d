"""Measure the toy model against its quality bars: `python -m conceptkit.toy.quality`.

Fidelity: fully specified prompts, each factor read back by the analyser. Diversity: normalised
entropy of the factors a prompt leaves unsaid. Toy CLIP zero-shot accuracy on generator images.
Speed: wall time of 64 images at 20 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from conceptkit.metrics import normalised_entropy
from conceptkit.toy.analyse import Reading, analyse_batch
from conceptkit.toy.data import make_pool
from conceptkit.toy.model import load_clip, load_pipeline, sampling_defaults, weights_path
from conceptkit.toy.train_clip import zero_shot_accuracy
from conceptkit.toy.world import FACTORS, caption, sample_scenes

BARS = {"fidelity": 0.9, "diversity": 0.8, "clip_zero_shot": 0.95, "speed_s": 15.0}


@dataclass(frozen=True)
class QualityConfig:
    """Settings of a quality measurement."""

    prompts: int = 200  # fully specified prompts for fidelity (one image each, its own seed)
    diversity_images: int = 200  # images of "a shape" for diversity
    steps: int = 20  # DDIM steps
    guidance: float = 3.0  # classifier-free guidance scale
    batch: int = 100  # images per pipeline call
    seed: int = 0
    clip_images: int = 2000  # generator images for CLIP zero-shot accuracy (0 skips)
    speed: bool = True  # time 64 images at 20 steps

    def __post_init__(self) -> None:
        if self.prompts < 0 or self.diversity_images < 0 or self.batch <= 0 or self.steps <= 0:
            raise ValueError("counts must be non-negative, batch and steps positive")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")


@dataclass(frozen=True)
class QualityReport:
    """Measured figures; `passes` compares each with its bar."""

    config: dict
    fidelity: dict[str, float] = field(default_factory=dict)  # factor -> fraction rendered right
    valid: float = 0.0  # fraction of fidelity images the analyser could read
    diversity: dict[str, float] = field(default_factory=dict)  # factor -> normalised entropy for "a shape"
    diversity_valid: float = 0.0
    clip_zero_shot: dict[str, float] = field(default_factory=dict)
    speed_s: float | None = None  # seconds for 64 images at 20 steps
    passes: dict[str, bool] = field(default_factory=dict)


def factor_entropy(labels: list[str], values: tuple[str, ...]) -> float:
    """`metrics.normalised_entropy` of the factor values read (labels outside `values` ignored; 0.0 when none)."""
    ids = [values.index(v) for v in labels if v in values]
    return normalised_entropy(ids, len(values)) if ids else 0.0


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 100) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images, image i from `prompts[i]` with its own generator seeded `seeds[i]`."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        img = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
        out.append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def fidelity(readings: list[Reading], scenes) -> dict[str, float]:
    """Per-factor fraction of images whose reading matches the prompt's value (unreadable counts as wrong)."""
    return {k: float(np.mean([r.valid and r.factors[k] == getattr(s, k) for r, s in zip(readings, scenes)])) for k in FACTORS}


def measure(config: QualityConfig, weights: str | Path | None = None, log=lambda m: None) -> QualityReport:
    """Measure fidelity, diversity, CLIP zero-shot accuracy and speed of the toy weights.

    Args:
        config: what to measure and how to sample.
        weights: the pipeline folder (`weights_path()` when None).
    """
    pipe = load_pipeline(weights)
    res: dict = {"config": asdict(config)}
    # 1. fidelity on fully specified prompts, one seed each
    if config.prompts:
        scenes = sample_scenes(config.prompts, seed=10_000 + config.seed)
        imgs = generate(pipe, [caption(s) for s in scenes], [config.seed * 100_000 + i for i in range(len(scenes))],
                        config.steps, config.guidance, config.batch)
        readings = analyse_batch(imgs)
        res["fidelity"], res["valid"] = fidelity(readings, scenes), float(np.mean([r.valid for r in readings]))
        log(f"fidelity {res['fidelity']} valid {res['valid']:.3f}")
    # 2. diversity of "a shape"
    if config.diversity_images:
        imgs = generate(pipe, ["a shape"] * config.diversity_images, [config.seed * 100_000 + 50_000 + i for i in range(config.diversity_images)],
                        config.steps, config.guidance, config.batch)
        readings = [r for r in analyse_batch(imgs) if r.valid]
        res["diversity"] = {k: factor_entropy([r.factors[k] for r in readings], v) for k, v in FACTORS.items()}
        res["diversity_valid"] = len(readings) / config.diversity_images
        log(f"diversity {res['diversity']} valid {res['diversity_valid']:.3f}")
    # 3. toy CLIP zero-shot accuracy on generator images
    if config.clip_images:

        clip, tok = load_clip(Path(weights) / "clip" if weights is not None else None)
        pool = make_pool(config.clip_images, seed=20_000 + config.seed)
        res["clip_zero_shot"] = zero_shot_accuracy(clip, tok, pool.images, pool.factors)
        log(f"clip zero-shot {res['clip_zero_shot']}")
    # 4. speed: 64 images at 20 steps, with guidance
    if config.speed:
        t0 = time.perf_counter()
        generate(pipe, ["a shape"] * 64, list(range(64)), 20, config.guidance, batch=64)
        res["speed_s"] = time.perf_counter() - t0
        log(f"speed {res['speed_s']:.2f} s for 64 images at 20 steps")
    passes = {}
    if res.get("fidelity"):
        passes["fidelity"] = min(res["fidelity"].values()) >= BARS["fidelity"]
    if res.get("diversity"):
        passes["diversity"] = min(res["diversity"]["colour"], res["diversity"]["shape"]) >= BARS["diversity"]
    if res.get("clip_zero_shot"):
        passes["clip_zero_shot"] = min(res["clip_zero_shot"].values()) >= BARS["clip_zero_shot"]
    if res.get("speed_s") is not None:
        passes["speed"] = res["speed_s"] <= BARS["speed_s"]
    return QualityReport(**res, passes=passes)


def main(argv: list[str] | None = None) -> None:
    """Command line: print the report as JSON on stdout (progress on stderr)."""
    d = sampling_defaults()
    p = argparse.ArgumentParser(prog="python -m conceptkit.toy.quality", description=__doc__)
    p.add_argument("--weights", type=Path, default=weights_path())
    p.add_argument("--prompts", type=int, default=QualityConfig.prompts)
    p.add_argument("--diversity-images", type=int, default=QualityConfig.diversity_images)
    p.add_argument("--steps", type=int, default=d.get("steps", 20))
    p.add_argument("--guidance", type=float, default=d.get("guidance", 3.0))
    p.add_argument("--clip-images", type=int, default=QualityConfig.clip_images)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = QualityConfig(prompts=a.prompts, diversity_images=a.diversity_images, steps=a.steps, guidance=a.guidance,
                           seed=a.seed, clip_images=a.clip_images, speed=not a.no_speed)
    report = asdict(measure(config, a.weights, log=lambda m: print(m, file=sys.stderr, flush=True)))
    provenance = Path(a.weights) / "training.json"  # written by the UNet stage with every export
    if provenance.exists():
        report["training"] = json.loads(provenance.read_text())
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)


if __name__ == "__main__":
    main()
