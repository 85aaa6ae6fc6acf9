"""ArcFace head against the direct formula s * cos(arccos(c) + m), and its guards near cos = +-1."""

import copy
import math

import numpy
import pytest
import torch
import torch.nn.functional as F

from ekd_kernels.arcface import ArcFace


def direct_logits(head, embeddings, labels):
    """float64, written from the definition with arccos."""
    x = F.normalize(embeddings.double(), dim=1)
    w = F.normalize(head.weight.detach().double(), dim=1)
    cosine = x @ w.t()
    logits = cosine.clone()
    for i, y in enumerate(labels.tolist()):
        c = float(cosine[i, y])
        theta = math.acos(max(-1.0, min(1.0, c)))
        if head.easy_margin:
            logits[i, y] = math.cos(theta + head.margin) if c > 0 else c
        elif theta + head.margin <= math.pi:
            logits[i, y] = math.cos(theta + head.margin)
        else:
            logits[i, y] = c - head.margin * math.sin(head.margin)
    return head.scale * logits


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("scale,margin", [(64.0, 0.5), (30.0, 0.3), (64.0, 0.0)])
def test_logits_and_loss_match_formula(scale, margin, easy_margin):
    torch.manual_seed(0)
    head = ArcFace(16, 10, scale=scale, margin=margin, easy_margin=easy_margin).double()
    embeddings = torch.randn(40, 16, dtype=torch.float64)
    labels = torch.randint(0, 10, (40,))
    # make some targets nearly aligned / opposed, so that every branch is taken
    embeddings[:3] = head.weight.detach()[labels[:3]] * 3
    embeddings[3:6] = -head.weight.detach()[labels[3:6]]
    expected = direct_logits(head, embeddings, labels)
    # the only deviation allowed: the 1e-7 clamp near |cos| = 1
    torch.testing.assert_close(head.logits(embeddings, labels), expected, atol=scale * 1e-3, rtol=0)
    far = expected.clone()
    torch.testing.assert_close(head(embeddings, labels), F.cross_entropy(far, labels), atol=1e-2, rtol=0)


