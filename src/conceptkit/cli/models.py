"""`conceptkit models`."""

from __future__ import annotations

from conceptkit import ui
from conceptkit.cli.common import JsonOpt, app, command


@app.command()
@command
def models(json_out: JsonOpt = False) -> None:
    """List the built-in models and what each is for, and the toy world's factors and vocabulary."""
    from conceptkit.models.load import builtin_models  # deferred: --help loads no torch
    from conceptkit.toy import describe  # deferred: --help loads no torch

    items = builtin_models()
    toy = describe()
    if json_out:
        ui.print_json([{"name": m.name, "arch": m.arch, "description": m.description, **({"world": toy} if m.name == "toy" else {})} for m in items])
        return
    ui.table("built-in models", ["name", "arch", "what it is for"], [(m.name, m.arch, m.description) for m in items])
    ui.table("the toy world: factors (prompts may name any subset)", ["factor", "values"], [(k, ", ".join(v)) for k, v in toy["factors"].items()])
    ui.info(f"toy prompts, e.g.: {'; '.join(repr(c) for c in toy['caption_examples'])}")
    ui.info("Also accepted: a Hugging Face id (downloaded into the Hugging Face cache on first use), a diffusers folder, or a .safetensors file.")
