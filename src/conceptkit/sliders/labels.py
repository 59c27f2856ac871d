"""What each slider does: its measured embedding shift, its size, and a word that names it.

A slider's effect is measured like its loss (SliderSpace, Gandikota et al. 2025, Sec. 3.2):
on held-out harvested (x_t, t) pairs, the embedding of the x0 predicted at +s minus the one at
-s. Its label is the vocabulary word whose text-embedding shift (the word's prompt minus the
mean over the vocabulary, in the encoder's joint text-image space) has the highest cosine with
that image shift; words are assigned one-to-one (Hungarian), so labels are unique in a set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from conceptkit.sliders.train import decode, predict_x0
from conceptkit.toy import FACTORS, prompt as toy_prompt

# A few hundred common visual attributes for a real CLIP (colour, material, age, style, light, ...).
CLIP_VOCABULARY = tuple("""
red orange yellow green blue purple pink brown black white gray golden silver beige teal turquoise
maroon navy cyan magenta pastel colourful monochrome vivid muted dark bright pale saturated
young old elderly child baby teenager adult male female smiling serious angry sad happy surprised
bald bearded moustache long-haired short-haired curly-haired blonde brunette redhead freckled wrinkled
glasses sunglasses hat cap helmet scarf tie suit dress jacket coat sweater shirt uniform armour
jewellery earrings necklace makeup tattoo mask hood crown veil
large small tiny huge tall short wide narrow thin fat round square triangular pointed flat curved
close-up portrait full-body profile aerial overhead low-angle wide-angle distant zoomed centred
left right top bottom symmetric cropped tilted upside-down
indoor outdoor city street forest beach desert mountain snow rain fog night sunset sunrise daylight
underwater space sky field garden room kitchen office studio stage ruins countryside
sunny cloudy stormy misty backlit shadowy candlelit neon spotlight glowing dim high-contrast soft-light
photograph painting drawing sketch cartoon anime watercolour oil-painting pencil charcoal pixel-art
3d-render sculpture mosaic collage graffiti comic minimalist abstract surreal realistic impressionist
cubist pop-art vintage retro futuristic cyberpunk steampunk gothic baroque renaissance medieval
fantasy sci-fi noir black-and-white sepia grainy blurry sharp detailed simple cluttered ornate
metal wood glass stone plastic fabric leather fur feathers paper ceramic marble gold crystal
shiny matte rough smooth wet dry dirty clean rusty broken new fluffy furry scaly spotted striped
dog cat bird horse fish flower tree car house robot person crowd group couple family animal
running sitting standing sleeping flying swimming dancing jumping walking eating reading playing
calm busy peaceful chaotic scary cute elegant rugged cosy lonely joyful mysterious dramatic romantic
winter summer autumn spring warm cold hot icy
""".split())


@dataclass(frozen=True)
class Effects:
    """Measured slider effects in embedding space."""

    shift: np.ndarray  # (K, d) mean of phi(x0 at +s) - phi(x0 at -s)
    size: np.ndarray  # (K,) mean ||phi(x0 at +s) - phi(x0 at 0)|| (metrics.effect_size)
    alignment: np.ndarray  # (K,) cosine of shift_k with its direction v_k


def alignment(shift: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (K, d) shifts with (K, d) directions (0 for a zero shift)."""
    s = np.asarray(shift, np.float64)
    d = np.asarray(directions, np.float64)
    denom = np.linalg.norm(s, axis=1) * np.linalg.norm(d, axis=1)
    return np.where(denom > 0, (s * d).sum(1) / np.maximum(denom, 1e-30), 0.0)


