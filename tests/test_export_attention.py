"""The export-time attention (:mod:`handclip.models.export_attention`): the same numbers as PyTorch's
``MultiheadAttention`` where it applies, PyTorch's module itself everywhere else, and a graph with fewer copies."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from handclip.models.encoder import zero_shot_encoder
from handclip.models.export_attention import ExportAttention, export_ready


def reference_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Batch-first self-attention written out by its definition (softmax(q k^T / sqrt(d)) v per head)."""
    batch, tokens, width = x.shape
    heads, d = attn.num_heads, width // attn.num_heads
    q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).double().chunk(3, dim=-1)
    out = torch.empty(batch, tokens, width, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[b, :, cols] @ k[b, :, cols].T / d ** 0.5, dim=-1)
            out[b, :, cols] = weights @ v[b, :, cols]
    return out @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()


@pytest.mark.parametrize("width,heads", [(64, 4), (48, 1)])
def test_it_computes_self_attention_as_defined(width, heads):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(width, heads, batch_first=True).eval()
    x = torch.randn(3, 7, width)
    got, weights = ExportAttention(attn)(x, x, x, need_weights=False)
    assert weights is None
    assert torch.allclose(got.double(), reference_attention(attn, x), atol=1e-5)
    assert torch.allclose(got, attn(x, x, x, need_weights=False)[0], atol=1e-5)


def test_anything_else_goes_to_pytorchs_module_unchanged():
    torch.manual_seed(1)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    wrapped = ExportAttention(attn)
    x, y = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    mask = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)
    for args, kwargs in [((x, x, x), {"attn_mask": mask, "need_weights": False}),
                         ((x, y, y), {"need_weights": False}),
                         ((x, x, x), {"need_weights": True})]:
        got, want = wrapped(*args, **kwargs), attn(*args, **kwargs)
        assert torch.equal(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)
    for module in (nn.MultiheadAttention(32, 4), nn.MultiheadAttention(32, 4, batch_first=True, kdim=16, vdim=16),
                   nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True), nn.Linear(4, 4)):
        assert not ExportAttention.fits(module)


def test_the_export_copy_embeds_the_same_and_leaves_the_model_alone():
    torch.manual_seed(0)
    encoder = zero_shot_encoder("HandCLIP-Tiny", None).eval()
    ready = export_ready(encoder)
    kinds = collections.Counter(type(m).__name__ for m in ready.modules())
    assert kinds["ExportAttention"] == sum(isinstance(m, nn.MultiheadAttention) for m in encoder.modules()) > 0
    assert not any(isinstance(m, ExportAttention) for m in encoder.modules())
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(ready.embed(images), encoder.embed(images), atol=1e-5)
    assert ready.state_dict().keys() != encoder.state_dict().keys()  # wrapped names: only the copy is changed
    assert all(torch.equal(p, q) for p, q in zip(ready.parameters(), encoder.parameters()))


def test_the_exported_graph_has_two_transposes_per_block_fewer_than_six(tmp_path):
    import onnx

    from handclip.models.onnx_export import export_onnx

    torch.manual_seed(0)
    encoder = zero_shot_encoder("HandCLIP-Tiny", None).eval()
    report = export_onnx(encoder, tmp_path / "tiny.onnx")  # checked against PyTorch (parity within 1e-4)
    assert report["parity_max_abs_diff"] <= 1e-4
    blocks = len(encoder.visual.transformer.resblocks)
    transposes = sum(node.op_type == "Transpose" for node in onnx.load(str(tmp_path / "tiny.onnx")).graph.node)
    assert transposes <= 3 * blocks + 1 < 8 * blocks  # PyTorch's module exports 8 per block
