"""Harvest: run the model's own sampler and record every denoising step.

For each trajectory and step we keep the timestep, the latent the UNet saw (x_t) and the model's
predicted clean latent x0. SliderSpace trains on every step's x0 (Gandikota et al. 2025, Sec. 3),
not only on the final image. Trajectory i uses seed `seed + i` and prompt `prompts[i % P]`, so a
trajectory is the same whatever the batch size or the order in which shards are written.
Shards hold contiguous trajectory ranges and are written atomically: an interrupted harvest
resumes with the missing trajectories only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from conceptkit import __version__, capacity, store
from conceptkit.diffusion import generators, learned_words
from conceptkit.diffusion_flow import unpack
from conceptkit.errors import StoreError, UsageError
from conceptkit.harvest_shards import overlaps, problems, shard_name, shard_ranges
from conceptkit.models.flow import check_guidance, check_size, native_size, pipeline_kwargs
from conceptkit.models.load import LoadedModel
from conceptkit.parallel import barrier, processes
from conceptkit.settings import IN_MANIFEST_ONLY, NOT_RECORDED, key_settings, manifest_settings
from conceptkit.step_recorder import StepRecorder
from conceptkit.tensor_files import sha256

RECORDABLE = ("x0", "xt")
HARVEST_FORMAT = 1

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class HarvestConfig:
    """What to sample and what to keep; every field enters the key unless its metadata says otherwise (`settings`)."""

    prompts: tuple[str, ...]
    samples: int = field(default=8, metadata=IN_MANIFEST_ONLY)  # trajectories; trajectory i uses seed + i and prompts[i % len(prompts)]
    steps: int | None = None  # denoising steps; None: the model's default
    guidance: float | None = None  # classifier-free guidance scale; None: the model's default
    seed: int = 0  # seed of trajectory 0
    negative_prompt: str = ""
    height: int | None = None  # pixels; None: the model's native size
    width: int | None = None
    record: tuple[str, ...] = ("x0", "xt")  # per-step tensors to keep: predicted x0 and the input x_t
    keep_every: int = 1  # keep every k-th step (the last step is always kept)
    store_dtype: str = "float16"  # float16 halves the disk size; float32 keeps it exact
    batch_size: int = field(default=8, metadata=NOT_RECORDED)  # trajectories per sampler call

    def __post_init__(self) -> None:
        if not self.prompts:
            raise UsageError("no prompt given")
        for p in self.prompts:
            if not p.strip():
                raise UsageError("empty prompt: give the concept as text, e.g. 'a person'")
        for name in ("samples", "batch_size", "keep_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {self.steps})")
        if self.guidance is not None and self.guidance < 0:
            raise UsageError(f"--guidance must be 0 or more (got {self.guidance})")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise UsageError(f"--{name} must be a multiple of 8 and at least 8 (got {v})")
        bad = [r for r in self.record if r not in RECORDABLE]
        if bad or not self.record:
            raise UsageError(f"--record takes a comma list of {', '.join(RECORDABLE)} (got {','.join(self.record)})")
        if self.store_dtype not in ("float16", "float32", "bfloat16"):
            raise UsageError(f"--store-dtype must be float16, float32 or bfloat16 (got {self.store_dtype})")

    def resolved(self, model: LoadedModel) -> HarvestConfig:
        """Fill the model-dependent defaults."""
        size = native_size(model.pipe)
        return HarvestConfig(
            **{
                **asdict(self),
                "steps": self.steps if self.steps is not None else model.default_steps,
                "guidance": self.guidance if self.guidance is not None else model.default_guidance,
                "height": self.height or size,
                "width": self.width or size,
            }
        )


@dataclass(frozen=True)
class HarvestResult:
    """What `run` produced: the artifact, and whether it was already there."""

    key: str
    path: Path
    manifest: dict[str, Any]
    cached: bool
    computed: int  # trajectories computed by this call
    seconds: float


@dataclass
class Harvest:
    """A loaded harvest: tensors stacked over trajectories, in trajectory order."""

    manifest: dict[str, Any]
    timesteps: torch.Tensor  # (T,) timesteps of the kept steps
    seeds: torch.Tensor  # (N,)
    prompt_index: torch.Tensor  # (N,) index into manifest["prompts"]
    final: torch.Tensor  # (N, C, h, w) the sampler's final latent
    x0: torch.Tensor | None = None  # (N, T, C, h, w)
    xt: torch.Tensor | None = None  # (N, T, C, h, w)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def harvest_key(model: LoadedModel, cfg: HarvestConfig) -> str:
    return store.make_key({"format": HARVEST_FORMAT, "model": model.identity(), "settings": key_settings(cfg)})


# ---------------------------------------------------------------- recording


def _sample_batch(model: LoadedModel, cfg: HarvestConfig, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Run the pipeline for trajectories `indices` and return their shard tensors."""
    pipe = model.pipe
    gens = generators(model.device, (cfg.seed + i for i in indices))
    prompts = [cfg.prompts[i % len(cfg.prompts)] for i in indices]
    with StepRecorder(pipe.scheduler, keep_xt="xt" in cfg.record) as rec, learned_words(model, prompts), torch.inference_mode():
        final = pipe(
            prompt=prompts,
            negative_prompt=[cfg.negative_prompt] * len(indices) if cfg.negative_prompt else None,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            height=cfg.height,
            width=cfg.width,
            generator=gens,
            output_type="latent",
            **pipeline_kwargs(pipe),
        ).images
    final = unpack(pipe, final, cfg.height, cfg.width)  # FLUX's packed latents on the (C, h, w) grid
    n_steps = len(rec.timesteps)
    kept = [s for s in range(n_steps) if s % cfg.keep_every == 0 or s == n_steps - 1]
    dtype = getattr(torch, cfg.store_dtype)
    out = {
        "final": final.to(dtype),
        "seeds": torch.tensor([cfg.seed + i for i in indices], dtype=torch.int64),
        "prompt_index": torch.tensor([i % len(cfg.prompts) for i in indices], dtype=torch.int64),
        "timesteps": torch.tensor([rec.timesteps[s] for s in kept], dtype=torch.int64),
    }
    if rec.sigmas:  # flow matching: the exact noise level of each kept step (timesteps are sigma * 1000, rounded down)
        out["sigmas"] = torch.tensor([rec.sigmas[s] for s in kept], dtype=torch.float32)
    if "x0" in cfg.record:
        out["x0"] = torch.stack([unpack(pipe, rec.x0[s], cfg.height, cfg.width) for s in kept], dim=1).to(dtype)
    if "xt" in cfg.record:
        out["xt"] = torch.stack([unpack(pipe, rec.xt[s], cfg.height, cfg.width) for s in kept], dim=1).to(dtype)
    return out


