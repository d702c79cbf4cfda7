"""Self-attention written for export: the same computation as :class:`torch.nn.MultiheadAttention` in a form whose
ONNX graph has 2 transposes per block instead of 8.

PyTorch's batch-first ``MultiheadAttention`` exports as a transpose to sequence-first, a 5-D permute of the packed
q/k/v, one transpose per head split, one for ``k``, one back and one to batch-first again: on onnxruntime (CPU) those
copies of ``(batch, tokens, width)`` activations were 23 % of an int8 ViT-B/32 forward. Here the packed projection is
split into heads with one permute and merged back with one transpose. Only the exported copy of a model is changed
(:func:`export_ready`); the model that trains and evaluates keeps PyTorch's module, and the ONNX export is checked
against it.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import nn


class ExportAttention(nn.Module):
    """``MultiheadAttention``'s forward for batch-first self-attention without a mask; anything else (a mask,
    cross-attention, attention weights asked for) goes to the wrapped module unchanged."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.inner = attn
        self.heads = attn.num_heads

    @staticmethod
    def fits(module: nn.Module) -> bool:
        """Whether ``module`` is a ``MultiheadAttention`` this class computes (batch-first, packed projection with
        biases, no added key/value bias, no zero attention)."""
        return (isinstance(module, nn.MultiheadAttention) and module.batch_first and module.in_proj_weight is not None
                and module.kdim == module.vdim == module.embed_dim and module.in_proj_bias is not None
                and module.bias_k is None and not module.add_zero_attn)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        if (key is not query or value is not query or key_padding_mask is not None or attn_mask is not None
                or need_weights or kwargs or (self.training and self.inner.dropout > 0)):
            return self.inner(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              attn_mask=attn_mask, **kwargs)
        batch, tokens, width = query.shape
        qkv = F.linear(query, self.inner.in_proj_weight, self.inner.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, tokens, head width)
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return self.inner.out_proj(out), None


def export_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose fitting ``MultiheadAttention`` modules are :class:`ExportAttention` (same weights)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if ExportAttention.fits(child):
                setattr(parent, name, ExportAttention(child))
    return model
