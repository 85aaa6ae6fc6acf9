"""Backbones: output shapes, parameter counts of the published architectures, options."""

import pytest
import torch

from ekd_kernels.models import IR_STAGES, build_backbone, count_parameters, ir, mobilefacenet


def test_mobilefacenet_112():
    model = mobilefacenet().eval()
    assert 0.9e6 < count_parameters(model) < 1.3e6     # MobileFaceNet: ~1 M parameters
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


@pytest.mark.parametrize("depth,millions", [(18, 24.0), (50, 43.6)])
def test_ir_parameter_counts(depth, millions):
    # The published IR-18 / IR-50 (width 64, 112 x 112, 512-d): ~24.0 M and ~43.6 M parameters.
    assert count_parameters(ir(depth)) == pytest.approx(millions * 1e6, rel=0.03)


@pytest.mark.parametrize("name,kwargs", [("ir18", dict(width=8, input_size=32)),
                                         ("IR-34", dict(width=8, input_size=48)),
                                         ("mobilefacenet", dict(input_size=32, embedding_size=128))])
def test_small_variants_train(name, kwargs):
    torch.manual_seed(0)
    model = build_backbone(name, **kwargs)
    size = kwargs["input_size"]
    out = model(torch.randn(4, 3, size, size))
    assert out.shape == (4, kwargs.get("embedding_size", 512))
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="multiple of 16"):
        mobilefacenet(input_size=100)
    with pytest.raises(ValueError, match="depth"):
        ir(42)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet50")
    assert set(IR_STAGES) == {18, 34, 50, 100}


def test_build_backbone_names_an_unknown_one():
    for name in ("ir²", "resnet50", "ir"):
        with pytest.raises(ValueError, match="unknown backbone"):
            build_backbone(name)