# ---------------------------------------------------------------- shards


def _batches(indices: list[int], size: int) -> list[list[int]]:
    """Split sorted indices into contiguous runs of at most `size`."""
    out: list[list[int]] = []
    for i in indices:
        if out and len(out[-1]) < size and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _work(done: list[tuple[int, int]], n: int, batch_size: int, proc: int, world: int) -> list[list[int]]:
    """This process's batches of missing trajectories.

    Trajectories are cut into fixed chunks [j*B, (j+1)*B); chunk j belongs to process j % world,
    so processes never compute the same trajectory, however late each one starts.
    """
    have = {i for a, b in done for i in range(a, b)}
    batches: list[list[int]] = []
    for j, start in enumerate(range(0, n, batch_size)):
        if j % world == proc:
            batches.extend(_batches([i for i in range(start, min(start + batch_size, n)) if i not in have], batch_size))
    return batches


def run(model: LoadedModel, cfg: HarvestConfig, progress: Progress | None = None, on_wait=None) -> HarvestResult:
    """Harvest `cfg.samples` trajectories of `model`, reusing and completing what the store has.

    Under `accelerate launch` the main process holds the key's lock for the whole launch (so a
    second launch on the same key waits instead of writing overlapping shards); each process
    computes its own share and writes its own shards; the main process writes the manifest.
    A damaged manifest or shard is reported through `on_wait` and computed again.
    """
    check_guidance(model, cfg.guidance)
    check_size(model, cfg.height, cfg.width)
    cfg = cfg.resolved(model)
    key = harvest_key(model, cfg)
    art = store.artifact("harvest", key)
    proc, world = processes()
    started = time.perf_counter()
    guard = art.lock(on_wait=on_wait) if proc == 0 else contextlib.nullcontext()
    with guard:
        barrier(world)  # the other processes start once the main one holds the lock
        # 1. what is there already (damaged parts dropped), and this process's share of what is missing
        if proc == 0:
            _heal(art, on_wait)
        barrier(world)
        previous = art.manifest() if art.exists() else {}
        batches = _work(shard_ranges(art.path), cfg.samples, cfg.batch_size, proc, world)
        mine = sum(len(b) for b in batches)
        timesteps = previous.get("timesteps") or None
        checksums = dict(previous.get("checksums") or {})
        if batches:
            capacity.check_disk(art.path, capacity.harvest_bytes(model, cfg, mine), f"harvesting {mine} trajectories")
        if batches and proc == 0:
            # 2. the manifest first, so an interrupted artifact still says what it is
            art.write_manifest(_manifest(model, cfg, art, complete=False, timesteps=timesteps, checksums=checksums))
        done = 0
        if progress and batches:
            progress(done, mine)
        # 3. sample batch by batch, each batch one atomic shard with its checksum in the manifest
        for batch in batches:
            tensors = _sample_batch(model, cfg, batch)
            timesteps = tensors["timesteps"].tolist()
            name = shard_name(batch[0], batch[-1] + 1)
            store.write_tensors(art.path / name, tensors, {"format": str(HARVEST_FORMAT)})
            checksums[name] = sha256(art.path / name)
            if proc == 0:
                art.write_manifest(_manifest(model, cfg, art, complete=False, timesteps=timesteps, checksums=checksums))
            done += len(batch)
            if progress:
                progress(done, mine)
        computed = mine
        if world > 1:
            from accelerate.utils import gather_object

            barrier(world)
            computed = sum(gather_object([mine]))
            timesteps = timesteps or next((t for t in gather_object([timesteps]) if t), None)
            for part in gather_object([checksums]):
                checksums.update(part)
        # 4. the manifest records the complete state
        if proc == 0:
            manifest = art.manifest() if art.exists() else {}
            if computed or manifest.get("samples", 0) < cfg.samples or not manifest.get("complete"):
                art.write_manifest(_manifest(model, cfg, art, complete=True, timesteps=timesteps, checksums=checksums))
        barrier(world)
        manifest = art.manifest()
        barrier(world)  # every process has read the manifest before the main one lets the lock go
    return HarvestResult(key, art.path, manifest, cached=computed == 0, computed=computed, seconds=time.perf_counter() - started)


