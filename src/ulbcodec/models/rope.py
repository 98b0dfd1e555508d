"""Rotary position embeddings of the next-frame decoder's transformer (CogVideoX's 3D RoPE)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def rotary_embedding(height: int, width: int, head_dim: int, patch_size: int, device=None) -> Tuple[Tensor, Tensor]:
    """RoPE for one latent frame of h×w latents, repeated for the two temporal tokens.

    Both temporal tokens (anchor and target) get temporal position 0, as in the published
    decoder, so the target is "the same place, one step later" for the attention.
    """
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    grid = (height // patch_size, width // patch_size)
    cos, sin = get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=None, grid_size=grid, temporal_size=1,
                                       grid_type="slice", max_size=grid, device=device)
    return torch.cat([cos, cos]), torch.cat([sin, sin])
