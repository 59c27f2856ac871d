"""conceptkit: take a text-to-image diffusion model apart and see what it knows about a concept."""

# Importing conceptkit changes no environment variable: downloads follow huggingface_hub's own
# settings (HF_HUB_OFFLINE, HF_HOME, HF_ENDPOINT) and the CLI's --offline.

__version__ = "0.1.0"
