"""What every command shares: the Typer apps, common options, model loading and error handling."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer 0.29 and newer carry their own copy of click
    from typer._click import exceptions as click_errors
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors
    from click import get_current_context

from conceptkit import __version__, ui
from conceptkit.cli import limits
from conceptkit.errors import ConceptkitError, UnsupportedModelError
from conceptkit.models import hub

FLOW_COMMANDS = "harvest, generate, sliders train and cluster"  # the commands that pass open_model(flow=True)


def click_context():
    """The running command's click context, or None outside a command."""
    return get_current_context(silent=True)


def _plain_flags(command) -> None:
    """Show flags as flags in help (`--json`, not `--json <bool>`), in every command."""
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)


class OneLineGroup(TyperGroup):
    """The top-level command: usage errors as one line and exit 2, like every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _plain_flags(self)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click_errors.NoArgsIsHelpError as exc:  # `conceptkit` or `conceptkit cache` alone: the help
            typer.echo(exc.ctx.get_help(), err=True)
            code = 2
        except click_errors.UsageError as exc:  # unknown option, bad type, missing argument
            where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
            ui.error(f"{exc.format_message().rstrip('.')}{where}")
            code = 2
        except click_errors.ClickException as exc:
            ui.error(exc.format_message())
            code = exc.exit_code
        except click_errors.Abort:
            ui.error("interrupted")
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    cls=OneLineGroup,
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
        help="Built-in name (toy, tiny-sd, tiny-sdxl, tiny-flux, tiny-sd3), Hugging Face id (downloaded on first use), diffusers folder or .safetensors file. Default: $CONCEPTKIT_MODEL or toy.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")]
OffloadOpt = Annotated[str, typer.Option(help="none, model (each component on the GPU only for its forward) or sequential (weights streamed layer by layer: least GPU memory, slowest); CUDA only.")]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(help="Diffusers config folder (or hub id) for a single-file .safetensors model.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def model_spec(model: str | None) -> str:
    return model or os.environ.get("CONCEPTKIT_MODEL") or "toy"


def _quiet_libraries() -> None:
    """Keep library chatter (deprecations, optional-backend notes) off the user's stderr.

    Only environment variables, read when the libraries are first imported: importing diffusers
    and transformers here would cost light commands (`cache path`) seconds.
    """
    import warnings

    if _state["verbose"]:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers"):  # already imported (tests, a library user): set it directly
        module = sys.modules.get(name)
        if module is not None:
            module.logging.set_verbosity_error()


def _terminate_as_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _handle_sigterm() -> None:
    """SIGTERM (a `kill`, a job scheduler, a container stop) stops a command as Ctrl-C does: finished
    work is kept, temporary files are removed, exit 130. Only in the main thread, where signals land."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)


def command(fn):
    """Check numeric options against cli/limits.py, then turn domain errors into one line and an
    exit code; never a traceback unless --verbose."""
    name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__.rstrip('_')}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        _handle_sigterm()
        try:
            limits.check(name, kwargs)
            limits.check_outputs(kwargs)
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


def open_model(model: str | None, device: str, dtype: str, config: Path | None, encoders: Sequence[str | None] = (),
               flow: bool = False, offload: str = "none"):
    """Load the model, first naming and downloading every hub repository the run needs (model, configs, encoders).

    Args:
        encoders: `--encoder` specs the run will load after the model (`auto` resolves against the model).
        flow: the command handles FLUX / SD3 (flow-matching transformers); the others refuse them in one line.
        offload: --offload (none|model|sequential), refused off CUDA before anything is downloaded or loaded.
    """
    import torch

    from conceptkit import features  # deferred: --help loads no torch
    from conceptkit.models.load import hub_needs, load_model, resolve_device, resolve_dtype  # deferred: --help loads no torch
    from conceptkit.models.memory import check_offload  # deferred: --help loads no torch

    spec = model_spec(model)
    check_offload(offload, resolve_device(device))
    half = resolve_dtype(dtype, resolve_device(device)) in (torch.float16, torch.bfloat16)
    needs = hub_needs(spec, config, prefer_fp16=half)
    for encoder in encoders:
        needs += features.encoder_hub_needs(encoder or "auto", spec)
    # one unwrapped line per repository to download, then huggingface_hub's progress bars
    hub.prepare(needs, say=lambda line: ui.err.print(line, soft_wrap=True, markup=False))
    with ui.err.status(f"loading {spec}"):
        loaded = load_model(spec, device=device, dtype=dtype, config=config, offload=offload)
    if loaded.arch in ("flux", "sd3") and not flow:
        ctx = click_context()
        name = f"`{ctx.command_path}`" if ctx is not None else "this command"
        raise UnsupportedModelError(f"{spec} is a {loaded.arch} model; {name} handles SD 1.x, SD 2.x and SDXL "
                                    f"(FLUX and SD3 work with {FLOW_COMMANDS} for now)")
    return loaded


def _print_version(value: bool) -> None:
    if value:
        print(f"conceptkit {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and library logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Download nothing: use the local Hugging Face cache only (as HF_HUB_OFFLINE=1 does).")] = False,
) -> None:
    _state["verbose"] = verbose
    hub.set_offline(offline)


