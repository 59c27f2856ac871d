"""How much the slider window matters: our sliders from `start` on vs the exported kohya file from step 0.

    python bench/slider_window.py [--model tiny-sd] [--steps 20] [--start 0.1] [--train-steps 60] [--seeds 16]

Trains a small set (pixel encoder) in a temporary store, exports it in kohya format, and draws the
same seeds four ways per slider and strength: the base model; our sliders (SliderBank, from step
`window_steps(n, start)` on); the exported file through diffusers (`load_lora_weights` +
`set_adapters`) from step 0, as a plain LoRA loader applies it; and the same file switched on at
our first step, as the ComfyUI keyframes and the sd-webui-loractl tag do. Prints one JSON record:
mean absolute pixel difference (images in [0, 1]) of each against ours, and the slider's own
effect (ours vs base).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of harvest and sampling")
    ap.add_argument("--start", type=float, default=0.1, help="slider window start (the training default)")
    ap.add_argument("--count", type=int, default=3, help="sliders")
    ap.add_argument("--samples", type=int, default=8, help="harvested trajectories")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=16, help="seeds drawn per slider and strength")
    ap.add_argument("--strengths", default="1,2")
    args = ap.parse_args(argv)
    import torch

    from conceptkit.diffusion import sample
    from conceptkit.sliders.apply import SliderModification
    from conceptkit.sliders.lora_import import LoraModification, inspect_lora, parse_lora
    from conceptkit.models.load import load_model
    from conceptkit.sliders.sets import export_set
    from conceptkit.diffusion import window_steps
    from conceptkit.sliders.train import TrainSettings
    from conceptkit.sliders.pipeline import SlidersConfig
    from conceptkit.sliders.pipeline import run as train

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CONCEPTKIT_HOME"] = str(Path(tmp) / "home")
        model = load_model(args.model, device="cpu")
        # 1. a set, trained briefly, and its kohya export
        sset = train(model, SlidersConfig("a shape", count=args.count, samples=args.samples, encoder="pixel", steps=args.steps,
                                          train=TrainSettings(steps=args.train_steps, pairs=2, lr=2e-2, start=args.start)))
        files = export_set(sset.name, Path(tmp) / "kohya")
        n, guidance = int(sset.manifest["steps"]), float(sset.manifest["guidance"])
        seeds = list(range(args.seeds))
        base = sample(model, sset.prompt, seeds, n, guidance)
        rows = []
        for info, path in zip(sset.sliders, files):
            checked = inspect_lora(model.pipe, parse_lora(str(path)))
            for strength in (float(s) for s in args.strengths.split(",")):
                # 2. ours: SliderBank routing from the window's first step
                mod = SliderModification(model.pipe.unet, [(sset, info)], cfg_batches=guidance > 1.0)
                try:
                    mod.set_weights({(sset.name, info.index): strength})
                    ours = sample(model, sset.prompt, seeds, n, guidance, [mod])
                finally:
                    mod.remove()
                # 3. the exported file through diffusers, from step 0 and from our first step
                drawn = {}
                for start in (0.0, float(sset.manifest["start"])):
                    lmod = LoraModification(model.pipe, [checked], cfg_batches=guidance > 1.0, start=start)
                    try:
                        lmod.set_weights({0: strength})
                        drawn[start] = sample(model, sset.prompt, seeds, n, guidance, [lmod])
                    finally:
                        lmod.remove()
                step0, windowed = drawn[0.0], drawn[float(sset.manifest["start"])]

                def mad(a: torch.Tensor, b: torch.Tensor) -> float:
                    return float((a - b).abs().mean())

                effect = mad(ours, base)
                rows.append({"slider": info.index, "label": info.label, "strength": strength, "effect": effect,
                             "from_step_0_vs_ours": mad(step0, ours), "windowed_file_vs_ours": mad(windowed, ours),
                             "ratio_step_0": mad(step0, ours) / effect if effect else None,
                             "max_windowed_file_vs_ours": float((windowed - ours).abs().max())})
    record = {"bench": "slider_window", "model": args.model, "steps": n, "start": float(sset.manifest["start"]),
              "first_step": window_steps(n, float(sset.manifest["start"])), "guidance": guidance, "seeds": len(seeds),
              "train_steps": args.train_steps, "metric": "mean |a - b| over pixels, images in [0, 1]",
              "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
