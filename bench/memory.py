"""Slider training memory: peak memory and step time with and without gradient checkpointing.

Each setting runs in its own process (peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA):
load the model, harvest 2 trajectories, and time 2 training steps of K sliders.

    python bench/memory.py --arch sd15 --size 256 --sliders 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SPEC = {"toy": "toy", "sd15": "random-sd15", "sdxl": "random-sdxl", "flux": "random-flux"}


def child(a) -> dict:
    import torch

    from conceptkit import harvest
    from conceptkit.features import load_encoder
    from conceptkit.models.load import load_model
    from conceptkit.sliders.bank import SliderLoraConfig, install_sliders
    from conceptkit.sliders.train import PairSource, TrainSettings, encode_conditioning, train_step
    from conceptkit.sliders.pipeline import _checkpointing

    os.environ["CONCEPTKIT_HOME"] = tempfile.mkdtemp(prefix="ck-mem-")
    model = load_model(SPEC[a.arch], device=a.device, dtype=a.dtype)
    cuda = model.device.type == "cuda"
    h = harvest.load_harvest(harvest.run(model, harvest.HarvestConfig(prompts=("a cat",), samples=2, steps=a.steps,
                                                              height=a.size, width=a.size)).path)
    g = model.default_guidance
    side = h.final.shape[-2] * model.pipe.vae_scale_factor
    cond = encode_conditioning(model, ["a cat"], g, (side, side))
    enc = load_encoder("pixel", model.spec, device=model.device)
    for part in (model.pipe.vae, model.pipe.text_encoder, getattr(model.pipe, "text_encoder_2", None),
                 getattr(model.pipe, "text_encoder_3", None)):
        if part is not None:
            part.requires_grad_(False)
    from conceptkit.models.flow import denoiser
    from conceptkit.sliders.targets import default_targets

    bank = install_sliders(denoiser(model.pipe), SliderLoraConfig(a.sliders, target_modules=default_targets(model.arch)))
    if a.checkpointing:
        _checkpointing(model, bank, True)
    pairs = PairSource(h.xt, h.timesteps, h.prompt_index, 0.1, 0)
    dirs = torch.nn.functional.normalize(torch.randn(a.sliders, enc.dim), dim=-1)
    settings = TrainSettings(pairs=a.pairs)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(2):
        t0 = time.perf_counter()
        train_step(model, bank, enc, pairs, cond, g, dirs, settings, step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"checkpointing": a.checkpointing, "step_s": round(min(times), 2),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "rss_before_training_gib": round(base_rss, 2)}
    if cuda:
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def measure(arch: str, size: int | None, sliders: int, pairs: int = 1, steps: int = 4, device: str = "auto",
            dtype: str = "auto") -> dict:
    rows = []
    for ckpt in (False, True):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--arch", arch, "--sliders", str(sliders),
               "--pairs", str(pairs), "--steps", str(steps), "--device", device, "--dtype", dtype]
        cmd += (["--size", str(size)] if size else []) + (["--checkpointing"] if ckpt else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return {"bench": "memory", "arch": arch, "size": size or "native", "sliders": sliders, "pairs_per_slider": pairs,
            "settings": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(SPEC), default="toy")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--sliders", type=int, default=4)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
    else:
        print(json.dumps(measure(a.arch, a.size, a.sliders, a.pairs, a.steps, a.device, a.dtype), indent=2))


if __name__ == "__main__":
    main()