def _heal(art: store.Artifact, say) -> None:
    """Drop what cannot be trusted: a damaged manifest (the whole artifact), then each damaged shard."""
    if store.heal(art, say) or not art.exists():
        return
    for (a, b), problem in problems(art.path, art.manifest()).items():
        if say is not None:
            say(f"harvest {art.key}: {problem}; recomputing it")
        (art.path / shard_name(a, b)).unlink(missing_ok=True)


def _manifest(model: LoadedModel, cfg: HarvestConfig, art: store.Artifact, *, complete: bool, timesteps,
              checksums: dict[str, str]) -> dict[str, Any]:
    ranges = shard_ranges(art.path)
    available = len(set(i for a, b in ranges for i in range(a, b)))
    previous = art.manifest() if art.exists() else {}
    settings = manifest_settings(cfg)
    return {
        "created": previous.get("created", time.time()),
        "updated": time.time(),
        "model": model.identity(),
        "prompts": list(cfg.prompts),
        "settings": settings,
        "samples": available,
        "steps": cfg.steps,
        "timesteps": timesteps or [],
        "record": list(cfg.record),
        "complete": complete,
        "shards": [shard_name(a, b) for a, b in ranges],
        "checksums": {shard_name(a, b): checksums[shard_name(a, b)] for a, b in ranges if shard_name(a, b) in checksums},
        "bytes": sum((art.path / shard_name(a, b)).stat().st_size for a, b in ranges),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"conceptkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------- reading


def load_harvest(path: Path, samples: int | None = None, names: Sequence[str] = ("x0", "xt")) -> Harvest:
    """Read a harvest folder's first `samples` trajectories (all if None) into one `Harvest`.

    Every shard read is checked first (header, shapes, dtypes, checksum where the manifest has
    one); overlapping or damaged shards make it a `DamagedArtifactError` naming the file.
    """
    path = Path(path)
    art = store.Artifact("harvest", path.name, path)
    manifest = art.manifest()
    ranges = shard_ranges(path)
    if overlaps(ranges):
        (a, b), (c, d) = overlaps(ranges)[0]
        raise art.damaged(f"shards {shard_name(a, b)} and {shard_name(c, d)} overlap (two runs wrote it at once)")
    wanted = [(a, b) for a, b in ranges if samples is None or a < samples]
    bad = problems(path, {**manifest, "checksums": {k: v for k, v in (manifest.get("checksums") or {}).items()
                                                    if any(k == shard_name(a, b) for a, b in wanted)}})
    bad = {r: p for r, p in bad.items() if r in wanted}
    if bad:
        raise art.damaged(next(iter(bad.values())))
    parts: dict[str, list[torch.Tensor]] = {}
    timesteps, extra = None, {}
    count = 0
    for a, b in wanted:
        if a != count:
            raise art.damaged(f"trajectories {count}..{a - 1} are missing before {shard_name(a, b)}")
        try:
            with safe_open(str(path / shard_name(a, b)), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name == "timesteps":
                        timesteps = f.get_tensor(name)
                    elif name == "sigmas":
                        extra = {"sigmas": f.get_tensor(name)}
                    elif name in ("final", "seeds", "prompt_index") or name in names:
                        parts.setdefault(name, []).append(f.get_tensor(name))
        except Exception as exc:  # noqa: BLE001 - a damaged shard must say where it is
            raise art.damaged(f"cannot read {shard_name(a, b)}: {exc}") from exc
        count = b
    if timesteps is None:
        raise StoreError(f"harvest {path.name} has no shards; run `conceptkit harvest` again to complete it")
    cat = {k: torch.cat(v)[: samples or count] for k, v in parts.items()}
    return Harvest(
        manifest=manifest,
        timesteps=timesteps,
        seeds=cat["seeds"],
        prompt_index=cat["prompt_index"],
        final=cat["final"],
        x0=cat.get("x0"),
        xt=cat.get("xt"),
        extra=extra,
    )
