"""`conceptkit models`."""

from __future__ import annotations

from conceptkit import ui
from conceptkit.cli.common import (
    JsonOpt,
    app,
    command,
)


@app.command()
@command
def models(json_out: JsonOpt = False) -> None:
    """List the built-in models and what each is for."""
    from conceptkit.models import builtin_models

    items = builtin_models()
    if json_out:
        ui.print_json([{"name": m.name, "arch": m.arch, "description": m.description} for m in items])
        return
    ui.table("built-in models", ["name", "arch", "what it is for"], [(m.name, m.arch, m.description) for m in items])
    ui.info("Also accepted: a Hugging Face id in the local cache, a diffusers folder, or a .safetensors file (with --config).")


