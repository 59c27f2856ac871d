"""Harvest overhead: conceptkit's recording harvest against the plain diffusers pipeline.

Both produce the same latents for the same seeds; the plain pipeline keeps only the final
latent, the harvest also records x_t and x0 of every step and writes shards to the store.
The ratio (ours / plain) is measured in one run, alternating the two, median of repeats.

    python bench/harvest.py --model toy --samples 32 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def measure(model, *, prompt: str, samples: int, steps: int, batch_size: int, guidance: float | None = None,
            repeats: int = 3, height: int | None = None, width: int | None = None) -> dict:
    """Median seconds of the plain pipeline and of our harvest for the same latents, and their ratio."""
    from conceptkit import harvest

    from conceptkit.diffusion_flow import unpack
    from conceptkit.models.flow import native_size, pipeline_kwargs

    guidance = model.default_guidance if guidance is None else guidance
    size = {"height": height, "width": width} if height else {}
    size.update(pipeline_kwargs(model.pipe))  # the T5 length a flow pipeline is called with, as the harvest does

    def plain() -> torch.Tensor:
        out = []
        for start in range(0, samples, batch_size):
            idx = range(start, min(start + batch_size, samples))
            gens = [torch.Generator(model.device).manual_seed(i) for i in idx]
            with torch.inference_mode():
                out.append(model.pipe([prompt] * len(idx), num_inference_steps=steps, guidance_scale=guidance,
                                      generator=gens, output_type="latent", **size).images)
        side = height or native_size(model.pipe)
        return unpack(model.pipe, torch.cat(out), side, width or side)  # FLUX: packed tokens on the latent grid

    def ours(rep: int) -> Path:
        cfg = harvest.HarvestConfig(prompts=(prompt,), samples=samples, steps=steps, guidance=guidance,
                                    batch_size=batch_size, seed=0, negative_prompt="", store_dtype="float32",
                                    height=height, width=width)
        os.environ["CONCEPTKIT_HOME"] = tempfile.mkdtemp(prefix=f"ck-bench-{rep}-")  # never a cache hit
        return harvest.run(model, cfg).path  # read back after the clock stops: the artifact is the product

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    plain()  # warm-up
    times = {"plain": [], "ours": []}
    same = True
    def timed(name, fn, *args):
        sync()
        t = time.perf_counter()
        result = fn(*args)
        sync()
        times[name].append(time.perf_counter() - t)
        return result

    for rep in range(repeats):
        a = timed("plain", plain)
        b = timed("ours", ours, rep)
        same = same and torch.allclose(a.float().cpu(), harvest.load_harvest(b, names=()).final.float(), atol=1e-5)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bench": "harvest",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "device": str(model.device) + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else ""),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "model": model.spec,
        "samples": samples,
        "steps": steps,
        "batch_size": batch_size,
        "size": height or "native",
        "plain_s": round(med["plain"], 3),
        "ours_s": round(med["ours"], 3),
        "ratio": round(med["ours"] / med["plain"], 3),
        "same_latents": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels; default: the model's native size")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    os.environ["CONCEPTKIT_HOME"] = tempfile.mkdtemp(prefix="ck-bench-")
    from conceptkit.models.load import load_model

    model = load_model(args.model, device=args.device)
    prompt = "a shape" if args.model == "toy" else "a cat"
    record = measure(model, prompt=prompt, samples=args.samples, steps=args.steps, batch_size=args.batch_size,
                     guidance=args.guidance, repeats=args.repeats, height=args.size, width=args.size)
    print(json.dumps(record))
    if args.json_out:
        args.json_out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
