"""Sub-concept editing: sample with one Picasso sub-concept's neurons closed, scaled, or kept alone.

Closing a neuron zeroes its output channel (as zeroing its `to_k`/`to_v` weight row does, Cones,
Liu et al. 2023, Sec. 3.2), only while the sampler is in the timestep groups where that neuron
is a TSCone of the sub-concept (Picasso, Cai et al.). Implemented as forward hooks on the
projections, gated by the current timestep, which a pre-hook on the UNet reads; hooks are removed
on exit. Not wired to a command yet: `generate --subconcept` would call `apply` around sampling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conceptkit import store
from conceptkit.cluster import timestep_groups
from conceptkit.errors import UsageError

MODES = ("close", "scale", "only")


@dataclass(frozen=True)
class SubconceptMap:
    """What a cluster artifact says about its sub-concepts."""

    key: str
    k: int
    temporal_dim: int
    num_train_timesteps: int
    blocks: list[dict]  # the neurons artifact's blocks: layer, proj, start, stop
    item_group: np.ndarray  # (n,)
    item_neuron: np.ndarray  # (n,)
    labels: np.ndarray  # (n,)


def load(key_or_prefix: str) -> SubconceptMap:
    """Read a cluster artifact (key or prefix) and the blocks of the neurons artifact it was built from."""
    art = store.find("cluster", key_or_prefix)
    m = art.manifest()
    neurons = store.find("neurons", m["neurons"]).manifest()

    def arr(name: str) -> np.ndarray:
        return np.load(Path(art.path) / f"{name}.npy")

    return SubconceptMap(art.key, int(m["k"]), int(m["temporal_dim"]), int(neurons.get("num_train_timesteps", 1000)),
                         neurons["blocks"], arr("item_group"), arr("item_neuron"), arr("labels"))


def gates(sub: SubconceptMap, cluster: int, mode: str = "close", scale: float = 0.0) -> np.ndarray:
    """(D, N) multipliers of each neuron's output per timestep group.

    close: the cluster's neurons -> 0 in their groups; scale: -> `scale` in their groups (0 closes,
    2 doubles); only: every *other* kept neuron -> 0 in its groups, the cluster's left alone.
    """
    if mode not in MODES:
        raise UsageError(f"unknown sub-concept mode {mode!r}; use one of {', '.join(MODES)}")
    if not 0 <= cluster < sub.k:
        raise UsageError(f"sub-concept {cluster} does not exist; cluster {sub.key} has 0..{sub.k - 1}")
    n = sub.blocks[-1]["stop"]
    g = np.ones((sub.temporal_dim, n))
    mine = sub.labels == cluster
    if mode == "only":
        g[sub.item_group[~mine], sub.item_neuron[~mine]] = 0.0
        g[sub.item_group[mine], sub.item_neuron[mine]] = 1.0  # a neuron of the cluster is never closed by another
    else:
        g[sub.item_group[mine], sub.item_neuron[mine]] = 0.0 if mode == "close" else float(scale)
    return g


@contextmanager
def apply(unet, blocks: list[dict], gate: np.ndarray, num_train_timesteps: int = 1000) -> Iterator[None]:
    """Inside the block, every UNet call multiplies each `to_k`/`to_v` output channel by gate[group(t)].

    Args:
        unet: the pipeline's UNet.
        blocks: the neurons artifact's blocks (flat neuron index -> layer, projection, channels).
        gate: (D, N) from `gates`.
        num_train_timesteps: the scheduler's horizon, for the group of t.
    """
    d = gate.shape[0]
    state = {"group": 0}

    def read_t(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        state["group"] = int(timestep_groups([t], d, num_train_timesteps)[0])

    handles = [unet.register_forward_pre_hook(read_t, with_kwargs=True)]
    try:
        for b in blocks:
            block_gate = torch.as_tensor(gate[:, b["start"] : b["stop"]], dtype=torch.float32)
            if torch.all(block_gate == 1):
                continue
            lin = getattr(unet.get_submodule(b["layer"]), f"to_{b['proj']}")

            def hook(module, args, out, block_gate=block_gate):
                return out * block_gate[state["group"]].to(out.device, out.dtype)

            handles.append(lin.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
