import pytest
import torch
import torch.nn.functional as F

from seqblocks import LayerNorm, RMSNorm, norm_registry
from seqblocks.ops import add_norm, add_norm_ref
from seqblocks.testing import assert_close


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_layer_norm_matches_torch(dtype, atol):
    norm = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 16).to(dtype) * 4 + 1
    expected = F.layer_norm(x.float(), (16,), norm.weight, norm.bias, 1e-5)
    out = norm(x)
    assert out.dtype == dtype
    assert_close(out, expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_matches_torch(dtype, atol):
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16).to(dtype) * 4
    expected = F.rms_norm(x.float(), (16,), norm.weight, 1e-6)
    out = norm(x)
    assert out.dtype == dtype and norm.bias is None
    assert_close(out, expected, atol=atol, rtol=atol)


def test_norms_build_from_registry_with_config_eps():
    from seqblocks import BlockConfig

    cfg = BlockConfig(d_model=12, n_heads=2, norm_eps=1e-3)
    for name, cls in (("layer_norm", LayerNorm), ("rms_norm", RMSNorm)):
        norm = norm_registry.get(name).from_config(cfg)
        assert isinstance(norm, cls) and norm.dim == 12 and norm.eps == 1e-3


def test_norm_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"RMSNorm\(8\).*last dimension 9"):
        RMSNorm(8)(torch.randn(2, 9))


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_add_norm_contract(is_rms, residual_in_fp32):
    D = 32
    x = torch.randn(2, 7, D, dtype=torch.bfloat16)
    residual = torch.randn(2, 7, D, dtype=torch.bfloat16)
    weight = torch.randn(D)
    bias = None if is_rms else torch.randn(D)
    y, r = add_norm(x, residual, weight, bias, 1e-5, is_rms, residual_in_fp32, prenorm=True)
    assert y.dtype == torch.bfloat16
    assert r.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    assert_close(r, x.float() + residual.float(), atol=1e-2)
    h = r.float()
    if is_rms:
        expected = F.rms_norm(h, (D,), weight, 1e-5)
    else:
        expected = F.layer_norm(h, (D,), weight, bias, 1e-5)
    assert_close(y, expected, atol=2e-2, rtol=1e-2)
    assert torch.equal(add_norm(x, residual, weight, bias, 1e-5, is_rms, residual_in_fp32), y)


def test_add_norm_without_residual_and_weight():
    x = torch.randn(4, 8, dtype=torch.float64)
    y, r = add_norm(x, None, None, None, 1e-5, True, False, prenorm=True)
    assert torch.equal(r, x)
    assert_close(y, x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5), atol=1e-12)


def test_add_norm_errors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="residual shape"):
        add_norm(x, torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match=r"weight shape \(4,\)"):
        add_norm(x, None, torch.ones(4))
    with pytest.raises(ValueError, match="RMSNorm takes no bias"):
        add_norm(x, None, torch.ones(8), torch.zeros(8), is_rms=True)
    with pytest.raises(ValueError, match="unknown backend"):
        add_norm(x, backend="cuda")
    with pytest.raises(ValueError, match="no Triton kernel"):  # float64 has no kernel
        add_norm(x.double(), backend="triton")


def test_add_norm_gradients_match_autograd_of_unfused_math():
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    y, r = add_norm_ref(x, res, w, b, 1e-5, False, False)
    gy, gr = torch.randn_like(y), torch.randn_like(r)
    grads = torch.autograd.grad((y * gy).sum() + (r * gr).sum(), (x, res, w, b))
    s = x + res
    y2 = F.layer_norm(s, (16,), w, b, 1e-5)
    grads2 = torch.autograd.grad((y2 * gy).sum() + (s * gr).sum(), (x, res, w, b))
    for g, g2 in zip(grads, grads2):
        assert_close(g, g2, atol=1e-10)
