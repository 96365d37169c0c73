"""``RecomputedSaves``: tensors saved as recipes are recomputed exactly, and are not kept alive.

Mamba keeps its conv output and step sizes as recipes when training (as mamba_ssm's checkpoint
level 1 does); its gradients are bit-identical to keeping them."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

from seqblocks.layers.mixers import mamba as mamba_module
from seqblocks.layers.mixers.mamba import Mamba
from seqblocks.layers.recompute import RecomputedSaves
from seqblocks.ops._backend import prefer_backend, triton_available

if not INTERPRETER and triton_available():

    def test_under_interpreter():
        """Run this file in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py): the
        kernels' path (conv and scan kernels, whose recomputation must re-enter the backend choice)."""
        run_file_under_interpreter(__file__)


def _grads(model, x, gy, autocast):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    # in the interpreter child the kernels serve the forward; the backward runs outside the region
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            prefer_backend("triton" if INTERPRETER else "auto"):
        y = model(x)
    y.backward(gy.to(y.dtype))
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("autocast", [False, True])
def test_mamba_gradients_are_bit_identical_with_recipes(autocast, monkeypatch):
    torch.manual_seed(0)
    model = Mamba(16, d_state=4, expand=2)
    x, gy = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    with_recipes = _grads(model, x, gy, autocast)
    monkeypatch.setattr(mamba_module, "RecomputedSaves", lambda enabled=True: RecomputedSaves(enabled=False))
    without = _grads(model, x, gy, autocast)
    for a, b in zip(with_recipes, without):
        assert torch.equal(a, b)


def test_recipe_tensors_are_not_kept_alive():
    seen = []

    def make():
        t = torch.randn(3, 4).requires_grad_()
        return t

    w = torch.randn(4, 4, requires_grad=True)
    base = torch.randn(3, 4, requires_grad=True)
    with RecomputedSaves() as saves:
        h = torch.sin(base) * 2  # a fresh intermediate
        saves.recompute(h, lambda: torch.sin(base) * 2)
        seen.append(weakref.ref(h))
        out = (h @ w).sum()  # matmul saves h for w's gradient
    del h
    gc.collect()
    assert seen[0]() is None  # only the recipe is held
    out.backward()
    torch.testing.assert_close(w.grad, (torch.sin(base) * 2).sum(0)[:, None].expand(4, 4).detach())
    assert make().requires_grad


def test_mamba_conv_output_is_freed_after_forward(monkeypatch):
    refs = []
    conv = Mamba._conv

    def spy(self, *args):
        out = conv(self, *args)
        if torch.is_grad_enabled():
            refs.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(Mamba, "_conv", spy)
    torch.manual_seed(0)
    model = Mamba(16, d_state=4, expand=2)
    y = model(torch.randn(2, 9, 16, requires_grad=True))
    gc.collect()
    assert refs and refs[0]() is None
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_disabled_and_no_grad_regions_do_nothing():
    t = torch.randn(2, requires_grad=True) * 1
    with RecomputedSaves(enabled=False) as saves:
        assert saves.recompute(t, lambda: t) is t
        assert saves._hooks is None
    with torch.no_grad(), RecomputedSaves() as saves:
        assert saves._hooks is None
