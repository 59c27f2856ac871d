"""`conceptkit harvest`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.cli.common import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    OffloadOpt,
    JsonOpt,
    ModelOpt,
    open_model,
    app,
    command,
)
from conceptkit.errors import UsageError
from conceptkit.prompts import expand_templates, read_prompts_file


def _read_prompts(prompt: str | None, prompts_file: Path | None, templates: bool) -> tuple[str, ...]:
    prompts: list[str] = []
    if prompt is not None:
        prompts.append(prompt)
    if prompts_file is not None:
        prompts.extend(read_prompts_file(prompts_file))
    if not prompts:
        raise UsageError("give a PROMPT or --prompts-file")
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt: give the concept as text, e.g. 'a person'")
    if templates:
        prompts = expand_templates(prompts)
    return tuple(prompts)


@app.command()
@command
def harvest(
    prompt: Annotated[Optional[str], typer.Argument(help="The concept prompt, e.g. 'a person'.", show_default=False)] = None,
    model: ModelOpt = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Trajectories (seeds seed, seed+1, ...).")] = 8,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps. Default: the model's.", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale. Default: the model's.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first trajectory.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Trajectories per sampler call.")] = 8,
    prompts_file: Annotated[Optional[Path], typer.Option(help="One prompt per line (cycled over trajectories).", show_default=False)] = None,
    templates: Annotated[bool, typer.Option(help="Expand each prompt into built-in context templates ('a photo of {}', ...).")] = False,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt for guidance.")] = "",
    record: Annotated[str, typer.Option(help="Per-step tensors to keep: x0, xt or x0,xt.")] = "x0,xt",
    keep_every: Annotated[int, typer.Option(help="Keep every k-th step (the last is always kept).")] = 1,
    store_dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32 on disk.")] = "float16",
    height: Annotated[Optional[int], typer.Option(help="Image height. Default: the model's.", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width. Default: the model's.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    config: ConfigOpt = None,
    save_images: Annotated[Optional[Path], typer.Option(help="Also decode the final images and write them as PNGs here.", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Sample a concept and record every step's predicted clean latent (x0). Cached and resumable."""
    from conceptkit import harvest as stage  # deferred: --help loads no torch
    from conceptkit.parallel import processes  # deferred: --help loads no torch

    cfg = stage.HarvestConfig(
        prompts=_read_prompts(prompt, prompts_file, templates),
        samples=samples,
        steps=steps,
        guidance=guidance,
        seed=seed,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        record=tuple(r.strip() for r in record.split(",") if r.strip()),
        keep_every=keep_every,
        store_dtype=store_dtype,
        batch_size=batch_size,
    )
    proc, world = processes()
    if world > 1 and device == "auto":  # under `accelerate launch`: this process's own device
        from accelerate import PartialState

        device = str(PartialState().device)
    loaded = open_model(model, device, dtype, config, flow=True, offload=offload)
    with ui.progress("harvest", unit="samples", enabled=proc == 0 and (not json_out or sys.stderr.isatty())) as bar:
        result = stage.run(loaded, cfg, progress=bar, on_wait=ui.info)
    if proc != 0:  # one report per launch, from the main process
        return
    m = result.manifest
    images = _save_images(loaded, result.path, save_images, cfg.samples) if save_images else []
    out = {
        "key": result.key,
        "path": str(result.path),
        "model": m["model"],
        "prompts": m["prompts"],
        "samples": cfg.samples,
        "available": m["samples"],
        "steps": m["steps"],
        "timesteps": m["timesteps"],
        "record": m["record"],
        "cached": result.cached,
        "computed": result.computed,
        "bytes": m["bytes"],
        "seconds": round(result.seconds, 3),
        "images": [str(p) for p in images],
    }
    if json_out:
        ui.print_json(out)
        return
    ui.table(
        "harvest",
        ["model", "prompt", "samples", "steps", "size on disk", "seconds", "cached"],
        [(m["model"]["spec"], m["prompts"][0] + (f" (+{len(m['prompts']) - 1})" if len(m["prompts"]) > 1 else ""), cfg.samples, m["steps"], ui.human_size(m["bytes"]), f"{result.seconds:.1f}", "yes" if result.cached else "no")],
    )
    ui.info(f"key {result.key}  {result.path}")


def _save_images(model, path: Path, out_dir: Path, samples: int) -> list[Path]:
    """Decode the first `samples` final latents of a harvest and write them as PNGs in `out_dir`."""
    import json

    from PIL import Image, PngImagePlugin

    from conceptkit import harvest, store  # deferred: --help loads no torch
    from conceptkit.diffusion import decode_batched  # deferred: --help loads no torch

    h = harvest.load_harvest(path, samples=samples, names=())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write images to {out_dir}: {exc.strerror or exc}") from exc
    images = decode_batched(model, h.final.float())
    files = []
    for img, seed, p in zip(images, h.seeds.tolist(), h.prompt_index.tolist()):
        info = PngImagePlugin.PngInfo()
        info.add_text("conceptkit", json.dumps({"prompt": h.manifest["prompts"][p], "seed": seed, "model": h.manifest["model"], "harvest": path.name}))
        file = out_dir / f"{path.name}-{seed:06d}.png"
        array = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        with store.atomic_path(file) as tmp:
            Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)
        files.append(file)
    return files
