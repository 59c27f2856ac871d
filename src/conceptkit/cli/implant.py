"""`conceptkit implant IMAGES_DIR --token WORD --init-word WORD`: learn a new word from a few images."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    app,
    command,
    open_model,
)

QUICK = {"toy", "tiny-sd"}  # built-ins where a few hundred steps suffice (measured on the toy: docs/implant.md)


@app.command()
@command
def implant(
    images: Annotated[Path, typer.Argument(help="Folder of the concept's images (png, jpg, webp, bmp); a few to a few dozen.", show_default=False)],
    token: Annotated[str, typer.Option(help="The new word, e.g. '<my-dog>'; it must be new to the model's tokenizer.", show_default=False)],
    init_word: Annotated[str, typer.Option("--init-word", help="A word close to the concept, where the new word starts, e.g. dog.", show_default=False)],
    model: ModelOpt = None,
    method: Annotated[str, typer.Option(help="ti: one learned input embedding (textual inversion, Gal et al. 2022); temporal: one per timestep group (--temporal-dim); xti: one per cross-attention layer (P+, Voynov et al. 2023).")] = "ti",
    temporal_dim: Annotated[int, typer.Option("--temporal-dim", "-D", help="Timestep groups of --method temporal: a sample at timestep t trains the vector of group int(t*D/1000).")] = 1,
    train_steps: Annotated[Optional[int], typer.Option("--train-steps", help="Optimiser steps. Default: 300 on the toy and tiny-sd, 3000 on real models.", show_default=False)] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the vector.")] = 5e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per optimiser step.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the batches, timesteps and noise.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Also copy the embedding here as TOKEN.safetensors (it stays in the store).", show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Learn a new word for the concept in IMAGES_DIR (textual inversion); use it with --embedding in generate and cluster."""
    from conceptkit import store  # deferred: --help loads no torch
    from conceptkit.implant.pipeline import ImplantConfig, run  # deferred: --help loads no torch

    spec = model or "toy"
    steps = train_steps or (300 if spec in QUICK else 3000)
    cfg = ImplantConfig(images=str(images), token=token, init_word=init_word, method=method, temporal_dim=temporal_dim,
                        steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    loaded = open_model(model, device, dtype, None)
    with ui.progress("implant", unit="steps", enabled=not json_out or sys.stderr.isatty()) as bar:
        result = run(loaded, cfg, progress=bar, on_wait=ui.info)
    temporal = result.manifest.get("temporal_file") or result.manifest.get("layers_file")
    doc = {"key": result.key, "path": str(result.path), "embedding": str(result.path / temporal if temporal else result.embedding),
           "portable_embedding": str(result.embedding), "token": token, "init_word": init_word, "method": method,
           "temporal_dim": temporal_dim, "model": loaded.spec, "cached": result.cached,
           "images": result.manifest.get("count"), "loss": result.manifest.get("loss"), "seconds": round(result.seconds, 3)}
    if out is not None:
        dest = store.inside(out, f"{store.slugify(token)}.safetensors", "--out embedding")
        out.mkdir(parents=True, exist_ok=True)
        with store.atomic_path(dest) as tmp:
            shutil.copyfile(doc["embedding"], tmp)
        doc["copied_to"] = str(dest)
    if json_out:
        ui.print_json(doc)
        return
    loss = doc["loss"] or {}
    ui.info(("cached: " if result.cached else "") + f"{token} learned from {doc['images']} images"
            + (f" (loss {loss['first']:.4g} -> {loss['last']:.4g})" if loss.get("first") is not None else ""))
    ui.info(f"embedding: {doc['embedding']}")
    if temporal:
        ui.info(f"for other tools (the mean of its vectors): {result.embedding}")
    if out is not None:
        ui.info(f"copied to: {doc['copied_to']}")
    ui.info(f"use it: conceptkit generate 'a {token}' --model {loaded.spec} --embedding {doc['embedding']} --token '{token}'")
