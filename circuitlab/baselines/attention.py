"""ViT attention maps: CLS attention of the last block and attention rollout (Abnar and
Zuidema 2020).

>>> sal = attention_rollout(hm, x)        # (B, 1, H, W)
>>> sal = cls_attention(hm, x)

Both read ``blocks.*.attn.hook_pattern`` (the attention probabilities, B x heads x q x k).
Rollout: per block, heads fused (mean, max or min), the residual added as 0.5 A + 0.5 I,
rows renormalised, the blocks multiplied shallow to deep; the map is the class token's row
over the patch tokens. Neither depends on the target class (that is their known weakness).
"""
from __future__ import annotations

import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ._common import prefix_tokens, to_input_map


def _patterns(hm: HookedModel, x: torch.Tensor) -> list[torch.Tensor]:
    names = [n for n in hm.hook_points if n.endswith(".attn.hook_pattern")]
    if not hm.family.transformer or not names:
        raise CircuitlabError(f"attention maps need a vision transformer with attention "
                              f"probabilities (blocks.*.attn.hook_pattern); {hm.name} is a "
                              f"{hm.family.name} model: use gradcam, ig, rise or extremal")
    with torch.no_grad():
        _, cache = hm.run_with_cache(x, names=names)
    return [cache[n].float() for n in names]


def _cls_row(hm, att: torch.Tensor) -> torch.Tensor:
    n_prefix, side = prefix_tokens(hm, att.shape[-1])
    if n_prefix == 0:
        raise CircuitlabError(f"{hm.name} has no class token whose attention to read; use "
                              f"gradcam, ig, rise or extremal")
    return att[:, 0, n_prefix:].reshape(att.shape[0], side, side)


def cls_attention(hm: HookedModel, x: torch.Tensor, target=None) -> torch.Tensor:
    """The last block's attention from the class token to each patch, mean over heads.
    ``target`` is accepted for a uniform interface and ignored."""
    x = hm.check_input(x)
    att = _patterns(hm, x)[-1].mean(1)
    return to_input_map(_cls_row(hm, att), x.shape[-2:])


def attention_rollout(hm: HookedModel, x: torch.Tensor, target=None, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout; ``discard_ratio`` zeroes that fraction of the weakest attentions per
    block (never the class token's own), as in the common implementation."""
    if head_fusion not in ("mean", "max", "min"):
        raise CircuitlabError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    if not 0 <= discard_ratio < 1:
        raise CircuitlabError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")
    x = hm.check_input(x)
    roll = None
    for att in _patterns(hm, x):
        a = att.mean(1) if head_fusion == "mean" else \
            att.amax(1) if head_fusion == "max" else att.amin(1)
        if discard_ratio:
            flat = a.flatten(1)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                low = flat.topk(k, dim=1, largest=False).indices
                flat = flat.scatter(1, low, 0.0)
                flat[:, 0] = a.flatten(1)[:, 0]
                a = flat.view_as(a)
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        roll = a if roll is None else a @ roll
    return to_input_map(_cls_row(hm, roll), x.shape[-2:])
