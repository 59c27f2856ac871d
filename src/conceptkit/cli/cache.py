"""`conceptkit cache path|list|clear`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from conceptkit import ui
from conceptkit.cli.common import (
    JsonOpt,
    cache_app,
    command,
)
from conceptkit.errors import UsageError


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
    kind: Annotated[Optional[str], typer.Option(help="Only this kind: harvest, neurons, cluster, evaluate or sliders.", show_default=False)] = None,
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


