"""What every command shares: the Typer apps, common options, model loading and error handling."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.errors import ConceptkitError

app = typer.Typer(
    name="conceptkit",
    help="Take a text-to-image diffusion model apart and see what it knows about a concept.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="See and manage the artifact store.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

_state = {"verbose": False}

# ---------------------------------------------------------------- shared options

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Built-in name (toy, tiny-sd, tiny-sdxl), Hugging Face id (downloaded on first use), diffusers folder or .safetensors file. Default: $CONCEPTKIT_MODEL or toy.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(help="Diffusers config folder (or hub id) for a single-file .safetensors model.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def model_spec(model: str | None) -> str:
    return model or os.environ.get("CONCEPTKIT_MODEL") or "toy"


def _quiet_libraries() -> None:
    """Keep library chatter (deprecations, optional-backend notes) off the user's stderr."""
    import warnings

    if _state["verbose"]:
        return
    warnings.filterwarnings("ignore")
    # Read when each library is imported; one already imported is told directly. Importing them here
    # would cost seconds on commands that fail before loading a model (an offline, missing model).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers"):
        module = sys.modules.get(name)
        if module is not None:
            module.logging.set_verbosity_error()


def command(fn):
    """Turn domain errors into one line and an exit code; never a traceback unless --verbose."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except ConceptkitError as exc:
            if _state["verbose"]:
                ui.err.print_exception()
            ui.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            ui.error("interrupted; finished work is kept and a rerun resumes it")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _state["verbose"]:
                ui.err.print_exception()
            ui.error(f"{type(exc).__name__}: {exc} (run with --verbose for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def load(model: str | None, device: str, dtype: str, config: Path | None, encoders: Sequence[str | None] = ()):
    """Load the model, first naming and downloading every hub repository the run needs (model, configs, encoders).

    Args:
        encoders: `--encoder` specs the run will load after the model (`auto` resolves against the model).
    """
    import torch

    from conceptkit import features, hub
    from conceptkit.models import hub_needs, load_model, resolve_device, resolve_dtype

    spec = model_spec(model)
    half = resolve_dtype(dtype, resolve_device(device)) in (torch.float16, torch.bfloat16)
    needs = hub_needs(spec, config, prefer_fp16=half)
    for encoder in encoders:
        needs += features.hub_needs(encoder or "auto", spec)
    # one unwrapped line per repository to download, then huggingface_hub's progress bars
    hub.prepare(needs, say=lambda line: ui.err.print(line, soft_wrap=True, markup=False))
    with ui.err.status(f"loading {spec}"):
        return load_model(spec, device=device, dtype=dtype, config=config)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and library logs.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Download nothing: use the local Hugging Face cache only (as HF_HUB_OFFLINE=1 does).")] = False,
) -> None:
    from conceptkit import hub

    _state["verbose"] = verbose
    hub.set_offline(offline)
    if version:
        from conceptkit import __version__

        print(__version__)
        raise typer.Exit(0)


