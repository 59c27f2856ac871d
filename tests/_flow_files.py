"""Test helper: an SD3Transformer2DModel's weights in Stability AI's original layout (`joint_blocks.*`), as its
single-file checkpoints hold them; written from that layout's names (x_block / context_block, fused qkv,
adaLN_modulation with shift before scale where diffusers' norm has scale first), not from conceptkit's code."""

from __future__ import annotations

import torch

_BASIC = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
          "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
          "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
          "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
          "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj", "ff.net.0.proj": "x_block.mlp.fc1",
          "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
          "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1"}
_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def _swap(t: torch.Tensor) -> torch.Tensor:
    return torch.cat(t.chunk(2)[::-1])


def sd3_original_state_dict(transformer) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.`-prefixed original-layout tensors of a (non-dual-attention, no qk-norm) SD3 transformer."""
    sd = transformer.state_dict()
    last = len(transformer.transformer_blocks) - 1
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for d, o in _BASIC.items():
        for end in ("weight", "bias"):
            out[f"{o}.{end}"] = _swap(sd[f"{d}.{end}"]) if d == "norm_out.linear" else sd[f"{d}.{end}"]
    for i in range(last + 1):
        for d, o in _BLOCK.items():
            for end in ("weight", "bias"):
                t = sd.get(f"transformer_blocks.{i}.{d}.{end}")
                if t is not None:  # the last block's text stream ends after its attention (context_pre_only)
                    out[f"joint_blocks.{i}.{o}.{end}"] = _swap(t) if (i == last and d == "norm1_context.linear") else t
        for o, parts in _FUSED.items():
            for end in ("weight", "bias"):
                out[f"joint_blocks.{i}.{o}.{end}"] = torch.cat([sd[f"transformer_blocks.{i}.{p}.{end}"] for p in parts])
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}
