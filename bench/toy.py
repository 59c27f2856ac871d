"""Speed of the toy model: 64 images at 20 DDIM steps with classifier-free guidance.

Usage: python bench/toy.py [--weights DIR] [--threads N] [--repeat R] [--json]
The bar is 15 s on 2 CPU cores. The first call (warm-up) is reported apart from the timed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from conceptkit.toy import SAMPLING_DEFAULTS, load_pipeline, weights_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=str(weights_path()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=SAMPLING_DEFAULTS["guidance"])
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.weights)
    prompts = ["a shape"] * a.images

    def once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(prompts, num_inference_steps=a.steps, guidance_scale=a.guidance, generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - t0

    warm = once()
    times = [once() for _ in range(a.repeat)]
    result = {"images": a.images, "steps": a.steps, "guidance": a.guidance, "threads": a.threads, "warmup_s": round(warm, 3),
              "seconds": [round(t, 3) for t in times], "best_s": round(min(times), 3), "bar_s": 15.0, "passes": min(times) <= 15.0,
              "load_avg": os.getloadavg()[0]}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"64 images x {a.steps} steps: best {min(times):.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}; warm-up {warm:.2f} s; "
              f"{a.threads} threads; load average {result['load_avg']:.1f}) -> {'PASS' if result['passes'] else 'FAIL'} (bar 15 s)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
