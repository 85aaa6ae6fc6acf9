"""The host-time shortcuts of the loss's Python wrapper (EKDLoss.forward, ekd_loss, EKDStats,
_autograd) change nothing: the statistics map each packed output to its field, the autocast
region is skipped only where entering it would change nothing, a first-order backward still
refuses a second derivative, and eager_call still sends subclasses to the registered op."""

import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ekd_kernels import EKDStats, functional, reference
from ekd_kernels._autograd import eager_call, first_order_only, keep_anchors
from ekd_kernels.result import _FIELD_NAMES


def _distinct(n, dtype=torch.float32):
    return [torch.full((), float(i), dtype=dtype) for i in range(n)]


@pytest.mark.parametrize("with_ratio", [False, True])
def test_from_counts_fills_each_field_from_its_output(with_ratio):
    """from_counts passes its fields positionally: each must still come from its own output."""
    bs, bt, s, t = (torch.full((3,), float(i)) for i in range(4))
    counts = torch.tensor([10, 11, 12, 13, 14])
    terms = torch.tensor([0.5, 0.25, 0.125])
    stats = EKDStats.from_counts(bs, bt, s, t, counts, terms, terms[2] if with_ratio else None)
    assert stats.batch_student_thresholds is bs and stats.batch_teacher_thresholds is bt
    assert stats.student_thresholds is s and stats.teacher_thresholds is t
    assert [int(getattr(stats, name)) for name in ("num_positive_pairs", "num_negative_pairs",
                                                   "num_selected_negatives", "num_critical_selected")] == [10, 11,
                                                                                                            12, 13]
    assert float(stats.positive_term) == 0.5 and float(stats.negative_term) == 0.25
    if with_ratio:
        assert int(stats.num_critical_pairs) == 14 and float(stats.critical_ratio) == 0.125
    else:
        assert stats.num_critical_pairs is None and stats.critical_ratio is None


def test_field_names_are_the_dataclass_fields_in_order():
    assert _FIELD_NAMES == tuple(f.name for f in dataclasses.fields(EKDStats))


@pytest.mark.parametrize("with_ratio", [False, True])
def test_detach_keeps_every_field(with_ratio):
    values = [x.requires_grad_() * 1 for x in _distinct(12)]  # (non-leaf, with a grad_fn)
    if not with_ratio:
        values[10] = values[11] = None
    stats = EKDStats(*values)
    detached = stats.detach()
    assert type(detached) is EKDStats
    for name, value in zip(_FIELD_NAMES, values):
        copy = getattr(detached, name)
        if value is None:
            assert copy is None
            continue
        assert copy is not value and not copy.requires_grad and copy.grad_fn is None
        assert copy.data_ptr() == value.data_ptr() and torch.equal(copy, value.detach())


def test_autocast_region_skipped_only_where_autocast_is_off():
    cpu = torch.device("cpu")
    assert isinstance(reference.autocast_off(cpu), type(reference._NO_REGION))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(reference.autocast_off(cpu), torch.autocast)  # (entered: turns it off)
    meta = torch.device("meta")
    assert isinstance(reference.autocast_off(meta), type(reference._NO_REGION))  # (as reference.autocast_off)

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():  # (torch.export's pre-dispatch tracing records the region: entered)
        assert isinstance(reference.autocast_off(cpu), torch.autocast)


def test_ekd_loss_under_autocast_turns_it_off():
    """Inside an autocast region the backend still runs with autocast off (the fast path does not
    apply there)."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return "result"

    from ekd_kernels import backends

    original = backends._REGISTRY["reference"]
    backends._REGISTRY["reference"] = backends.Backend("reference", spy, lambda device: None)
    try:
        generator = torch.Generator().manual_seed(0)
        student, teacher = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
        labels = torch.arange(8) // 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            functional.ekd_loss(student, teacher, labels, backend="reference")
        functional.ekd_loss(student, teacher, labels, backend="reference")
    finally:
        backends._REGISTRY["reference"] = original
    assert seen == [False, False]


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        keep_anchors(ctx, x)
        return x * x

    @staticmethod
    @first_order_only("test", what="the test op")
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (2 * x * grad,)


def test_first_order_only_first_derivative_and_refusal():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    (grad,) = torch.autograd.grad(_Square.apply(x).sum(), x)
    assert torch.equal(grad, 2 * x.detach()) and grad.grad_fn is None
    (grad,) = torch.autograd.grad(_Square.apply(x).sum(), x, create_graph=True)
    assert torch.equal(grad.detach(), 2 * x.detach())
    with pytest.raises(RuntimeError, match="the test op has no second derivative"):
        torch.autograd.grad(grad.sum(), x)


def test_eager_call_only_for_plain_tensors():
    plain = torch.zeros(2)
    assert eager_call(plain, None, plain)
    assert eager_call()
    assert not eager_call(plain, torch.nn.Parameter(torch.zeros(2)))

    class Subclass(torch.Tensor):
        pass

    assert not eager_call(None, plain.as_subclass(Subclass))


def test_detach_keeps_a_subclass_and_its_fields():
    """detach on a dataclass subclass of EKDStats returns that subclass with every field, its own
    included (the precomputed names are EKDStats's alone)."""

    @dataclasses.dataclass
    class Tagged(EKDStats):
        extra: torch.Tensor = None

    values = [t.requires_grad_(True) * 1 for t in _distinct(len(_FIELD_NAMES) + 1)]
    tagged = Tagged(*values)
    out = tagged.detach()
    assert type(out) is Tagged and not out.extra.requires_grad and float(out.extra) == float(values[-1].detach())
