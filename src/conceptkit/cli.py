"""The `conceptkit` command line: one thin function per command, and the only place that exits."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.errors import ConceptkitError, UsageError

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
        help="Built-in name (toy, tiny-sd, tiny-sdxl), Hugging Face id in the local cache, diffusers folder or .safetensors file. Default: $CONCEPTKIT_MODEL or toy.",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(help="Diffusers config folder (or cached hub id) for a single-file .safetensors model.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def _model_spec(model: str | None) -> str:
    return model or os.environ.get("CONCEPTKIT_MODEL") or "toy"


def _quiet_libraries() -> None:
    """Keep library chatter (deprecations, optional-backend notes) off the user's stderr."""
    import warnings

    if _state["verbose"]:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        diffusers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


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


def _load(model: str | None, device: str, dtype: str, config: Path | None):
    from conceptkit.models import load_model

    spec = _model_spec(model)
    with ui.err.status(f"loading {spec}"):
        return load_model(spec, device=device, dtype=dtype, config=config)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and library logs.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _state["verbose"] = verbose
    if version:
        from conceptkit import __version__

        print(__version__)
        raise typer.Exit(0)


# ---------------------------------------------------------------- models


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


# ---------------------------------------------------------------- harvest


def _read_prompts(prompt: str | None, prompts_file: Path | None, templates: bool) -> tuple[str, ...]:
    from conceptkit.prompts import expand_templates

    prompts: list[str] = []
    if prompt is not None:
        prompts.append(prompt)
    if prompts_file is not None:
        try:
            text = prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read prompts file {prompts_file}: {getattr(exc, 'strerror', None) or exc}") from exc
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not lines:
            raise UsageError(f"prompts file {prompts_file} has no prompts")
        prompts.extend(lines)
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
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Sample a concept and record every step's predicted clean latent (x0). Cached and resumable."""
    from conceptkit import harvest as stage

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
    loaded = _load(model, device, dtype, config)
    with ui.progress("harvest", unit="samples", enabled=not json_out or sys.stderr.isatty()) as bar:
        result = stage.run(loaded, cfg, progress=bar, on_wait=ui.info)
    m = result.manifest
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


# ---------------------------------------------------------------- cache


@cache_app.command("path")
@command
def cache_path(json_out: JsonOpt = False) -> None:
    """Print where the store keeps caches and data."""
    from conceptkit import store

    roots = {k: str(v) for k, v in store.roots().items()}
    if json_out:
        ui.print_json(roots)
        return
    for name, path in roots.items():
        print(f"{name}\t{path}")


@cache_app.command("list")
@command
def cache_list(
    kind: Annotated[Optional[str], typer.Option(help="Only this kind: harvest, cluster, evaluate or sliders.", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the artifacts in the store: kind, key, prompt, model, size and age."""
    from conceptkit import store

    infos = store.list_artifacts(kind)
    if json_out:
        ui.print_json([{**i.__dict__, "age_seconds": round(i.age_seconds, 1)} for i in infos])
        return
    if not infos:
        ui.info("the store is empty")
        return
    ui.table(
        "artifacts",
        ["kind", "key", "prompt", "model", "size", "age", "complete"],
        [(i.kind, i.key, i.prompt, i.model, ui.human_size(i.size), ui.human_age(i.age_seconds), "yes" if i.complete else "no") for i in infos],
    )


@cache_app.command("clear")
@command
def cache_clear(
    key: Annotated[Optional[str], typer.Argument(help="One artifact's key (or name); omit to clear a --kind or --all.", show_default=False)] = None,
    kind: Annotated[Optional[str], typer.Option(help="Only this kind.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Clear everything.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove one artifact, every artifact of a kind, or everything."""
    from conceptkit import store

    if key is None and kind is None and not all_:
        raise UsageError("say what to clear: a KEY, --kind KIND or --all")
    if key is None:
        doomed = store.list_artifacts(kind)
        if doomed and not yes:
            what = f"all {len(doomed)} {kind} artifacts" if kind else f"all {len(doomed)} artifacts"
            if not sys.stdin.isatty():
                raise UsageError(f"refusing to remove {what} without --yes (no terminal to confirm on)")
            if not typer.confirm(f"Remove {what}?", err=True):
                raise typer.Exit(1)
    removed = store.clear(kind=kind, key=key)
    if json_out:
        ui.print_json({"removed": [{"kind": i.kind, "key": i.key, "size": i.size} for i in removed]})
        return
    ui.info(f"removed {len(removed)} artifact(s), {ui.human_size(sum(i.size for i in removed))}")


def run() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="conceptkit")
