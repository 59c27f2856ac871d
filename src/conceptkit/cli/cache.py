"""`conceptkit cache path|list|clear|verify`."""

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
    from conceptkit import store  # deferred: --help loads no torch

    roots = {k: str(v) for k, v in store.roots().items()}
    if json_out:
        ui.print_json(roots)
        return
    for name, path in roots.items():
        print(f"{name}\t{path}")


@cache_app.command("list")
@command
def cache_list(
    kind: Annotated[Optional[str], typer.Option(help="Only this kind: harvest, neurons, cluster, evaluate, sliders or implant.", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the artifacts in the store: kind, key, prompt, model, size and age; damaged ones with their path."""
    from conceptkit import store, store_admin  # deferred: --help loads no torch

    if kind is not None:
        store.kind_dir(kind)  # an unknown kind is refused, with the kinds there are
    infos = store_admin.list_artifacts(kind)
    if json_out:
        ui.print_json([{**i.__dict__, "age_seconds": round(i.age_seconds, 1)} for i in infos])
        return
    if not infos:
        ui.info("the store is empty")
        return
    ui.table(
        "artifacts",
        ["kind", "key", "prompt", "model", "size", "age", "complete"],
        [(i.kind, i.key, i.prompt, i.model, ui.human_size(i.size), ui.human_age(i.age_seconds),
          "DAMAGED" if i.damaged else "yes" if i.complete else "no") for i in infos],
    )
    for i in infos:
        if i.damaged:
            ui.info(f"damaged: {i.path}: {i.damaged}; remove it with `conceptkit cache clear {i.key} --kind {i.kind}`")


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
    from conceptkit import store, store_admin  # deferred: --help loads no torch

    if key is None and kind is None and not all_:
        raise UsageError("say what to clear: a KEY, --kind KIND or --all")
    if kind is not None:
        store.kind_dir(kind)
    if key is None:
        doomed = store_admin.list_artifacts(kind)
        if doomed and not yes:
            what = f"all {len(doomed)} {kind} artifacts" if kind else f"all {len(doomed)} artifacts"
            if not sys.stdin.isatty():
                raise UsageError(f"refusing to remove {what} without --yes (no terminal to confirm on)")
            if not typer.confirm(f"Remove {what}?", err=True):
                raise typer.Exit(1)
    removed = store_admin.clear(kind=kind, key=key, on_wait=ui.info)
    freed = store_admin.clean_leftovers(kind)
    if json_out:
        ui.print_json({"removed": [{"kind": i.kind, "key": i.key, "size": i.size} for i in removed], "leftovers_bytes": freed})
        return
    ui.info(f"removed {len(removed)} artifact(s), {ui.human_size(sum(i.size for i in removed))}"
            + (f"; {ui.human_size(freed)} of leftovers from interrupted runs" if freed else ""))


@cache_app.command("verify")
@command
def cache_verify(
    kind: Annotated[Optional[str], typer.Option(help="Only this kind: harvest, neurons, cluster, evaluate, sliders or implant.", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Read every artifact's manifest, file headers and shard checksums; exit 1 if any is damaged."""
    from conceptkit import store, store_admin  # deferred: --help loads no torch

    if kind is not None:
        store.kind_dir(kind)
    freed = store_admin.clean_leftovers(kind)
    verdicts = store_admin.verify(kind)
    bad = [v for v in verdicts if not v.ok]
    if json_out:
        ui.print_json({"checked": len(verdicts), "damaged": [{"kind": v.kind, "key": v.key, "path": v.path, "problems": v.problems}
                                                             for v in bad], "leftovers_bytes": freed})
    else:
        if freed:
            ui.info(f"removed {ui.human_size(freed)} of leftovers from interrupted runs")
        for v in bad:
            ui.info(f"damaged: {v.path}: {'; '.join(v.problems)}")
        ui.info(f"{len(verdicts)} artifact(s) checked, {len(bad)} damaged"
                + ("; remove them with `conceptkit cache clear KEY --kind KIND`" if bad else ""))
    if bad:
        raise typer.Exit(1)


