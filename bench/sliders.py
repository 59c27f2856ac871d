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

import torch

PROMPT = "a shape"


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
    model = load(a.model, a.toy_train)
    return {"what": "ratio", "model": a.model, **ratio(model, count=a.count, pairs=a.pairs, repeat=a.repeat,
                                                        encoder=a.encoder or "pixel")}


def ratio(model, *, count: int, pairs: int, repeat: int, encoder: str = "pixel", size: int | None = None,
          samples: int = 8, steps: int | None = None) -> dict:
    """The batched/sequential slider-step timing on a loaded model; images of `size` px (default native)."""
    from conceptkit import harvest
    from conceptkit.features import load_encoder
    from conceptkit.slider_lora import SliderLoraConfig, install_sliders
    from conceptkit.slider_train import (
        PairSource,
        TrainSettings,
        encode_conditioning,
        train_step,
    )

    h = harvest.load(harvest.run(model, harvest.HarvestConfig(prompts=(PROMPT,), samples=samples, steps=steps,
                                                              height=size, width=size)).path)
    g = model.default_guidance
    cond = encode_conditioning(model, [PROMPT], g, (h.final.shape[-2] * model.pipe.vae_scale_factor,) * 2)
    enc = load_encoder(encoder, model.spec, device=model.device)
    model.pipe.vae.requires_grad_(False)
    bank = install_sliders(model.pipe.unet, SliderLoraConfig(count))
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
    """Generate seeds at -s and +s per slider (and per random rank-1 direction); read factors with the toy analyser."""
    from conceptkit.evaluate_sliders import signed_images
    from conceptkit.evaluation import to_uint8
    from conceptkit.slider_sets import load_set
    from conceptkit.toy import factors

    sset = load_set(a.set)
    model = load(sset.manifest["model"]["spec"] if a.model == "toy" else a.model, a.toy_train)
    top = list(sset.sliders[: a.top])
    seeds = list(range(1000, 1000 + a.seeds))
    results = {}
    for kind in ("sliders", "random"):
        log(f"  {kind}: {len(top)} sliders x {len(seeds)} seeds at -{a.strength:g} and +{a.strength:g}")
        minus, plus = signed_images(model, sset, [s.index for s in top], seeds, a.strength, random_directions=kind == "random")
        tab = factors.table([to_uint8(m) for m in minus], [to_uint8(p) for p in plus], [s.index for s in top], [s.label for s in top])
        results[kind] = {"coverage": tab["coverage"], "n_covered": tab["n_covered"], "mean_purity": round(tab["mean_purity"], 3),
                         "valid": round(tab["valid"], 3),
                         "per_slider": [{"index": r["index"], "label": r["label"], "main": r["main"], "purity": round(r["purity"], 3),
                                         "change": {f: round(c, 3) for f, c in r["change"].items()}} for r in tab["per_slider"]]}
        if kind == "sliders":
            results[kind]["labels_right"] = tab["labels_right"]
    log(f"  prompt edits: {len(EDITS)} pairs x {len(seeds)} seeds from step {int(sset.manifest.get('start', 0.1) * 100)}%")
    results["prompt_edits"] = prompt_edits(model, sset, seeds)
    return {"what": "factors", "set": sset.name, "seeds": a.seeds, "strength": a.strength, **results}


# The reference row: what naming a factor in the prompt does to the same seeds. Each pair swaps
# "a shape" for two prompts that name two values of one factor, from the sliders' first step on,
# and is read exactly like a slider at -s and +s: a perfect slider would look like this.
EDITS = (("colour", "red", "blue"), ("shape", "circle", "square"), ("size", "small", "large"), ("horizontal", "left", "right"))


def prompt_edits(model, sset, seeds: list[int]) -> dict:
    """The factor table of the prompt-edit pairs in `EDITS` (same seeds, steps, guidance and window as the set)."""
    from conceptkit.evaluation import to_uint8
    from conceptkit.slider_train import window_steps
    from conceptkit.toy import factors
    from conceptkit.toy.world import prompt

    pipe = model.pipe
    steps, guidance = int(sset.manifest["steps"]), float(sset.manifest["guidance"])
    first = window_steps(steps, float(sset.manifest.get("start", 0.1)))
    base, neg = pipe.encode_prompt([sset.prompt] * len(seeds), model.device, 1, True, None)

    def draw(text: str) -> torch.Tensor:
        edited = pipe.encode_prompt([text] * len(seeds), model.device, 1, False, None)[0]

        def swap(_pipe, i, _t, kw):  # steps before `first` see the set's prompt, the rest the edited one
            return {"prompt_embeds": torch.cat([neg, edited if i + 1 >= first else base])}

        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompt_embeds=base if first > 0 else edited, negative_prompt_embeds=neg, generator=gens,
                    num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images

    minus = [to_uint8(draw(prompt(**{f: lo}))) for f, lo, _ in EDITS]
    plus = [to_uint8(draw(prompt(**{f: hi}))) for f, _, hi in EDITS]
    tab = factors.table(minus, plus, list(range(len(EDITS))), [hi for _, _, hi in EDITS])
    return {"coverage": tab["coverage"], "n_covered": tab["n_covered"], "mean_purity": round(tab["mean_purity"], 3),
            "valid": round(tab["valid"], 3), "labels_right": tab["labels_right"],
            "per_slider": [{"index": r["index"], "label": f"{lo}/{hi}", "main": r["main"], "purity": round(r["purity"], 3),
                            "change": {f: round(c, 3) for f, c in r["change"].items()}} for r, (_, lo, hi) in zip(tab["per_slider"], EDITS)]}


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
