"""The toy world: generator, captions and the pixel analyser."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from conceptkit.toy import FACTORS, analyse, analyse_batch, caption, describe, prompt, random_captions, render, sample_scenes
from conceptkit.toy.world import BACKGROUNDS_RGB, IMAGE_SIZE, Scene, vocabulary


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return sample_scenes(2000, seed=11)


@pytest.fixture(scope="module")
def images(scenes) -> np.ndarray:
    return render(scenes)


def _accuracy(scenes, readings) -> dict[str, float]:
    return {k: float(np.mean([r.valid and r.factors[k] == getattr(s, k) for s, r in zip(scenes, readings)])) for k in FACTORS}


def test_vocabulary_has_the_required_factors():
    assert len(FACTORS["shape"]) >= 4 and {"circle", "square", "triangle"} <= set(FACTORS["shape"])
    assert len(FACTORS["colour"]) >= 8
    assert FACTORS["size"] == ("small", "medium", "large")
    assert FACTORS["horizontal"] == ("left", "centre", "right") and FACTORS["vertical"] == ("top", "middle", "bottom")
    assert len(FACTORS["background"]) >= 3
    words = vocabulary()
    assert len(words) == len(set(words))


def test_render_shape_and_determinism(scenes, images):
    assert images.shape == (2000, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    again = render(sample_scenes(2000, seed=11))
    assert np.array_equal(images, again)
    assert not np.array_equal(images[:50], render(sample_scenes(50, seed=12)))


def test_factors_are_independent_and_cover_all_values(scenes):
    for name, values in FACTORS.items():
        counts = np.array([sum(getattr(s, name) == v for s in scenes) for v in values])
        assert counts.min() > 0.6 * len(scenes) / len(values)
    # every size fits at every position: shapes never touch the border
    assert all(s.cx - s.side / 2 >= 1.5 and s.cx + s.side / 2 <= IMAGE_SIZE - 1.5 for s in scenes)
    # shape and colour are not associated (chi-square style check on the contingency table)
    table = np.zeros((len(FACTORS["shape"]), len(FACTORS["colour"])))
    for s in scenes:
        table[FACTORS["shape"].index(s.shape), FACTORS["colour"].index(s.colour)] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    assert chi2 < 60  # 21 degrees of freedom; p ~ 1e-5 at 60


def test_analyser_reads_generator_images(scenes, images):
    readings = analyse_batch(images)
    acc = _accuracy(scenes, readings)
    assert all(v >= 0.99 for v in acc.values()), acc
    assert analyse(images[0]) == analyse(images[0])  # deterministic


def test_analyser_tolerates_blur_and_noise(scenes, images):
    rng = np.random.default_rng(0)
    soft = ndimage.gaussian_filter(images[:300].astype(np.float32), sigma=(0, 0.6, 0.6, 0))
    noisy = np.clip(soft + rng.normal(0, 6, soft.shape), 0, 255).astype(np.uint8)
    acc = _accuracy(scenes[:300], analyse_batch(noisy))
    assert all(v >= 0.95 for v in acc.values()), acc


def test_analyser_rejects_what_is_not_one_clean_shape(images):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (20, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    assert not any(r.valid for r in analyse_batch(noise))
    for rgb in BACKGROUNDS_RGB.values():
        blank = np.broadcast_to(np.array(rgb, np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3))
        r = analyse(blank)
        assert not r.valid and r.factors["shape"] is None
    two = np.maximum(images[0], np.roll(images[0], 14, axis=1))  # a second shape pasted beside the first
    assert not analyse(two).valid or analyse(two).factors == analyse(images[0]).factors
    grey_noise = np.clip(127 + rng.normal(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    assert not analyse(grey_noise).valid


def test_captions_mention_random_subsets(scenes):
    s = scenes[0]
    assert caption(s, set()) == "a shape"
    full = caption(s)
    for name in FACTORS:
        assert getattr(s, name) in full.split()
    caps = random_captions(scenes[:500], seed=3, p_mention=0.5)
    assert caps == random_captions(scenes[:500], seed=3, p_mention=0.5)
    lengths = {len(c.split()) for c in caps}
    assert len(lengths) >= 5  # short and long captions both occur
    assert all(set(c.split()) <= set(vocabulary()) for c in caps)
    assert prompt(colour="red") == "a red shape"
    assert prompt(colour="orange", shape="circle") == "an orange circle"
    assert prompt(vertical="top", horizontal="left") == "a shape at the top left"
    with pytest.raises(ValueError):
        prompt(colour="mauve")


def test_describe_lists_factors():
    d = describe()
    assert d["name"] == "toy" and d["factors"] == {k: list(v) for k, v in FACTORS.items()}
    assert "image_size" in d and "description" in d
