"""SliderSpace training: principal directions, the slider loss, and K sliders trained in one pass.

Gandikota et al. (2025), "SliderSpace", Sec. 3: embed the predicted x0 of sampled trajectories,
take the top-K principal directions v_k of the embeddings, and train rank-1 LoRA slider k so
that the embedding shift it causes, phi(x0 with slider k) - phi(x0 without), points along v_k
(cosine loss). Here all K sliders share one UNet batch: each of b harvested (trajectory, step)
pairs is repeated K times and routed to slider k (`SliderBank.route`), and the slider-free
prediction of the b pairs is computed once and shared by the K sliders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conceptkit import store
from conceptkit.diffusion import Conditioning, conditioning, decode, window_steps, x0_from_output  # noqa: F401  window_steps: the slider window
from conceptkit.diffusion_flow import flow_conditioning, flow_predict_x0
from conceptkit.errors import UsageError
from conceptkit.models.flow import is_flow
from conceptkit.sliders.bank import SliderBank

Progress = Callable[..., None]
CHECKPOINT_EVERY = 25  # optimiser steps between training checkpoints
CHECKPOINT_EVERY_S = 60.0  # ... or wall seconds, whichever comes first: a kill loses at most about a minute


# ---------------------------------------------------------------- maths on arrays


@dataclass(frozen=True)
class Directions:
    """Top-K principal directions of an embedding cloud (rows unit length)."""

    components: np.ndarray  # (K, d)
    explained_variance_ratio: np.ndarray  # (K,) share of the total variance
    mean: np.ndarray  # (d,)


DIRECTION_METHODS = ("pca", "ica")


def principal_directions(embeddings: np.ndarray, k: int, *, seed: int = 0, method: str = "pca") -> Directions:
    """The k directions of (M, d) embeddings the sliders are trained along.

    `pca` (SliderSpace Sec. 3.1): the top-k principal components, scikit-learn's full SVD.
    `ica`: the same k-dimensional principal subspace, whitened and rotated to statistically
    independent directions (FastICA's mixing columns), ordered by the variance along each. PCA's
    directions are only defined up to a rotation among components of similar variance, so when
    a concept's factors vary about equally they come out mixed; independent factors are what ICA
    recovers. The subspace is PCA's either way (docs/sliders.md, the PCA stage); ICA's directions need
    not be orthogonal, so their variance shares need not add up to PCA's.

    Args:
        embeddings: (M, d) rows, typically L2-normalised image embeddings.
        k: number of directions; at most min(M - 1, d).
    """
    from sklearn.decomposition import PCA, FastICA

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise UsageError(f"embeddings must be (M, d), got shape {x.shape}")
    if method not in DIRECTION_METHODS:
        raise UsageError(f"--directions must be one of {', '.join(DIRECTION_METHODS)} (got {method!r})")
    available = min(x.shape[0] - 1, x.shape[1])
    if k < 1 or k > available:
        raise UsageError(f"--count must be between 1 and {available} (the directions {x.shape[0]} embeddings of "
                         f"dimension {x.shape[1]} give), got {k}; harvest more --samples for more")
    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(x)
    if method == "pca":
        comps, ratio = pca.components_, pca.explained_variance_ratio_
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FastICA's convergence warning: the rotation is used as it stands
            ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=1000, tol=1e-4).fit(x)
        comps = ica.mixing_.T / np.linalg.norm(ica.mixing_.T, axis=1, keepdims=True)
        centred = x - x.mean(0)
        ratio = (centred @ comps.T).var(0) / centred.var(0).sum()
        order = np.argsort(-ratio, kind="stable")
        comps, ratio = comps[order], ratio[order]
    comps = comps / np.linalg.norm(comps, axis=1, keepdims=True)
    return Directions(comps.astype(np.float32), np.asarray(ratio, np.float64), pca.mean_.astype(np.float32))


def slider_loss(shift: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean of 1 - cos(shift_i, target_i): the SliderSpace alignment loss (Sec. 3.2).

    Args:
        shift: (N, d) embedding with the slider minus embedding without.
        targets: (N, d) the direction each row should move along (its slider's v_k, signed).
    """
    s = shift / (shift.norm(dim=-1, keepdim=True) + eps)  # safe at a zero shift (an identity start)
    t = F.normalize(targets, dim=-1)
    return (1 - (s * t).sum(-1)).mean()


# ---------------------------------------------------------------- the model side


def encode_conditioning(model, prompts: list[str], guidance: float, size: tuple[int, int]) -> Conditioning:
    """Prompt embeddings as the pipeline makes them (empty negative prompt); `size` is (height, width)."""
    if is_flow(model):  # FLUX (guidance embedded, one batch) and SD3 (CFG over [uncond; cond])
        return flow_conditioning(model, prompts, guidance=guidance > 1.0 and model.arch == "sd3")
    return conditioning(model, prompts, size[0], size[1], guidance=guidance > 1.0)


def _select(cond: dict | None, idx: torch.Tensor) -> dict | None:
    return None if cond is None else {k: v[idx] for k, v in cond.items()}


def predict_x0(model, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning, prompt_idx: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """The model's x0 estimate at (x_t, t), with classifier-free guidance as in sampling.

    With guidance the UNet batch is [uncond; cond] (2N), the order diffusers uses, so a routed
    bank needs `indices.repeat(2)`.

    Args:
        xt: (N, C, h, w) latents; t: (N,) timesteps; prompt_idx: (N,) rows of `cond`.
    """
    if is_flow(model):
        return flow_predict_x0(model, xt, t, cond, prompt_idx, guidance)
    unet, sched = model.pipe.unet, model.pipe.scheduler
    dtype = unet.dtype
    x = xt.to(model.device, dtype)
    tt = t.to(model.device)
    if cond.uncond is not None:
        enc = torch.cat([cond.uncond[prompt_idx], cond.cond[prompt_idx]])
        added = None
        if cond.added_cond is not None:
            u, c = _select(cond.added_uncond, prompt_idx), _select(cond.added_cond, prompt_idx)
            added = {k: torch.cat([u[k], c[k]]) for k in c}
        out = unet(torch.cat([x, x]), torch.cat([tt, tt]), encoder_hidden_states=enc, added_cond_kwargs=added).sample
        uncond_out, cond_out = out.chunk(2)
        out = uncond_out + guidance * (cond_out - uncond_out)
    else:
        out = unet(x, tt, encoder_hidden_states=cond.cond[prompt_idx],
                   added_cond_kwargs=_select(cond.added_cond, prompt_idx)).sample
    return x0_from_output(sched, out, x, tt)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    """How the K sliders are optimised; all of it enters the set's key."""

    steps: int = 100  # optimiser steps (each trains every slider on `pairs` samples); fits 10 min on 2 cores
    pairs: int = 2  # harvested (trajectory, step) pairs per optimiser step, shared by the K sliders
    lr: float = 5e-3  # AdamW learning rate of the LoRA factors (few steps: a high rate)
    strength: float = 1.0  # slider strength during training (generation sweeps around it)
    symmetric: bool = True  # also train at -strength toward -v_k, so the slider is a two-way axis
    start: float = 0.1  # sliders act from this fraction of the denoising steps on (the first steps are skipped)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--train-steps must be at least 1 (got {self.steps})")
        if self.pairs < 1:
            raise UsageError(f"--pairs must be at least 1 (got {self.pairs})")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive (got {self.lr})")
        if not self.strength > 0:
            raise UsageError(f"training strength must be positive (got {self.strength})")
        if not 0.0 <= self.start < 1.0:
            raise UsageError(f"--start must be in [0, 1) (got {self.start})")


class PairSource:
    """Draws harvested (x_t, t, prompt) pairs inside the slider window, reproducibly per step."""

    def __init__(self, xt: torch.Tensor, timesteps: torch.Tensor, prompt_index: torch.Tensor, start: float, seed: int):
        self.xt, self.timesteps, self.prompt_index, self.seed = xt, timesteps, prompt_index, seed
        self.first = window_steps(len(timesteps), start)

    def draw(self, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        traj = torch.randint(0, self.xt.shape[0], (n,), generator=g)
        j = torch.randint(self.first, self.xt.shape[1], (n,), generator=g)
        return self.xt[traj, j].float(), self.timesteps[j], self.prompt_index[traj]


def _signs(step: int, n: int, symmetric: bool, seed: int) -> torch.Tensor:
    if not symmetric:
        return torch.ones(n)
    g = torch.Generator().manual_seed(seed * 7_919 + step + 1)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def train_step(model, bank: SliderBank, encoder, pairs: PairSource, cond: Conditioning, guidance: float,
               directions: torch.Tensor, settings: TrainSettings, step: int, sliders: torch.Tensor | None = None) -> torch.Tensor:
    """One forward/backward over all `sliders` (default: every slider of the bank) at once.

    Args:
        directions: (K, d) target directions (all of the bank's sliders).
        sliders: (S,) which sliders take part (the rest keep strength 0): the sequential baseline
            of the benchmark passes one at a time, a process of a slider-parallel run its share.
            Each slider gets the signs and the loss weight it has in the step over all K, so the
            sliders' gradients do not depend on which others share the pass.
    Returns: the loss (a scalar tensor, already backpropagated).
    """
    k_all = bank.num_sliders
    sliders = torch.arange(k_all) if sliders is None else sliders
    s = len(sliders)
    b = settings.pairs
    xt, t, pidx = pairs.draw(step, b)
    # 1. the slider-free prediction, once for the b pairs
    with torch.no_grad():
        base = encoder(decode(model, predict_x0(model, xt, t, cond, pidx, guidance))).float()
    # 2. every pair repeated for each slider, slider-major: row k*b + i is slider k on pair i
    idx = sliders.repeat_interleave(b)
    sign = _signs(step, k_all * b, settings.symmetric, settings.seed).view(k_all, b)[sliders].flatten()
    route = idx.repeat(2) if cond.uncond is not None else idx
    strength = (sign * settings.strength).repeat(2) if cond.uncond is not None else sign * settings.strength
    with bank.route(route, strength.to(model.device)):
        x0 = predict_x0(model, xt.repeat(s, 1, 1, 1), t.repeat(s), cond, pidx.repeat(s), guidance)
    shifted = encoder(decode(model, x0)).float()
    target = directions.to(shifted.device)[idx] * sign.to(shifted.device)[:, None]
    loss = slider_loss(shifted - base.repeat(s, 1).to(shifted.device), target) * (s / k_all)
    loss.backward()
    return loss.detach()


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, bank: SliderBank, opt: torch.optim.Optimizer, step: int, key: str,
                    losses: list[float] | None = None) -> None:
    """Factors, AdamW moments and the losses of steps 0..step-1 in one safetensors file, written atomically (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(bank.parameters()):
        tensors[f"p{i}"] = p.detach()
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"p{i}.{name}"] = st[name]
        if "step" in st:
            tensors[f"p{i}.step"] = torch.as_tensor(st["step"]).float().reshape(1)
    if losses is not None:
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    store.write_tensors(path, tensors, {"step": str(step), "key": key})


def load_checkpoint(path: Path, bank: SliderBank, opt: torch.optim.Optimizer, key: str,
                    losses: list[float] | None = None) -> int:
    """Restore a checkpoint written for the same settings key; returns its step (0 if none fits).

    The losses of the steps before it are appended to `losses` (checkpoints from before losses
    were kept have none: then `losses` stays empty). A checkpoint whose tensors do not match
    the bank's shapes is damaged: training starts over.
    """
    from safetensors import safe_open

    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return 0
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        step = int(meta.get("step", 0))
    except Exception:  # noqa: BLE001 - a damaged checkpoint means start over
        return 0
    params = list(bank.parameters())
    if not all(f"p{i}" in tensors and tensors[f"p{i}"].shape == p.shape for i, p in enumerate(params)) or step < 0:
        return 0
    past = tensors.get("losses")
    if losses is not None and past is not None and past.dim() == 1 and len(past) == step:
        losses.extend(float(x) for x in past)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"p{i}"])
            if f"p{i}.exp_avg" in tensors:
                opt.state[p] = {"exp_avg": tensors[f"p{i}.exp_avg"].to(p), "exp_avg_sq": tensors[f"p{i}.exp_avg_sq"].to(p),
                                "step": tensors[f"p{i}.step"].reshape(()).clone()}
    return step


def train(model, bank: SliderBank, encoder, pairs: PairSource, cond: Conditioning, guidance: float,
          directions: torch.Tensor, settings: TrainSettings, *, checkpoint: Path | None = None, key: str = "",
          checkpoint_every: int | None = None, progress: Progress | None = None,
          sliders: torch.Tensor | None = None) -> list[float]:
    """Optimise all K sliders together (or the share `sliders` of them); resumes from `checkpoint`
    when it was written for `key`.

    Returns the loss of every step of the training, the steps before a resume included (read
    back from the checkpoint; of the share: the K-slider loss is the sum over the shares).
    """
    every = checkpoint_every or CHECKPOINT_EVERY
    last_save = time.monotonic()
    opt = torch.optim.AdamW(bank.parameters(), lr=settings.lr, weight_decay=0.0)
    losses: list[float] = []
    first = load_checkpoint(checkpoint, bank, opt, key, losses) if checkpoint is not None else 0
    if progress:
        progress(first, settings.steps)
    for step in range(first, settings.steps):
        opt.zero_grad(set_to_none=True)
        loss = train_step(model, bank, encoder, pairs, cond, guidance, directions, settings, step, sliders=sliders)
        opt.step()
        losses.append(float(loss))
        due = (step + 1) % every == 0 or time.monotonic() - last_save >= CHECKPOINT_EVERY_S
        if checkpoint is not None and due and step + 1 < settings.steps:
            last_save = time.monotonic()
            save_checkpoint(checkpoint, bank, opt, step + 1, key, losses if len(losses) == step + 1 else None)
        if progress:
            recent = losses[-10:]
            progress(step + 1, settings.steps, loss=sum(recent) / len(recent))
    return losses
