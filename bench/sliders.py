"""SliderSpace acceptance measurements: training time, batched-vs-sequential ratio, factor recovery.

Usage:
  python bench/sliders.py time    [--model toy] [--count 8]          # `conceptkit sliders "a shape" --count 8`, defaults
  python bench/sliders.py ratio   [--model toy] [--count 8] [--pairs 4] [--repeat 3]
  python bench/sliders.py factors --set a-shape [--seeds 32] [--strength 2] [--top 8]   # toy only: the toy analyser
Add --json for one JSON document on stdout. `--model toy-arch` builds the toy's architecture from a
toy training folder (`--toy-train toy-train`: its exported VAE and CLIP, a random UNet) for timings
while the toy UNet is still training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

PROMPT = "a shape"
CORE = ("colour", "shape", "size", "position")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(spec: str, toy_train: Path):
    """A LoadedModel; `toy-arch`: the toy's architecture with its current VAE/CLIP and a random UNet."""
    from conceptkit.models import LoadedModel, load_model

    if spec != "toy-arch":
        return load_model(spec, device="cpu")
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from conceptkit.toy.model import ToyArchitecture, build_scheduler, build_unet

    torch.manual_seed(0)
    clip = toy_train / "export" / "clip"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(toy_train / "export" / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(clip).eval(), tokenizer=CLIPTokenizer.from_pretrained(clip),
        unet=build_unet(ToyArchitecture()).eval(), scheduler=build_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe, "toy-arch", "sd1", "folder", "0" * 64, torch.device("cpu"), torch.float32, 20, 3.0)


def cmd_time(a) -> dict:
    """The whole `conceptkit sliders "a shape" --count K` with default settings, timed."""
    from conceptkit.sliders import SlidersConfig, run

    model = load(a.model, a.toy_train)
    enc = a.encoder or ("toy" if a.model == "toy" else f"toy:{a.toy_train / 'export' / 'clip'}" if a.model == "toy-arch" else "auto")
    cfg = SlidersConfig(PROMPT, count=a.count, encoder=enc, name=f"bench-{a.model}-{a.count}", overwrite=True)
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total, **f):
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            log(f"  step {done}/{total} loss {f.get('loss', float('nan')):.4f} {time.perf_counter() - t0:.0f}s")

    sset = run(model, cfg, progress=progress, stage=log)
    seconds = time.perf_counter() - t0
    return {"what": "time", "model": a.model, "count": a.count, "seconds": round(seconds, 1), "encoder": enc,
            "set": sset.name, "settings": sset.manifest["settings"],
            "sliders": [{"index": s.index, "label": s.label, "ev": round(s.explained_variance, 4),
                         "effect": round(s.effect_size, 4), "alignment": round(s.alignment, 3)} for s in sset.sliders]}


def cmd_ratio(a) -> dict:
    """Seconds per slider-step: one batched step over K sliders vs K steps of one slider, same pairs per slider."""
    from conceptkit import harvest
    from conceptkit.features import load_encoder
    from conceptkit.slider_lora import SliderLoraConfig, install_sliders
    from conceptkit.slider_train import (
        PairSource,
        TrainSettings,
        encode_conditioning,
        train_step,
    )

    model = load(a.model, a.toy_train)
    h = harvest.load(harvest.run(model, harvest.HarvestConfig(prompts=(PROMPT,), samples=8)).path)
    g = model.default_guidance
    cond = encode_conditioning(model, [PROMPT], g, (h.final.shape[-2] * model.pipe.vae_scale_factor,) * 2)
    enc = load_encoder(a.encoder or "pixel", model.spec)
    model.pipe.vae.requires_grad_(False)
    bank = install_sliders(model.pipe.unet, SliderLoraConfig(a.count))
    pairs = PairSource(h.xt, h.timesteps, h.prompt_index, 0.1, 0)
    settings = TrainSettings(pairs=a.pairs)
    dirs = torch.nn.functional.normalize(torch.randn(a.count, enc.dim), dim=-1)

    def batched(step):
        train_step(model, bank, enc, pairs, cond, g, dirs, settings, step)

    def sequential(step):
        for k in range(a.count):
            train_step(model, bank, enc, pairs, cond, g, dirs, settings, step, sliders=torch.tensor([k]))

    out = {}
    for name, fn in (("batched", batched), ("sequential", sequential)):
        fn(0)  # warm-up
        best = float("inf")
        for r in range(a.repeat):
            t0 = time.perf_counter()
            fn(r + 1)
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    bank.remove()
    return {"what": "ratio", "model": a.model, "count": a.count, "pairs_per_slider": a.pairs,
            "batched_s_per_step": round(out["batched"], 3), "sequential_s_per_step": round(out["sequential"], 3),
            "ratio": round(out["sequential"] / out["batched"], 2)}


