"""One entry point for the benchmarks, at toy size or at full SD 1.5 / SDXL size with random weights
(FLUX.1: its full depth at a reduced width, `random-flux`).

    python -m bench all --arch toy|sd15|sdxl|flux [--device auto|cpu|cuda] [--dtype auto|float16|bfloat16]
    python -m bench harvest|sliders|cluster|memory --arch sd15 --size 256

Each benchmark prints its JSON record; with `--record` it also writes it to
bench/results/DATE-BENCH-ARCH-DEVICE.json and appends one line to the "Records" table of
docs/benchmarks.md (machine, device, date, numbers).
On a CPU the full-size architectures run at a reduced image size and few samples (the defaults
below say which); the ratios are what to compare, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"toy": "toy", "sd15": "random-sd15", "sdxl": "random-sdxl", "flux": "random-flux"}
# (image side, samples, steps, batch, sliders K, pairs per slider) per (arch, device kind);
# None: the model's native size.
DEFAULTS = {
    ("toy", "cpu"): (None, 64, 20, 32, 8, 2), ("toy", "cuda"): (None, 256, 20, 128, 32, 4),
    ("sd15", "cpu"): (128, 2, 4, 2, 2, 1), ("sd15", "cuda"): (None, 16, 30, 8, 8, 2),
    ("sdxl", "cpu"): (64, 1, 2, 1, 2, 1), ("sdxl", "cuda"): (None, 8, 30, 4, 8, 1),
    ("flux", "cpu"): (32, 2, 4, 2, 2, 1), ("flux", "cuda"): (256, 8, 28, 4, 8, 1),
}
RECORDS_HEADER = "## Records (`python -m bench`)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _machine() -> dict:
    import torch

    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _summary(rec: dict) -> str:
    if rec["bench"] == "harvest":
        return (f"{rec['samples']} x {rec['steps']} steps at {rec['size']} px: plain {rec['plain_s']} s, ours "
                f"{rec['ours_s']} s, ratio {rec['ratio']} (same latents: {'yes' if rec['same_latents'] else 'NO'})")
    if rec["bench"] == "sliders":
        mem = f", peak {rec['peak_gib']} GiB" if "peak_gib" in rec else ""
        return (f"K={rec['count']}, {rec['pairs_per_slider']} pairs/slider at {rec['size']} px: batched "
                f"{rec['batched_s_per_step']} s/step, one at a time {rec['sequential_s_per_step']} s/step, "
                f"ratio {rec['ratio']}x{mem}")
    if rec["bench"] == "memory":
        key = "peak_cuda_gib" if "peak_cuda_gib" in rec["settings"][0] else "peak_rss_gib"
        off, on = rec["settings"]
        return (f"K={rec['sliders']}, {rec['pairs_per_slider']} pairs/slider at {rec['size']} px, peak "
                f"{'CUDA' if key == 'peak_cuda_gib' else 'RSS'}: {off[key]} GiB, with gradient checkpointing "
                f"{on[key]} GiB (before training {off['rss_before_training_gib']} GiB); step {off['step_s']} s vs {on['step_s']} s")
    big = rec["sizes"][-1]
    return (f"{rec['items']:,} neuron-timestep items; PCA+FCM of {big['kept']:,} kept maps ({rec['map_side']}^2 px): "
            f"{big['pca_s'] + big['fcm_s']:.2f} s; cost grows as n^{rec['growth_exponent']}")


def record(rec: dict, device: str) -> None:
    """Write the JSON record and append its line to docs/benchmarks.md."""
    rec = {**rec, **_machine()}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{rec['date']}-{rec['bench']}-{rec['arch']}-{device}.json").write_text(json.dumps(rec, indent=2) + "\n")
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    if RECORDS_HEADER not in text:
        text = text.rstrip("\n") + (f"\n\n{RECORDS_HEADER}\nOne line per run, appended by the entry point; JSON in "
                                    "bench/results/.\n\n| date | machine | device | arch | bench | result |\n"
                                    "|---|---|---|---|---|---|\n")
    line = (f"| {rec['date']} | {rec['machine']}, torch {rec['torch']}, {rec['threads']} threads | {rec.get('device', device)} "
            f"| {rec['arch']} | {rec['bench']} | {_summary(rec)} |\n")
    doc.write_text(text + line)
    print(json.dumps(rec))
    log(line.strip())


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("all", "harvest", "sliders", "cluster", "memory"))
    p.add_argument("--arch", choices=sorted(SPEC), default="toy")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: per arch and device)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sliders", type=int, default=None, help="K sliders of the batched/sequential ratio")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--record", action="store_true",
                   help="also write bench/results/*.json and append a line to docs/benchmarks.md (default: print only)")
    a = p.parse_args()

    import torch

    from conceptkit.models.load import load_model, resolve_device

    kind = resolve_device(a.device).type
    size, samples, steps, batch, k, pairs = DEFAULTS[(a.arch, "cuda" if kind == "cuda" else "cpu")]
    size, samples, steps, k = a.size or size, a.samples or samples, a.steps or steps, a.sliders or k
    os.environ["CONCEPTKIT_HOME"] = tempfile.mkdtemp(prefix="ck-bench-")
    emit = (lambda rec: record(rec, kind)) if a.record else (lambda rec: print(json.dumps(rec)))
    todo = ("harvest", "sliders", "cluster", "memory") if a.what == "all" else (a.what,)
    device = str(kind) + (f" ({torch.cuda.get_device_name()})" if kind == "cuda" else "")
    if "memory" in todo:  # first: each setting loads its own copy in a fresh process, before this one holds one
        from bench import memory

        emit({**memory.measure(a.arch, size, k, pairs, steps, a.device, a.dtype), "device": device})
    model = None
    if "harvest" in todo or "sliders" in todo:
        t0 = time.perf_counter()
        model = load_model(SPEC[a.arch], device=a.device, dtype=a.dtype)
        log(f"loaded {model.spec} on {model.device} ({model.dtype}) in {time.perf_counter() - t0:.1f} s")
    if "harvest" in todo:
        from bench import harvest as hb

        prompt = "a shape" if a.arch == "toy" else "a cat"
        rec = hb.measure(model, prompt=prompt, samples=samples, steps=steps, batch_size=min(batch, samples),
                         repeats=a.repeats, height=size, width=size)
        emit({**rec, "arch": a.arch, "device": device})
    if "sliders" in todo:
        from bench import sliders as sb

        rec = sb.ratio(model, count=k, pairs=pairs, repeat=a.repeats, encoder="pixel", size=size,
                       samples=max(2, samples), steps=steps)
        emit({"bench": "sliders", "arch": a.arch, "device": device, "dtype": str(model.dtype).removeprefix("torch."), **rec})
    if "cluster" in todo:
        from bench import fcm

        sizes = [500, 2000, 8000] + ([32000] if a.arch != "toy" else [])
        emit({**fcm.measure(a.arch, sizes), "device": "cpu (numpy)"})


if __name__ == "__main__":
    main()
