"""SliderSpace acceptance measurements: training time, batched-vs-sequential ratio, factor recovery.

Usage:
  python bench/sliders.py time    [--model toy] [--count 8]          # `conceptkit sliders "a shape" --count 8`, defaults
  python bench/sliders.py ratio   [--model toy] [--count 8] [--pairs 4] [--repeat 3]
  python bench/sliders.py factors --set a-shape [--seeds 64] [--seed 0] [--strength 2] [--top 8] [--out DIR]   # toy only
  python bench/sliders.py stages  --set a-shape [--images DIR/factors-a-shape-0-64.npz]   # toy only: bench/stages.py
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

import torch

from conceptkit.toy.edits import EDITS  # the prompt-edit reference row

PROMPT = "a shape"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(spec: str, toy_train: Path):
    """A LoadedModel; `toy-arch`: the toy's architecture with its current VAE/CLIP and a random UNet."""
    from conceptkit.models.load import LoadedModel, load_model

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
    from conceptkit.sliders.pipeline import SlidersConfig, run

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
    model = load(a.model, a.toy_train)
    return {"what": "ratio", "model": a.model, **ratio(model, count=a.count, pairs=a.pairs, repeat=a.repeat,
                                                        encoder=a.encoder or "pixel")}


def ratio(model, *, count: int, pairs: int, repeat: int, encoder: str = "pixel", size: int | None = None,
          samples: int = 8, steps: int | None = None) -> dict:
    """The batched/sequential slider-step timing on a loaded model; images of `size` px (default native)."""
    from conceptkit import harvest
    from conceptkit.features import load_encoder
    from conceptkit.sliders.bank import SliderLoraConfig, install_sliders
    from conceptkit.sliders.train import (
        PairSource,
        TrainSettings,
        encode_conditioning,
        train_step,
    )

    h = harvest.load_harvest(harvest.run(model, harvest.HarvestConfig(prompts=(PROMPT,), samples=samples, steps=steps,
                                                              height=size, width=size)).path)
    g = model.default_guidance
    cond = encode_conditioning(model, [PROMPT], g, (h.final.shape[-2] * model.pipe.vae_scale_factor,) * 2)
    enc = load_encoder(encoder, model.spec, device=model.device)
    model.pipe.vae.requires_grad_(False)
    from conceptkit.models.flow import denoiser
    from conceptkit.sliders.targets import default_targets

    bank = install_sliders(denoiser(model.pipe), SliderLoraConfig(count, target_modules=default_targets(model.arch)))
    pair_source = PairSource(h.xt, h.timesteps, h.prompt_index, 0.1, 0)
    settings = TrainSettings(pairs=pairs)
    dirs = torch.nn.functional.normalize(torch.randn(count, enc.dim), dim=-1)
    cuda = model.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def batched(step):
        train_step(model, bank, enc, pair_source, cond, g, dirs, settings, step)

    def sequential(step):
        for k in range(count):
            train_step(model, bank, enc, pair_source, cond, g, dirs, settings, step, sliders=torch.tensor([k]))

    out, peak = {"batched": float("inf"), "sequential": float("inf")}, {}
    batched(0)  # warm-up
    sequential(0)
    for r in range(repeat):  # alternate, so a load change on a shared machine hits both sides
        for name, fn in (("batched", batched), ("sequential", sequential)):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            fn(r + 1)
            sync()
            out[name] = min(out[name], time.perf_counter() - t0)
            if cuda:
                peak[name] = max(peak.get(name, 0.0), round(torch.cuda.max_memory_allocated() / 2**30, 2))
    bank.remove()
    return {"count": count, "pairs_per_slider": pairs, "encoder": encoder, "size": size or "native",
            "batched_s_per_step": round(out["batched"], 3), "sequential_s_per_step": round(out["sequential"], 3),
            "ratio": round(out["sequential"] / out["batched"], 2), **({"peak_gib": peak} if peak else {})}


def cmd_factors(a) -> dict:
    """The toy's three-row factor table (sliders, random rank-1 directions, prompt edits) on the same seeds."""
    import numpy as np

    from conceptkit.sliders.sets import load_set
    from conceptkit.evaluate import toy_factors as slider_factors

    sset = load_set(a.set)
    model = load(sset.manifest["model"]["spec"] if a.model == "toy" else a.model, a.toy_train)
    top = list(sset.sliders[: a.top])
    seeds = list(range(a.seed, a.seed + a.seeds))
    base_seeds = list(range(a.seed, a.seed + 2 * a.seeds))
    log(f"  {len(top)} sliders and {len(top)} random directions x {len(seeds)} seeds at -{a.strength:g} and +{a.strength:g}, "
        f"{len(EDITS)} prompt edits, {len(base_seeds)} base seeds for the noise floor")
    images = slider_factors.draw(model, sset, [s.index for s in top], seeds, a.strength, base_seeds)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(a.out / f"factors-{sset.name}-{a.seed}-{a.seeds}.npz", **images.arrays())
    tab = slider_factors.table(images, [s.index for s in top], [s.label for s in top], seed=a.seed)
    render_table(tab)
    return {"what": "factors", "set": sset.name, "seeds": a.seeds, "seed": a.seed, "strength": a.strength,
            "settings": sset.manifest["settings"], **tab}


