"""Built-in context templates that diversify a concept without a language model."""

from __future__ import annotations

from collections.abc import Sequence

# Contexts in the spirit of SliderSpace's prompt diversification (Gandikota et al. 2025, Sec. 4.1),
# fixed here because these machines cannot call a language model.
TEMPLATES = (
    "{}",
    "a photo of {}",
    "a painting of {}",
    "a drawing of {}",
    "a close-up photo of {}",
    "a photo of {} outdoors",
    "a photo of {} indoors",
    "a black and white photo of {}",
    "a cartoon of {}",
    "a 3d render of {}",
    "a sketch of {}",
    "a watercolour of {}",
)


def expand_templates(concepts: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Each concept in every template, concept-major, duplicates removed."""
    return list(dict.fromkeys(t.format(c) for c in concepts for t in templates))
