"""Sub-concept editing: sample with one Picasso sub-concept's neurons closed, scaled, or kept alone.

Closing a neuron zeroes its output channel (as zeroing its `to_k`/`to_v` weight row does, Cones,
Liu et al. 2023, Sec. 3.2), only while the sampler is in the timestep groups where that neuron
is a TSCone of the sub-concept (Picasso, Cai et al.). Implemented as forward hooks on the
projections, gated by the current timestep, which a pre-hook on the UNet reads; hooks are removed
on exit. `SubconceptModification` plugs this into `generate` (`--subconcept KEY:C[:MODE[:SCALE]]`);
`render` draws one sub-concept's images.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptkit import store
from conceptkit.diffusion import sample, same_weights
from conceptkit.errors import UsageError
from conceptkit.models.flow import denoiser
from conceptkit.picasso.maths import timestep_groups

MODES = ("close", "scale", "only")
# On the toy (docs/picasso.md, VbSC) neither mode separated better on both prompts: only did on "a red
# circle" (and showed its one clear factor, colour), close on "a shape". `render` defaults to only too.
DEFAULT_MODE = "only"
SPEC_RE = re.compile(r"^(?P<key>[0-9A-Za-z_-]+):(?P<cluster>[^:]+)(?::(?P<mode>[^:]+)(?::(?P<scale>[^:]+))?)?$")


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
    model: dict = field(default_factory=dict)  # identity of the model the statistics were computed on
    prompts: tuple[str, ...] = ()  # the harvest's prompts
    embedding: dict | None = None  # {"path", "token"} of the textual-inversion embedding it was made with

    def sizes(self) -> list[int]:
        """Kept (group, neuron) items per sub-concept."""
        return [int(np.sum(self.labels == c)) for c in range(self.k)]


def load_map(key_or_prefix: str) -> SubconceptMap:
    """Read a cluster artifact (key or prefix) and the blocks of the neurons artifact it was built from."""
    art = store.find("cluster", key_or_prefix)
    m = art.manifest()
    neurons = store.find("neurons", m["neurons"]).manifest()

    def arr(name: str) -> np.ndarray:
        return np.load(Path(art.path) / f"{name}.npy", allow_pickle=False)

    return SubconceptMap(art.key, int(m["k"]), int(m["temporal_dim"]), int(neurons.get("num_train_timesteps", 1000)),
                         neurons["blocks"], arr("item_group"), arr("item_neuron"), arr("labels"),
                         dict(neurons.get("model", {})), tuple(neurons.get("prompts", m.get("prompts", ()))), m.get("embedding"))


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
    """Inside the block, every UNet call multiplies each `to_k`/`to_v` output channel by gate[group(t)]
    (FLUX / SD3: each joint attention's `add_k_proj`/`add_v_proj`, picasso/joint.py).

    Args:
        unet: the pipeline's UNet, or FLUX's / SD3's transformer.
        blocks: the neurons artifact's blocks (flat neuron index -> layer, projection, channels).
        gate: (D, N) from `gates`.
        num_train_timesteps: the scheduler's horizon, for the group of t.
    """
    d = gate.shape[0]
    state = {"group": 0}
    per_unit = type(unet).__name__.startswith("Flux")  # FLUX's transformer is called with t / num_train_timesteps

    def read_t(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        t = t * num_train_timesteps if per_unit else t
        state["group"] = int(timestep_groups([t], d, num_train_timesteps)[0])

    handles = [unet.register_forward_pre_hook(read_t, with_kwargs=True)]
    try:
        for b in blocks:
            block_gate = torch.as_tensor(gate[:, b["start"] : b["stop"]], dtype=torch.float32)
            if torch.all(block_gate == 1):
                continue
            layer = unet.get_submodule(b["layer"])
            joint = getattr(layer, "add_k_proj", None) is not None  # an MMDiT joint attention: the text projections
            lin = getattr(layer, f"add_{b['proj']}_proj" if joint else f"to_{b['proj']}")

            def hook(module, args, out, block_gate=block_gate):
                return out * block_gate[state["group"]].to(out.device, out.dtype)

            handles.append(lin.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class SubconceptSpec:
    """`KEY:C[:MODE[:SCALE]]`: which sub-concept of which cluster artifact, and how to apply it."""

    key: str  # cluster artifact key or prefix
    cluster: int  # sub-concept index, 0..k-1
    mode: str = DEFAULT_MODE  # close | scale | only
    scale: float = 0.0  # output multiplier of the cluster's neurons in mode scale

    def __str__(self) -> str:
        return f"{self.key}:{self.cluster}:{self.mode}" + (f":{self.scale:g}" if self.mode == "scale" else "")


def parse_spec(text: str) -> SubconceptSpec:
    """'3f2a:1' -> sub-concept 1 of cluster 3f2a in the default mode; '3f2a:1:scale:2' doubles it."""
    m = SPEC_RE.match(text.strip())
    if not m:
        raise UsageError(f"malformed --subconcept {text!r}: write KEY:C[:MODE[:SCALE]], e.g. 3f2a:1:close or 3f2a:0:scale:2")
    try:
        cluster = int(m["cluster"])
    except ValueError:
        raise UsageError(f"--subconcept {text!r}: C must be a sub-concept number (got {m['cluster']!r})") from None
    mode = m["mode"] or DEFAULT_MODE
    if mode not in MODES:
        raise UsageError(f"--subconcept {text!r}: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "scale":
        if m["scale"] is None:
            raise UsageError(f"--subconcept {text!r}: mode scale needs a SCALE, e.g. {m['key']}:{cluster}:scale:2")
        try:
            scale = float(m["scale"])
        except ValueError:
            raise UsageError(f"--subconcept {text!r}: SCALE must be a number (got {m['scale']!r})") from None
        if not np.isfinite(scale) or abs(scale) > 100:
            raise UsageError(f"--subconcept {text!r}: SCALE must be a finite number between -100 and 100")
    elif m["scale"] is not None:
        raise UsageError(f"--subconcept {text!r}: SCALE applies to mode scale only")
    else:
        scale = 0.0
    if cluster < 0:
        raise UsageError(f"--subconcept {text!r}: C must be 0 or more")
    return SubconceptSpec(m["key"], cluster, mode, scale)


def check_model(sub: SubconceptMap, model) -> None:
    """A cluster's neurons index one model's layers: refuse to apply it to another model."""
    made = sub.model.get("fingerprint")
    if not same_weights(sub.model, model):
        fix = f"--model {sub.model.get('spec')}"
        if sub.embedding:
            fix += f" --embedding {sub.embedding['path']} --token {sub.embedding['token']!r}"
        raise UsageError(f"cluster {sub.key} was made on {sub.model.get('spec')} (weights {str(made)[:12]}), "
                         f"not {model.spec} (weights {model.fingerprint[:12]}); pass {fix}")


class SubconceptModification:
    """One sub-concept's gates on a UNet, for `diffusion.sample` (the `Modification` protocol).

    The hooks are installed at construction and read the timestep from each UNet call, so
    `set_step` has nothing to do; `remove` takes them off.
    """

    def __init__(self, unet, sub: SubconceptMap, cluster: int, mode: str = DEFAULT_MODE, scale: float = 0.0):
        self.sub, self.cluster, self.mode, self.scale = sub, cluster, mode, float(scale)
        gate = gates(sub, cluster, mode, scale)  # checks cluster and mode before any hook goes on
        self._ctx = apply(unet, sub.blocks, gate, sub.num_train_timesteps)
        self._ctx.__enter__()
        self._on = True

    def set_step(self, i: int, n: int) -> None:
        """Nothing to do: the gates follow the timestep the UNet is called with."""

    def remove(self) -> None:
        if self._on:
            self._ctx.__exit__(None, None, None)
            self._on = False

    def describe(self) -> dict[str, Any]:
        return {"kind": "subconcept", "cluster_key": self.sub.key, "subconcept": self.cluster, "mode": self.mode,
                **({"scale": self.scale} if self.mode == "scale" else {}), "k": self.sub.k,
                "temporal_dim": self.sub.temporal_dim, "size": self.sub.sizes()[self.cluster],
                "harvest_prompt": self.sub.prompts[0] if self.sub.prompts else None}


def resolve(spec: SubconceptSpec, model) -> SubconceptMap:
    """Load the spec's cluster artifact and check that it fits `model` and has sub-concept C."""
    sub = load_map(spec.key)
    check_model(sub, model)
    gates(sub, spec.cluster, spec.mode, spec.scale)
    return sub


def _sampling(model, sub: SubconceptMap, prompt: str | None, steps: int | None, guidance: float | None) -> tuple[str, int, float]:
    """(prompt, steps, guidance): the ones given, else the cluster's harvest prompt and the model's defaults."""
    prompt = prompt if prompt is not None else (sub.prompts[0] if sub.prompts else None)
    if not prompt:
        raise UsageError(f"cluster {sub.key} records no prompt; pass prompt=")
    return prompt, steps or model.default_steps, model.default_guidance if guidance is None else guidance


def render(model, sub: SubconceptMap | str, cluster: int, seeds: Sequence[int], *, mode: str = "only", scale: float = 0.0,
           steps: int | None = None, guidance: float | None = None, batch_size: int = 16, prompt: str | None = None) -> torch.Tensor:
    """Images of sub-concept `cluster`: (N, 3, H, W) in [0, 1], one per seed, the gates applied at every UNet call.

    Args:
        model: a `LoadedModel`, the one the cluster was made on.
        sub: a `SubconceptMap` or a cluster key (prefix).
        cluster: the sub-concept, 0..k-1.
        seeds: one image per seed (the same seeds give the same starting noise in every mode).
        mode: close (the cluster's neurons closed), scale (multiplied by `scale`), only (every other kept neuron closed).
        steps, guidance: sampling settings; None: the model's defaults.
        batch_size: images per sampler call.
        prompt: what to draw; None: the harvest prompt the cluster was made from.
    """
    sub = load_map(sub) if isinstance(sub, str) else sub
    check_model(sub, model)
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1 (got {batch_size})")
    prompt, steps, guidance = _sampling(model, sub, prompt, steps, guidance)
    seeds = list(seeds)
    mod = SubconceptModification(denoiser(model.pipe), sub, cluster, mode, scale)
    try:
        out = [sample(model, prompt, seeds[i:i + batch_size], steps, guidance, [mod]) for i in range(0, len(seeds), batch_size)]
    finally:
        mod.remove()
    return torch.cat(out) if out else torch.empty(0, 3, 0, 0)


def render_all(model, sub: SubconceptMap, seeds: Sequence[int], *, mode: str = "only", scale: float = 0.0,
               steps: int | None = None, guidance: float | None = None, batch_size: int = 16, prompt: str | None = None,
               progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unmodified images (N, 3, H, W) and every sub-concept's on the same seeds (k, N, 3, H, W).

    `progress(done, k)` after each sub-concept."""
    prompt, steps, guidance = _sampling(model, sub, prompt, steps, guidance)
    seeds = list(seeds)
    base = torch.cat([sample(model, prompt, seeds[i:i + batch_size], steps, guidance) for i in range(0, len(seeds), batch_size)])
    rows = []
    for c in range(sub.k):
        rows.append(render(model, sub, c, seeds, mode=mode, scale=scale, steps=steps, guidance=guidance,
                           batch_size=batch_size, prompt=prompt))
        if progress:
            progress(c + 1, sub.k)
    return base, torch.stack(rows)


def grid(model, sub: SubconceptMap, seeds: Sequence[int], **kwargs) -> torch.Tensor:
    """`render_all` as one figure's cells: the unmodified row, then a row per sub-concept, a column per
    seed; ((k + 1) * N, 3, H, W), row-major."""
    base, rows = render_all(model, sub, seeds, **kwargs)
    return torch.cat([base[None], rows]).flatten(0, 1)
