"""SliderSpace (Gandikota et al. 2025): K rank-1 LoRA sliders along the principal directions of what a model draws."""
