"""`conceptkit generate PROMPT`: images with sliders or Picasso sub-concepts applied, settings in every PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.errors import UsageError
from conceptkit.cli.common import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    OffloadOpt,
    JsonOpt,
    ModelOpt,
    app,
    command,
    open_model,
)


@app.command()
@command
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw, e.g. 'a dog'.", show_default=False)],
    model: ModelOpt = None,
    slider: Annotated[Optional[list[str]], typer.Option("--slider", "-s", help="[SET/]LABEL_OR_INDEX=SCALE, repeatable; sliders add up. Without SET: the set trained for this prompt and model. Sets are calibrated so that +-2 is a visible change (docs/sliders.md).", show_default=False)] = None,
    random_sliders: Annotated[int, typer.Option("--random-sliders", help="Each image gets N random sliders at random strengths (recorded in the PNG).")] = 0,
    random_scale: Annotated[float, typer.Option("--random-scale", help="Random strengths are uniform in [-x, x].")] = 2.0,
    slider_set: Annotated[Optional[str], typer.Option("--set", help="The set --random-sliders draws from. Default: the prompt's set.", show_default=False)] = None,
    sweep: Annotated[Optional[str], typer.Option(help="[SET/]LABEL=LO:HI:N: one grid, strengths in columns, seeds in rows.", show_default=False)] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Images (seeds seed, seed+1, ...); rows of a sweep.")] = 4,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps. Default: the model's.", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale. Default: the model's.", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("conceptkit-images"),
    subconcept: Annotated[Optional[list[str]], typer.Option("--subconcept", help="KEY:C[:MODE[:SCALE]], repeatable: sub-concept C of cluster KEY (from `conceptkit cluster`). MODE: only (close every other sub-concept's neurons; the default), close (close C's neurons) or scale (multiply them by SCALE), each in the timestep groups where they are concept neurons.", show_default=False)] = None,
    subconcept_grid: Annotated[Optional[str], typer.Option("--subconcept-grid", help="KEY[:MODE]: one grid PNG, the unmodified images in the first row, then one row per sub-concept of cluster KEY; a column per seed (--count).", show_default=False)] = None,
    lora: Annotated[Optional[list[str]], typer.Option("--lora", help="FILE[:SCALE], repeatable: a kohya or diffusers/peft SD/SDXL/FLUX/SD3 LoRA (.safetensors; Concept Sliders', ai-toolkit's, kohya's) applied from the first step at SCALE (default 1), next to --slider.", show_default=False)] = None,
    embedding: Annotated[Optional[Path], typer.Option(help="A learned textual-inversion embedding (.safetensors) for --token.", show_default=False)] = None,
    token: Annotated[Optional[str], typer.Option(help="The new word the prompt uses for --embedding, e.g. '<my-dog>'.", show_default=False)] = None,
    force: Annotated[bool, typer.Option(help="Apply sliders trained for another base model (same architecture), with a warning.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per sampler call.")] = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    offload: OffloadOpt = "none",
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Draw images, optionally with sliders added or sub-concepts edited; every PNG carries its full settings."""
    from conceptkit.models import textual_inversion  # deferred: --help loads no torch
    from conceptkit.generate import GenerateConfig, run  # deferred: --help loads no torch

    cfg = GenerateConfig(prompt=prompt, count=count, seed=seed, steps=steps, guidance=guidance, out=out,
                         sliders=tuple(slider or ()), random_sliders=random_sliders, random_scale=random_scale,
                         slider_set=slider_set, sweep=sweep, force=force, batch_size=batch_size,
                         subconcepts=tuple(subconcept or ()), subconcept_grid=subconcept_grid, loras=tuple(lora or ()))
    textual_inversion.check_token(token, embedding)
    if embedding is not None:
        textual_inversion.check_in_prompts(token, [prompt])
    if offload.strip().lower() == "sequential" and embedding is not None:  # docs/models.md, "Memory"
        raise UsageError("--offload sequential does not work with --embedding: the learned word resizes the text "
                         "encoder's embedding table, which sequential offload keeps on the meta device; use --offload model")
    if offload.strip().lower() in ("model", "sequential") and (slider or random_sliders):
        raise UsageError(f"--offload {offload} does not work with sliders: their LoRA bank stays on the device the "
                         "layers had when it was installed (the CPU, under offload); use --offload none")
    loaded = open_model(model, device, dtype, config, flow=True, offload=offload)
    if embedding is not None:
        loaded = textual_inversion.add_embedding(loaded, embedding, token)
    with ui.progress("generate", unit="images", enabled=not json_out or sys.stderr.isatty()) as bar:
        result = run(loaded, cfg, progress=bar, warn=ui.info)
    if json_out:
        ui.print_json({"prompt": prompt, "model": loaded.spec, "out": str(result.out), "files": result.files})
        return
    for f in result.files:
        ui.info(f["path"])