def cmd_stages(a) -> dict:
    """Where the set loses purity: PCA, training and images, each against its ceiling (bench/stages.py)."""
    if __package__ in (None, ""):  # run as `python bench/sliders.py`: bench/ itself is on the path, not its parent
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import stages

    return stages.run(a)


def render_table(tab: dict) -> None:
    """The three rows on stderr, each purity beside its effect size."""
    log(f"  noise floor (TV between two {tab['seeds']}-seed halves of {tab['base_seeds']} base seeds): "
        + ", ".join(f"{g} {v:.3f}" for g, v in tab["floor"].items()))
    log("  row            | per-seed purity (change) | distribution purity (effect, above floor) | strong | consistency | covered | labels")
    for name, row in tab["rows"].items():
        s = row["summary"]
        dp = "-" if s["distribution_purity"] is None else f"{s['distribution_purity']:.3f}"
        log(f"  {name:<14} | {s['per_seed_purity']:.3f} ({s['per_seed_change']:.2f})           | {dp} ({s['main_effect']:.3f}, "
            f"{s['n_above_floor']}/{s['count']})                   | {s['n_strong']}/{s['count']}    | {s['consistency']:.3f}       | "
            f"{s['coverage']}/4     | {s['labels_right']}/{s['count']}")
    for name, row in tab["rows"].items():
        for r, p in zip(row["distribution"]["per_slider"], row["per_seed"]["per_slider"]):
            dp = "-" if r["distribution_purity"] is None else f"{r['distribution_purity']:.2f}"
            log(f"    {name:<12} {r['label']:<14} main {str(r['main']):<10} purity {dp:>4} effect {r['main_effect']:.2f} "
                f"toward {r['toward']:.2f} ({r['plus_value']}) | TV " + " ".join(f"{g[:3]} {v if v is None else round(v, 2)}" for g, v in r["tv"].items())
                + f" | per-seed {p['main']} {p['purity']:.2f}")


def prompt_edits(model, sset, seeds: list[int]) -> dict:
    """The per-seed factor table of the prompt-edit pairs in `EDITS` (same seeds, steps, guidance and window as the set)."""
    from conceptkit.evaluate.common import to_uint8
    from conceptkit.toy import factors
    from conceptkit.toy.edits import edit_images, edit_labels

    minus, plus = edit_images(model, sset, seeds)
    tab = factors.table([to_uint8(m) for m in minus], [to_uint8(p) for p in plus], list(range(len(EDITS))), edit_labels())
    return {"coverage": tab["coverage"], "n_covered": tab["n_covered"], "mean_purity": round(tab["mean_purity"], 3),
            "valid": round(tab["valid"], 3), "labels_right": tab["labels_right"],
            "per_slider": [{"index": r["index"], "label": r["label"], "main": r["main"], "purity": round(r["purity"], 3),
                            "change": {f: round(c, 3) for f, c in r["change"].items()}} for r in tab["per_slider"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("time", "ratio", "factors", "stages"))
    p.add_argument("--model", default="toy")
    p.add_argument("--toy-train", type=Path, default=Path("toy-train"))
    p.add_argument("--encoder", default=None)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--set", default="a-shape")
    p.add_argument("--seeds", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="first seed of the factor table (as `evaluate sliders --seed`)")
    p.add_argument("--out", type=Path, default=None, help="factors: also write the images (.npz) to this folder")
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--scenes", type=int, default=4000, help="stages: rendered world scenes behind the factor subspaces")
    p.add_argument("--images", type=Path, default=None, help="stages: a `factors --out` .npz (the image-shift stage)")
    p.add_argument("--pca-samples", default="16,64,256", help="stages: harvest sizes of the PCA variants, comma-separated")
    p.add_argument("--sweep", action="store_true", help="stages: also retrain the set with one training setting changed at a time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.seeds < 2 or a.top < 1 or not a.strength > 0 or a.scenes < 100:
        p.error(f"--seeds must be at least 2, --top at least 1, --strength positive and --scenes at least 100 "
                f"(got {a.seeds}, {a.top}, {a.strength}, {a.scenes})")
    torch.set_num_threads(a.threads)
    doc = {"time": cmd_time, "ratio": cmd_ratio, "factors": cmd_factors, "stages": cmd_stages}[a.what](a)
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        log(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
