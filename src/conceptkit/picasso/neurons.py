"""Concept-neuron statistics per timestep: importance and spatial activation maps Fs of every
cross-attention key/value neuron, on reference images re-noised to each harvested timestep.

Importance (`grad`) is Cones' first-order estimate of how much closing a neuron (zeroing its
weight row) changes the concept's denoising loss, -sum_j W_cj dL/dW_cj (Liu et al. 2023, Sec. 3.1;
Picasso, Cai et al., TSCones per timestep); `activation` is the cheaper mean |Fs|. Fs is a
neuron's contribution at each position through the concept's tokens (`attention.neuron_contributions`),
averaged over the references. One safetensors file per timestep, written atomically; an
interrupted run resumes with the missing timesteps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conceptkit import harvest as harvest_stage
from conceptkit import store
from conceptkit.diffusion import (
    conditioning,
    encode,
    restore_requires_grad,
    same_weights,
    save_requires_grad,
    training_target,
    words_in_layers,
)
from conceptkit.diffusion_flow import flow_conditioning
from conceptkit.errors import UsageError
from conceptkit.image_folder import folder_digest, read_images
from conceptkit.models.flow import denoiser, is_flow
from conceptkit.models.load import LoadedModel
from conceptkit.picasso import joint
from conceptkit.picasso.attention import ConceptSink, capture, cross_attention_names
from conceptkit.settings import NOT_RECORDED, key_settings
from conceptkit.tensor_files import tensor_problem

NEURONS_FORMAT = 1
IMPORTANCE_MODES = ("grad", "activation")
FP16_LOSS_SCALE = 1024.0  # a float16 backward pass multiplies the loss by this, then divides the gradients


@dataclass(frozen=True)
class NeuronConfig:
    """How to score neurons; every field enters the key unless its metadata says otherwise (`settings`).

    The reference images and their count enter the key through the `reference` record instead."""

    concept: str | None = None  # words of the prompt that are the concept; None: the whole prompt minus special tokens
    importance: str = "grad"  # "grad" (Cones' weight x gradient) or "activation" (mean |Fs|, no backward pass)
    reference_images: str | None = field(default=None, metadata=NOT_RECORDED)  # folder of images; None: the harvest's own final samples
    samples: int | None = field(default=None, metadata=NOT_RECORDED)  # references used; None: all of them
    seed: int = 0  # seed of the noise that re-noises the references (the same noise at every timestep)
    fs_size: int | None = None  # store Fs average-pooled to at most this side; None: each layer's own resolution
    batch_size: int = field(default=8, metadata=NOT_RECORDED)  # references per UNet call

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE_MODES:
            raise UsageError(f"--importance must be one of {', '.join(IMPORTANCE_MODES)} (got {self.importance!r})")
        if self.concept is not None and not self.concept.strip():
            raise UsageError("--concept is empty: give words of the prompt, e.g. --concept circle")
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples must be at least 1 (got {self.samples})")
        if self.fs_size is not None and self.fs_size < 1:
            raise UsageError(f"--fs-size must be at least 1 (got {self.fs_size})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.reference_images is not None and not Path(self.reference_images).is_dir():
            raise UsageError(f"--reference-images {self.reference_images}: not a folder")


@dataclass(frozen=True)
class Block:
    """One projection of one cross-attention layer: neurons [start, stop) of the flat neuron index."""

    layer: str  # module name, e.g. "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    proj: str  # "k" or "v"
    start: int
    stop: int
    height: int  # the layer's spatial size
    width: int

    @property
    def short(self) -> str:
        """'up_blocks.0.attentions.1.transformer_blocks.0.attn2' + 'k' -> 'up0.1.0.k'."""
        parts = self.layer.split(".")
        nums = [p for p in parts if p.isdigit()]
        head = parts[0].split("_")[0] if parts[0] != "mid_block" else "mid"
        return f"{head}{'.'.join(nums)}.{self.proj}"


@dataclass
class NeuronStats:
    """A loaded neurons artifact: per-timestep importance and activation; Fs maps read on demand."""

    key: str
    path: Path
    manifest: dict[str, Any]
    timesteps: np.ndarray  # (T,) in sampling order
    importance: np.ndarray  # (T, N) float64
    activation: np.ndarray  # (T, N) float64, mean |Fs| over references and positions
    blocks: list[Block]

    @property
    def n_neurons(self) -> int:
        return self.blocks[-1].stop

    def maps(self, step: int) -> list[np.ndarray]:
        """Fs of step `step`: one (C, h, w) float32 array per block."""
        with safe_open(str(self.path / _step_name(step)), framework="pt") as f:
            return [f.get_tensor(f"fs.{i}").float().numpy() for i in range(len(self.blocks))]


@dataclass(frozen=True)
class NeuronsResult:
    key: str
    path: Path
    stats: NeuronStats
    cached: bool
    seconds: float


Progress = Callable[[int, int], None]


STEP_TABLES = {"importance": 1, "activation": 1}  # what every timestep file holds: name -> dimensions


def _step_name(step: int) -> str:
    return f"step-{step:04d}.safetensors"


# ---------------------------------------------------------------- concept tokens


def concept_mask(tokenizer, prompts: Sequence[str], concept: str | None,
                 max_length: int | None = None) -> tuple[torch.Tensor, list[list[str]]]:
    """Which token positions of each prompt are the concept: (P, L) float mask and the tokens picked.

    Without `concept`, every token but the special ones (start, end, padding). With it, each of its
    words must occur in every prompt (as the same token sequence); all its occurrences are picked.
    `max_length`: the padded length (default the tokenizer's; a flow pipeline's T5 length).
    """
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=True).input_ids
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    mask = torch.zeros(len(prompts), len(ids[0]))
    picked: list[list[str]] = []
    words = concept.split() if concept else []
    for i, (prompt, row) in enumerate(zip(prompts, ids, strict=True)):
        if not words:
            pos = [j for j, t in enumerate(row) if t not in special]
        else:
            pos = []
            for word in words:
                sub = tokenizer(word, add_special_tokens=False).input_ids
                hits = [j for j in range(len(row) - len(sub) + 1) if sub and row[j : j + len(sub)] == sub]
                if not hits:
                    raise UsageError(f"concept word {word!r} is not in the prompt {prompt!r}")
                pos += [j + d for j in hits for d in range(len(sub))]
        if not pos:
            raise UsageError(f"the prompt {prompt!r} has no tokens to take as the concept")
        mask[i, sorted(set(pos))] = 1.0
        picked.append([tokenizer.convert_ids_to_tokens(row[j]) for j in sorted(set(pos))])
    return mask, picked


# ---------------------------------------------------------------- references


# ---------------------------------------------------------------- one timestep


def step_statistics(model: LoadedModel, refs: torch.Tensor, noise: torch.Tensor, t: int, embeds: torch.Tensor,
                    added: dict, mask: torch.Tensor, importance: str, batch_size: int = 8,
                    fs_size: int | None = None) -> dict[str, torch.Tensor]:
    """Importance, activation and mean Fs of every cross-attention k/v neuron at timestep `t`.

    The loss is the model's own denoising loss on the references re-noised to t, averaged over them
    (Cones, Liu et al. 2023, Eq. 2). grad importance of neuron c: -sum_j W_cj dL/dW_cj (+ its bias
    term), the first-order change of L when row c is zeroed.

    Args:
        refs: (N, C, h, w) clean latents; noise: (N, C, h, w); embeds: (N, L, D); added: SDXL's
            added conditioning per sample or {}; mask: (N, L) concept tokens; importance: "grad" or
            "activation"; batch_size: references per UNet call; fs_size: pool Fs to at most this side.

    Returns:
        {"importance": (Nn,), "activation": (Nn,), "fs.<i>": (C_i, h_i, w_i)} in block order.
    """
    unet, sched, flow = denoiser(model.pipe), model.pipe.scheduler, is_flow(model)
    if flow:  # FLUX / SD3: the text stream's add_k_proj / add_v_proj of each joint attention (picasso/joint.py)
        names, params = joint.concept_layers(unet)
    else:
        names = cross_attention_names(unet)
        params = [m for n in names for m in (unet.get_submodule(n).to_k, unet.get_submodule(n).to_v)]
    sink = ConceptSink(latent_hw=tuple(refs.shape[-2:]))
    n_total = len(refs)
    grads = [torch.zeros_like(p.weight, dtype=torch.float32) for p in params]
    bias_grads = [torch.zeros_like(p.bias, dtype=torch.float32) if p.bias is not None else None for p in params]
    flags = save_requires_grad(unet.parameters())
    use_grad = importance == "grad"
    scale = FP16_LOSS_SCALE if model.dtype == torch.float16 else 1.0
    try:
        for p in unet.parameters():
            p.requires_grad_(False)
        for lin in params:
            for p in lin.parameters():
                p.requires_grad_(use_grad)
        for a in range(0, n_total, batch_size):
            sl = slice(a, a + batch_size)
            x0, eps = refs[sl].to(model.device, model.dtype), noise[sl].to(model.device, model.dtype)
            tt = torch.full((len(x0),), int(t), device=model.device, dtype=torch.long)
            sink.mask = mask[sl].to(model.device)
            kwargs = {"added_cond_kwargs": {k: v[sl] for k, v in added.items()}} if added else {}
            with torch.set_grad_enabled(use_grad), (joint.capture_joint if flow else capture)(unet, sink):
                if flow:
                    out, target = joint.denoising_loss_terms(model, x0, eps, t, joint.rows(embeds, sl))
                else:
                    out = unet(sched.add_noise(x0, eps, tt), tt, encoder_hidden_states=embeds[sl], **kwargs).sample
                    target = training_target(sched, x0, eps, tt)
            if use_grad:
                loss = F.mse_loss(out.float(), target.float(), reduction="sum") / out[0].numel() / n_total
                wanted = [p.weight for p in params] + [p.bias for p in params if p.bias is not None]
                got = torch.autograd.grad(loss * scale, wanted)  # scaled: fp16 gradients would underflow
                for i in range(len(params)):
                    grads[i] += got[i].float() / scale
                rest = iter(got[len(params):])
                for i, bg in enumerate(bias_grads):
                    if bg is not None:
                        bg += next(rest).float() / scale
    finally:
        restore_requires_grad(flags)
    # assemble, in block order: each layer's k then v
    imp, act, out = [], [], {}
    for i, name in enumerate(names):
        h, w = sink.shapes[name]
        for j, proj in enumerate(("k", "v")):
            lin = params[2 * i + j]
            a = sink.activation[name][proj] / n_total
            act.append(a.cpu())
            if use_grad:
                score = -(lin.weight.float() * grads[2 * i + j]).sum(1)
                if lin.bias is not None:
                    score = score - lin.bias.float() * bias_grads[2 * i + j]
                imp.append(score.detach().cpu())
            else:
                imp.append(a.cpu())
            fs = (sink.fs[name][proj] / n_total).reshape(-1, h, w)
            if fs_size is not None and max(h, w) > fs_size:
                fs = F.adaptive_avg_pool2d(fs[None], (min(h, fs_size), min(w, fs_size)))[0]
            out[f"fs.{2 * i + j}"] = fs.to(torch.float16).cpu()
    return {"importance": torch.cat(imp), "activation": torch.cat(act), **out}


# ---------------------------------------------------------------- the stage


def run(model: LoadedModel, harvest_path: Path, cfg: NeuronConfig, progress: Progress | None = None, on_wait=None) -> NeuronsResult:
    """Compute (or reuse) the concept-neuron statistics of a harvest, one timestep at a time."""
    started = time.perf_counter()
    # 1. the harvest: prompts, timesteps, references
    h = harvest_stage.load_harvest(harvest_path, samples=cfg.samples, names=())
    m = h.manifest
    if not same_weights(m.get("model"), model):
        raise UsageError(f"harvest {harvest_path.name} was made with another model ({m.get('model', {}).get('spec')}); pass that --model")
    timesteps = [int(t) for t in h.timesteps.tolist()]
    if not timesteps:
        raise UsageError(f"harvest {harvest_path.name} records no timesteps; run `conceptkit harvest` again")
    prompts = list(m["prompts"])
    height, width = int(m["settings"]["height"]), int(m["settings"]["width"])
    if cfg.reference_images:
        arrays, _ = read_images(Path(cfg.reference_images), "--reference-images", (width, height))
        refs = encode(model, torch.from_numpy(arrays.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2))
        refs = refs[: cfg.samples] if cfg.samples else refs
        prompt_index = torch.arange(len(refs)) % len(prompts)
        reference = {"images": str(Path(cfg.reference_images).resolve()), "digest": folder_digest(Path(cfg.reference_images), "--reference-images")[:16]}  # 16 hex: the key's format 1
    else:
        refs, prompt_index = h.final.float(), h.prompt_index
        reference = {"harvest": harvest_path.name, "samples": len(refs)}
    # 2. the key: what determines the numbers
    settings = key_settings(cfg)
    key = store.make_key({"format": NEURONS_FORMAT, "model": model.identity(), "harvest": harvest_path.name,
                          "timesteps": timesteps, "reference": reference, "settings": settings})
    art = store.artifact("neurons", key)
    # 3. conditioning and concept tokens, per prompt then per reference
    if is_flow(model):
        mask_p, picked = joint.concept_mask(model, prompts, cfg.concept, concept_mask)
    else:
        mask_p, picked = concept_mask(model.pipe.tokenizer, prompts, cfg.concept)
    idx = prompt_index.long()
    mask = mask_p[idx]

    def text(timestep: int | None):
        """Per reference: the prompt's embeddings (a learned word in time takes its vector for `timestep`)."""
        if is_flow(model):
            return joint.rows(flow_conditioning(model, prompts, guidance=False), idx.to(model.device)), {}
        cond = conditioning(model, prompts, height, width, guidance=False, timestep=timestep)
        embeds_p, added_p = cond.cond, cond.added_cond or {}
        return embeds_p[idx.to(embeds_p.device)].detach(), {k: v[idx.to(v.device)].detach() for k, v in added_p.items()}

    embeds, added = text(None)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    noise = torch.randn(refs.shape, generator=gen)
    # 4. every missing timestep, one atomic file each
    computed = 0
    with art.lock(on_wait=on_wait):
        store.heal(art, on_wait)  # a damaged manifest: computed again
        for s in range(len(timesteps)):  # and so is a damaged timestep file
            f = art.path / _step_name(s)
            if f.is_file() and (problem := tensor_problem(f, STEP_TABLES)):
                if on_wait is not None:
                    on_wait(f"neurons {key}: {problem}; recomputing it")
                f.unlink()
        todo = [s for s in range(len(timesteps)) if not (art.path / _step_name(s)).is_file()]
        blocks = art.manifest().get("blocks") if art.exists() else None
        if progress:
            progress(len(timesteps) - len(todo), len(timesteps))
        with words_in_layers(model, prompts):  # a learned word in layers: each layer sees its vector
            for n, s in enumerate(todo):
                if model.tokens_in_time:
                    embeds, added = text(timesteps[s])
                out = step_statistics(model, refs, noise, timesteps[s], embeds, added, mask, cfg.importance, cfg.batch_size, cfg.fs_size)
                store.write_tensors(art.path / _step_name(s), out, {"format": str(NEURONS_FORMAT), "timestep": str(timesteps[s])})
                blocks = blocks or _describe_blocks(model, out)
                computed += 1
                if progress:
                    progress(len(timesteps) - len(todo) + n + 1, len(timesteps))
        if computed or not art.exists():
            if blocks is None:  # every step is on disk but the manifest is not (an interruption in between)
                with safe_open(str(art.path / _step_name(0)), framework="pt") as f:
                    blocks = _describe_blocks(model, {k: f.get_tensor(k) for k in f.keys() if k.startswith("fs.")})
            size = sum(f.stat().st_size for f in art.path.glob("step-*.safetensors"))
            art.write_manifest({
                "created": time.time(), "model": model.identity(), "harvest": harvest_path.name, "prompts": prompts,
                "concept": cfg.concept, "concept_tokens": picked, "settings": settings, "reference": reference,
                "references": len(refs), "timesteps": timesteps,
                "num_train_timesteps": int(model.pipe.scheduler.config.num_train_timesteps), "blocks": blocks, "n_neurons": blocks[-1]["stop"],
                "complete": True, "bytes": size, "bytes_per_step": size // len(timesteps),
            })
    return NeuronsResult(key, art.path, load_stats(art.path), cached=computed == 0, seconds=time.perf_counter() - started)


