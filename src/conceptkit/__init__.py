"""conceptkit: take a text-to-image diffusion model apart and see what it knows about a concept."""

import os

# These machines cannot download weights. Without this, a missing model makes huggingface_hub
# retry for minutes and can return a broken 2-token tokenizer. It must be set before
# huggingface_hub is imported; a user who can download sets HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