class _BankMod:
    """A bank with dense weights from the set's start step on (generate.Modification)."""

    def __init__(self, bank, start_step):
        self.bank, self.start, self.w = bank, start_step, None

    def set_step(self, i, n):
        self.bank.set_dense_routing(self.w if i >= self.start else None)

    def remove(self):
        self.bank.remove()

    def describe(self):
        return {}


def cmd_factors(a) -> dict:
    """Generate seeds at -s and +s per slider (and per random rank-1 direction); read factors with the toy analyser."""
    from conceptkit.generate import sample
    from conceptkit.slider_labels import factor_recovery
    from conceptkit.slider_lora import SliderLoraConfig, install_sliders
    from conceptkit.slider_sets import load_set
    from conceptkit.slider_train import window_steps
    from conceptkit.toy import FACTORS, analyse_batch

    sset = load_set(a.set)
    model = load(sset.manifest["model"]["spec"] if a.model == "toy" else a.model, a.toy_train)
    top = list(sset.sliders[: a.top])
    groups = {"colour": ("colour",), "shape": ("shape",), "size": ("size",), "position": ("horizontal", "vertical"),
              "background": ("background",)}
    word_factor = {v: ("position" if f in ("horizontal", "vertical") else f) for f, vs in FACTORS.items() for v in vs}
    steps, g = int(sset.manifest["steps"]), float(sset.manifest["guidance"])
    seeds = list(range(1000, 1000 + a.seeds))
    st = sset.manifest["settings"]
    results = {}
    for kind in ("sliders", "random"):
        bank = install_sliders(model.pipe.unet, SliderLoraConfig(len(top), rank=st["rank"], alpha=st["alpha"], target_modules=st["targets"]))
        for k, s in enumerate(top):
            bank.load_slider(k, sset.path / s.file)
        if kind == "random":
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in bank.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * p.norm(dim=(1, 2), keepdim=True) / p[0].numel() ** 0.5)
        mod = _BankMod(bank, window_steps(steps, float(sset.manifest["start"])))
        readings = {}
        for sign in (-1, 1):
            per = []
            for k in range(len(top)):
                w = torch.zeros(len(top))
                w[k] = sign * a.strength
                mod.w = w
                log(f"  {kind}: slider {k} at {sign * a.strength:+g}")
                imgs = sample(model, sset.prompt, seeds, steps, g, [mod])
                arr = (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                per.append([r.factors if r.valid else None for r in analyse_batch(arr)])
            readings[sign] = per
        mod.remove()
        rec = factor_recovery(readings[-1], readings[1], groups)
        covered = sorted({m for m in rec.main if m in CORE})
        results[kind] = {"coverage": covered, "n_covered": len(covered), "mean_purity": round(float(rec.purity.mean()), 3),
                         "valid": round(float(rec.valid.mean()), 3),
                         "per_slider": [{"index": s.index, "label": s.label, "main": rec.main[k], "purity": round(float(rec.purity[k]), 3),
                                         "change": dict(zip(rec.factors, np.round(rec.change[k], 3).tolist()))}
                                        for k, s in enumerate(top)]}
        if kind == "sliders":
            ok = [word_factor.get(s.label.rsplit("-", 1)[0] if s.label not in word_factor else s.label) == rec.main[k] for k, s in enumerate(top)]
            results[kind]["labels_right"] = int(sum(ok))
    return {"what": "factors", "set": sset.name, "seeds": a.seeds, "strength": a.strength, **results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("time", "ratio", "factors"))
    p.add_argument("--model", default="toy")
    p.add_argument("--toy-train", type=Path, default=Path("toy-train"))
    p.add_argument("--encoder", default=None)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--set", default="a-shape")
    p.add_argument("--seeds", type=int, default=32)
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    doc = {"time": cmd_time, "ratio": cmd_ratio, "factors": cmd_factors}[a.what](a)
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        log(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