def _describe_blocks(model: LoadedModel, out: dict[str, torch.Tensor]) -> list[dict]:
    net = denoiser(model.pipe)
    names = joint.joint_attention_names(net) if is_flow(model) else cross_attention_names(net)
    blocks, start = [], 0
    for i, name in enumerate(names):
        for j, proj in enumerate(("k", "v")):
            c, h, w = out[f"fs.{2 * i + j}"].shape
            blocks.append({"layer": name, "proj": proj, "start": start, "stop": start + c, "height": h, "width": w})
            start += c
    return blocks


def load_stats(path: Path) -> NeuronStats:
    """Read a neurons artifact's importance and activation tables (the Fs maps stay on disk)."""
    path = Path(path)
    art = store.Artifact("neurons", path.name, path)
    m = art.manifest()
    imp, act = [], []
    for s in range(len(m["timesteps"])):
        f = path / _step_name(s)
        if not f.is_file():
            raise UsageError(f"neurons artifact {path.name} lacks timestep {s}; run the command again to complete it")
        if problem := tensor_problem(f, STEP_TABLES):
            raise art.damaged(problem)
        with safe_open(str(f), framework="pt") as fh:
            imp.append(fh.get_tensor("importance").double().numpy())
            act.append(fh.get_tensor("activation").double().numpy())
    return NeuronStats(key=path.name, path=path, manifest=m, timesteps=np.asarray(m["timesteps"]), importance=np.stack(imp),
                       activation=np.stack(act), blocks=[Block(**b) for b in m["blocks"]])
