"""What a Mamba layer keeps for its backward: a structural bound on the saved activations (#14 item 3).

The bytes of every distinct storage that autograd saves during one forward are counted with
``torch.autograd.graph.saved_tensors_hooks`` and divided by B * T * d_model. On the PyTorch path
under bf16 autocast the layer keeps its input (2 bytes), in_proj's output x, z (8; z and the conv's
recomputation read it), the scan's output (4), the small B, C, dt rows and the chunk-start states;
the conv output u and the step delta (4 + 4) are kept as recipes (``seqblocks.layers.recompute``),
which the counting below sees through. Before the conv was recomputed in backward and the chunk starts
stopped holding their whole chunk's states it was 142 bytes per element; 32 before u and delta became
recipes; now about 24.

Shapes: B batch, T time, D model width.
"""

from __future__ import annotations

import pytest
import torch

from seqblocks.layers import recompute
from seqblocks.layers.mixers import mamba as mamba_module
from seqblocks.layers.mixers.mamba import Mamba


def _saved_bytes(fn, monkeypatch) -> tuple[int, torch.Tensor]:
    """(bytes of the distinct storages autograd keeps while ``fn`` runs, fn's result): what the saved-tensor
    hooks keep as tensors, inside the layer's ``RecomputedSaves`` region (recipes not counted) and outside."""
    sizes: dict[int, int] = {}

    def record(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            sizes[st.data_ptr()] = max(sizes.get(st.data_ptr(), 0), st.nbytes())
        return t

    class Counted(recompute.RecomputedSaves):
        def _pack(self, t):
            return record(super()._pack(t))

    monkeypatch.setattr(mamba_module, "RecomputedSaves", Counted)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        out = fn()
    return sum(sizes.values()), out


@pytest.mark.parametrize(("autocast", "bound"), [(True, 28), (False, 52)])
def test_saved_activations_per_layer_are_bounded(autocast, bound, monkeypatch):
    torch.manual_seed(0)
    B, T, D = 2, 256, 64
    layer = Mamba(D)
    x = torch.randn(B, T, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        n, y = _saved_bytes(lambda: layer(x), monkeypatch)
    per_element = n / (B * T * D)
    assert per_element < bound, f"Mamba saves {per_element:.1f} bytes per (b, t, d_model), bound {bound}"
    # no saved tensor holds [B, T, E, N] states, and the recomputing backward still gives gradients
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.conv_weight.grad is not None and layer.conv_weight.grad.abs().sum() > 0


def test_recomputed_conv_gives_the_same_gradients():
    """The checkpointed conv (training) and the plain one (under torch.no_grad the layer runs it directly)
    give identical outputs, and the gradients through the recomputation pass gradcheck (float64)."""
    torch.manual_seed(1)
    layer = Mamba(32, d_state=8).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        y_plain = layer(x)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda inp: layer(inp).sum(), (x[:1, :5].detach().requires_grad_(),))