@torch.no_grad()
def measure_effects(model, bank, encoder, pairs, cond, guidance: float, directions: np.ndarray, *, n_pairs: int = 8,
            strength: float = 1.0, step: int = 10**6, chunk: int = 64) -> Effects:
    """Shift of every slider on `n_pairs` pairs drawn from `pairs` at `step` (held out from training).

    Args:
        directions: (K, d) the sliders' principal directions.
    """
    k = bank.num_sliders
    xt, t, pidx = pairs.draw(step, n_pairs)
    base = encoder(decode(model, predict_x0(model, xt, t, cond, pidx, guidance))).float().cpu()
    rows = []  # (sign, slider) blocks of n_pairs
    jobs = [(sgn, s) for s in range(k) for sgn in (1.0, -1.0)]
    per = max(1, chunk // n_pairs)
    for i in range(0, len(jobs), per):
        part = jobs[i:i + per]
        idx = torch.tensor([s for _, s in part]).repeat_interleave(n_pairs)
        st = torch.tensor([sgn * strength for sgn, _ in part]).repeat_interleave(n_pairs)
        double = cond.uncond is not None
        with bank.route(idx.repeat(2) if double else idx, (st.repeat(2) if double else st).to(model.device)):
            x0 = predict_x0(model, xt.repeat(len(part), 1, 1, 1), t.repeat(len(part)), cond, pidx.repeat(len(part)), guidance)
        rows.append(encoder(decode(model, x0)).float().cpu().view(len(part), n_pairs, -1))
    emb = torch.cat(rows).view(k, 2, n_pairs, -1)  # (K, +/-, n, d)
    plus, minus = emb[:, 0], emb[:, 1]
    shift = (plus - minus).mean(1).numpy()
    size = (plus - base[None]).norm(dim=-1).mean(1).numpy()
    return Effects(shift, size, alignment(shift, directions))


def assign_labels(scores: np.ndarray, words: list[str]) -> list[str]:
    """One word per slider from a (K, V) score matrix, unique within the set (Hungarian).

    With more sliders than words, the leftovers take their best word with a suffix ("red-2").
    """
    from scipy.optimize import linear_sum_assignment

    scores = np.asarray(scores, np.float64)
    k = scores.shape[0]
    labels: list[str | None] = [None] * k
    rows, cols = linear_sum_assignment(-scores)
    for r, c in zip(rows, cols):
        labels[r] = words[c]
    taken = {lab for lab in labels if lab}
    for r in range(k):
        if labels[r] is None:
            base = words[int(np.argmax(scores[r]))]
            n = 2
            while f"{base}-{n}" in taken:
                n += 1
            labels[r] = f"{base}-{n}"
            taken.add(labels[r])
    return [str(lab) for lab in labels]


def vocabulary_for(encoder_spec: str, prompt: str) -> tuple[list[str], list[str]]:
    """(words, the text each word is embedded as) for labelling in the text space of `encoder_spec`:
    the toy's factor words as toy captions for the toy CLIP, common visual attributes otherwise."""
    if encoder_spec == "toy" or encoder_spec.startswith("toy:"):

        pairs = [(v, toy_prompt(**{f: v})) for f, values in FACTORS.items() for v in values]
        words = [w for w, _ in pairs]
        return words, [t for _, t in pairs]
    words = list(dict.fromkeys(CLIP_VOCABULARY))
    return words, [f"{prompt}, {w.replace('-', ' ')}" for w in words]


def label(effects: Effects, encoder, prompt: str) -> tuple[list[str], list[float], str]:
    """Labels, their scores and the method ("text" or "index" when the encoder has no text tower)."""
    k = len(effects.shift)
    if not encoder.has_text():
        return [f"direction-{i}" for i in range(k)], [0.0] * k, "index"
    words, texts = vocabulary_for(encoder.spec, prompt)
    t = encoder.embed_text(texts).numpy().astype(np.float64)
    t = t - t.mean(0, keepdims=True)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    s = effects.shift / np.maximum(np.linalg.norm(effects.shift, axis=1, keepdims=True), 1e-12)
    scores = s @ t.T
    labels = assign_labels(scores, words)
    best = [float(scores[i, words.index(lab.rsplit("-", 1)[0] if lab not in words else lab)]) for i, lab in enumerate(labels)]
    return labels, best, "text"
