"""Prompt edits on the toy: the reference a perfect slider is compared with.

Each edit swaps the set's prompt ("a shape") for a prompt naming one value of a factor, from the
sliders' first step on, and is read exactly like a slider at -s and +s: the low value plays -s,
the high value +s. A slider that moves the image just as naming the factor does would score
like this row, so it is the model's own ceiling for the factor table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from conceptkit.diffusion import window_steps
from conceptkit.toy.world import prompt

# (factor, value at -s, value at +s): one pair per core factor
EDITS = (("colour", "red", "blue"), ("shape", "circle", "square"), ("size", "small", "large"), ("horizontal", "left", "right"))


def edit_labels() -> list[str]:
    """The row labels of the edits, "red/blue", ... (the +s word names the factor for `labels_right`)."""
    return [f"{lo}/{hi}" for _, lo, hi in EDITS]


@torch.no_grad()
def draw(model, prompt: str, text: str, seeds: Sequence[int], steps: int, guidance: float, first: int,
         batch_size: int = 32) -> torch.Tensor:
    """(n, 3, H, W) images in [0, 1]: `prompt` for the denoising steps before `first`, `text` from it on."""
    pipe = model.pipe
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i:i + batch_size])
        base, neg = pipe.encode_prompt([prompt] * len(chunk), model.device, 1, True, None)
        edited = pipe.encode_prompt([text] * len(chunk), model.device, 1, False, None)[0]

        def swap(_pipe, j, _t, kw, base=base, neg=neg, edited=edited):  # the next step sees the edited prompt from `first` on
            return {"prompt_embeds": torch.cat([neg, edited if j + 1 >= first else base])}

        gens = [torch.Generator().manual_seed(int(s)) for s in chunk]
        out.append(pipe(prompt_embeds=base if first > 0 else edited, negative_prompt_embeds=neg, generator=gens,
                        num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                        callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images.float().clamp(0, 1).cpu())
    return torch.cat(out)


def edit_images(model, sset, seeds: Sequence[int], *, batch_size: int = 32,
                progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of `EDITS` on `seeds`, with the set's prompt, steps, guidance and window: two (E, n, 3, H, W) tensors."""

    steps, guidance = int(sset.manifest["steps"]), float(sset.manifest["guidance"])
    first = window_steps(steps, float(sset.manifest.get("start", 0.1)))
    ends = []
    for end in (1, 2):
        imgs = []
        for edit in EDITS:
            imgs.append(draw(model, sset.prompt, prompt(**{edit[0]: edit[end]}), seeds, steps, guidance, first, batch_size))
            if progress:
                progress(len(seeds))
        ends.append(torch.stack(imgs))
    return ends[0], ends[1]