def test_logits_match_formula_away_from_the_clamp():
    torch.manual_seed(1)
    head = ArcFace(32, 7).double()
    embeddings = torch.randn(30, 32, dtype=torch.float64)
    labels = torch.randint(0, 7, (30,))
    torch.testing.assert_close(head.logits(embeddings, labels), direct_logits(head, embeddings, labels),
                               atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(head(embeddings, labels),
                               F.cross_entropy(direct_logits(head, embeddings, labels), labels),
                               atol=1e-9, rtol=1e-9)


def test_target_logit_decreases_with_angle():
    head = ArcFace(4, 2)
    cosines = torch.linspace(-1, 1, 2001)
    logits = head.target_logit(cosines)
    assert bool((torch.diff(logits) > 0).all())   # monotonic in cos, also past theta + m > pi


def test_gradients_finite_at_cos_plus_minus_one():
    head = ArcFace(8, 3)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        embeddings = torch.stack([head.weight[0], -head.weight[1], head.weight[2] * 5]).clone()
    embeddings.requires_grad_(True)
    loss = head(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    torch.manual_seed(2)
    head = ArcFace(16, 5)
    embeddings = torch.randn(8, 16).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 5, (8,))
    loss = head(embeddings, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, head(embeddings.detach().float(), labels), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert embeddings.grad.dtype == dtype


def test_autocast_keeps_the_head_in_fp32():
    torch.manual_seed(3)
    head = ArcFace(16, 5)
    embeddings, labels = torch.randn(8, 16), torch.randint(0, 5, (8,))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = head.logits(embeddings, labels)
        loss = head(embeddings, labels)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head.logits(embeddings, labels))
    torch.testing.assert_close(loss, head(embeddings, labels))


def test_rejects_bad_input():
    head = ArcFace(8, 3)
    with pytest.raises(ValueError, match="B x 8"):
        head(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        head(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="margin"):
        ArcFace(8, 3, margin=2.0)
    with pytest.raises(ValueError, match="scale"):
        ArcFace(8, 3, scale=0.0)
    # by type: a string "False" applied the easy margin, bools passed as 1.0
    with pytest.raises(ValueError, match="easy_margin must be True or False, got 'False'"):
        ArcFace(8, 3, easy_margin="False")
    for name, value in (("scale", True), ("margin", True), ("margin", "0.5"), ("scale", float("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be"):
            ArcFace(8, 3, **{name: value})


def test_rejects_empty_batch_bad_labels_and_one_dimensional_embeddings():
    head = ArcFace(8, 5)
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="at least one embedding"):
        head(x[:0], torch.zeros(0, dtype=torch.long))
    for label in (5, -1, 10**9):
        labels = torch.tensor([0, 1, label, 2, 3, 4])
        with pytest.raises(ValueError, match=f"got label {label} at position 2"):
            head(x, labels)
        with pytest.raises(ValueError, match="num_classes=5"):
            head.logits(x, labels)
    with pytest.raises(ValueError, match="torch.bool"):
        head(x, torch.tensor([True, False, True, False, True, False]))
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        head(x[0], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        head(x, [0, 1, 2, 3, 4, 0])
    # narrower integer labels in range are fine
    torch.testing.assert_close(head(x, torch.arange(6).remainder(5).to(torch.int8)),
                               head(x, torch.arange(6).remainder(5)))


@pytest.mark.parametrize("num_classes,dtype", [(256, torch.uint8), (1000, torch.uint8), (128, torch.int8),
                                               (40000, torch.int16), (70000, torch.uint16), (70000, torch.uint32),
                                               (70000, torch.uint64)])
def test_labels_of_every_integer_dtype_are_checked_by_value(num_classes, dtype):
    """The range check compared in the labels' own dtype, where num_classes wraps (256 is 0 in
    uint8: every label refused), and uint16/32/64 have no comparison kernel (NotImplementedError)."""
    torch.manual_seed(5)
    head = ArcFace(8, num_classes)
    x = torch.randn(4, 8)
    top = min(num_classes - 1, torch.iinfo(dtype).max)
    labels = torch.tensor([0, 1, top // 2, top])
    torch.testing.assert_close(head(x, labels.to(dtype)), head(x, labels))
    if num_classes <= torch.iinfo(dtype).max:  # a value past the classes that the dtype holds
        with pytest.raises(ValueError, match=f"got label {num_classes} at position 3"):
            head(x, torch.tensor([0, 1, 2, num_classes]).to(dtype))


def test_numpy_integer_sizes_are_taken_as_ints():
    """num_classes = labels.max() + 1 of a numpy array is a numpy integer: it was refused."""
    head = ArcFace(numpy.int32(8), numpy.int64(10))
    assert type(head.num_classes) is int and type(head.embedding_size) is int
    assert head.weight.shape == (10, 8)


def test_compiles_with_fullgraph():
    """The label range check reads the labels in eager mode only: a compiled head stays one graph."""
    torch.manual_seed(4)
    head = ArcFace(8, 5)
    x, labels = torch.randn(6, 8), torch.randint(0, 5, (6,))
    torch.testing.assert_close(torch.compile(head, fullgraph=True)(x, labels), head(x, labels))


@pytest.mark.parametrize("options, match", [
    (dict(embedding_size=True, num_classes=10), "embedding_size must be a positive integer"),
    (dict(embedding_size=8, num_classes=2.5), "num_classes must be a positive integer"),
    (dict(embedding_size=8, num_classes=10, clamp_eps=2.0), r"clamp_eps must be a number in \[0, 1\)"),
    (dict(embedding_size=8, num_classes=10, clamp_eps=-1), r"clamp_eps must be a number in \[0, 1\)"),
])
def test_sizes_and_clamp_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        ArcFace(**options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the head's CUDA path is not run")
def test_cuda_matches_cpu_and_ignores_autocast():
    """The head moved to CUDA: its loss and gradients (embeddings and weight) as near the fp64
    result as the CPU's fp32 ones (within 4x their distance: other kernels, so not bitwise), and
    inside torch.autocast("cuda", bf16), as an AMP step calls it, bitwise the same."""
    torch.manual_seed(4)
    head = ArcFace(16, 10)
    embeddings, labels = torch.randn(40, 16), torch.randint(0, 10, (40,))
    embeddings[:3] = head.weight.detach()[labels[:3]] * 3  # targets nearly aligned: every branch taken

    def step(module, device, autocast=False, as_double=False):
        module.zero_grad()
        dtype = torch.float64 if as_double else torch.float32
        x = embeddings.to(device, dtype).detach().requires_grad_(True)  # a leaf on either device
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = module(x, labels.to(device))
        loss.backward()
        return loss.detach().cpu(), x.grad.cpu(), module.weight.grad.cpu()

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 while comparing with the CPU
    try:
        want = step(head, "cpu")
        moved = copy.deepcopy(head).to("cuda")
        got, amp = step(moved, "cuda"), step(moved, "cuda", autocast=True)
        exact = step(copy.deepcopy(head).double(), "cpu", as_double=True)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert amp[0].dtype == torch.float32
    # The scale (64) multiplies fp32 rounding of the cosines: the GPU's result must be as near the
    # fp64 truth as the CPU's own fp32 result is (within 4x; its summation order differs), not
    # within a fixed atol.
    for value, reference, truth, in_amp in zip(got, want, exact, amp):
        cpu_error = (reference.double() - truth).abs().max().item()
        gpu_error = (value.double() - truth).abs().max().item()
        assert gpu_error <= 4 * cpu_error + 1e-6 * truth.abs().max().item(), (gpu_error, cpu_error)
        assert torch.equal(in_amp, value)
