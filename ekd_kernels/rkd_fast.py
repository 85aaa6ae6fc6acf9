"""RKD without its B x B x D tensors: the compiled op ``ekd_kernels::rkd_forward``.

Same loss as :func:`ekd_kernels.rkd.rkd_loss` (Park et al., CVPR 2019, as the EKD authors use it:
raw features, smooth-L1, distances over their mean, weights 25 and 50, teacher without
gradient), forward and gradient, with O(B^2) memory and O(B^3) arithmetic.  Both terms depend
on the features only through the squared pairwise distances Q; the angle at anchor i between j
and k is the Gram/law-of-cosines form

    e_ij . e_ik = (G_jk - G_ij - G_ik + G_ii) / (d_ij d_ik) = (Q_ij + Q_ik - Q_jk) / (2 d_ij d_ik),

evaluated triplet by triplet in tiles of anchors (csrc/rkd/rkd_cpu.cpp; the per-triplet math is
csrc/rkd/rkd_math.h).  The op returns d loss / d student with the loss, so the backward is a
multiply.  Peak extra memory is about 20 B^2 values (measured: 19 MiB at B = 512, 51 MiB at
B = 1024 in fp32, bench/results/losses_cpu.jsonl at commit 21e1ac4) against the reference's ~6 B^2 D values (3 GiB at B = 512, 12 GiB at 1024).

Where the op comes from: the package extension ``ekd_kernels._C`` when it was built with
``csrc/rkd/*.cpp``; otherwise it is compiled once with ``torch.utils.cpp_extension.load``
(MAX_JOBS honoured) into ``$EKD_RKD_BUILD_DIR`` (default ``<tmp>/ekd_kernels_rkd_jit``), unless
``EKD_RKD_JIT=0``.  The op is CPU only; on other devices (CUDA) ``fast_rkd_loss`` runs the same
math with PyTorch ops in tiles of anchors (``backend="torch"``: O(b B^2) memory for b anchors,
chosen so a tile holds ~4M values), which is also tested on the CPU.

Numerical notes.  Q is computed from the differences themselves, as the reference normalises
the differences themselves: two identical rows give an exact zero difference (cosine 0) in
both.  The reference's distance term expands ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j instead; the two
agree to fp32 rounding except for (near-)duplicate rows, where the reference's value is
rounding noise floored at 1e-12 and this op's is the exact floor.  No double backward: a
second derivative raises, on both paths (the gradient is computed in the forward).

Exact duplicate rows (x_i = x_j): the op's loss equals the reference's; the gradients differ.
The reference's is an artefact of F.normalize's norm floor: below it the norm is the constant
1e-12, so the zero difference has slope 1e12 and the two duplicated rows get large opposite
gradients (norms 1e9 to 1e12 measured at B = 8 to 32; their sum and the other rows are
ordinary).  The op has the same 1/eps terms in d loss / d Q (up to 1e24 where j == k), and
they cancel in the chain to the features only up to rounding: in fp32 it returns 0 on the
duplicated rows and errors up to ~1e3 times the reference's gradient on the others; in fp64
relative errors ~1e-4 on the others and up to a few 1e-2 on the duplicated rows.  The "torch"
path's Gram expansion leaves a rounding-size distance there with a noise direction: its loss
is off by up to ~1e-2 and its gradient is noise.  Remove (or perturb) exact duplicates before
RKD, whichever implementation.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import threading
from typing import Optional

import torch
from torch import nn

from ._autograd import first_order_only, keep_anchors, refuse_forward_mode, refuse_torch_func
from .losses._common import all_finite, check_has_values, compute_dtypes, fp32_under_autocast, nan_unless_finite
from .rkd import check_rkd_weights
from .validation import check_embedding_pair

_OP_NAME = "ekd_kernels::rkd_forward"
_SOURCES = ("rkd_cpu.cpp",)
_lock = threading.Lock()
_state = {"ready": False, "error": None, "origin": None}


def _source_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent / "csrc" / "rkd"


def _op_registered() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(_OP_NAME, "")
        return True
    except RuntimeError:
        return False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = [str(_source_dir() / name) for name in _SOURCES]
    missing = [s for s in sources if not os.path.isfile(s)]
    if missing:
        from .csrc_ops import unavailable_reason

        # (an installed package has no csrc/: its op comes from ekd_kernels._C, and why that is
        # missing is the message worth reading)
        why = unavailable_reason("cpu") or "built without it"
        raise RuntimeError(f"the fast RKD op is not in ekd_kernels._C ({why}) and its sources for a build on "
                           f"first use are not here: {missing}")
    build_dir = pathlib.Path(os.environ.get("EKD_RKD_BUILD_DIR", pathlib.Path(tempfile.gettempdir()) /
                                            "ekd_kernels_rkd_jit"))
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "1")
    cpp_extension.load(name="ekd_kernels_rkd_jit", sources=sources, build_directory=str(build_dir),
                       extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       extra_include_paths=[str(_source_dir())], is_python_module=False, verbose=False)


def _load() -> None:
    """Make ``ekd_kernels::rkd_forward`` available and register its Python half, once."""
    if _state["ready"]:
        return
    with _lock:
        if _state["ready"]:
            return
        origin = "already registered"
        if not _op_registered():
            origin = "ekd_kernels._C"
            try:
                from . import _C  # noqa: F401  (registers the ops it was built with)
            except ImportError:
                pass
        if not _op_registered():
            if os.environ.get("EKD_RKD_JIT", "1") == "0":
                raise RuntimeError("fast RKD op not built into ekd_kernels._C and EKD_RKD_JIT=0 forbids compiling it")
            _jit_build()
            origin = "jit"
        _register_python_half()
        _state.update(ready=True, origin=origin)


def _register_if_built() -> None:
    """At import: when ``ekd_kernels._C`` holds the op, load it and register the Python half now,
    so that ``torch.ops.ekd_kernels.rkd_forward`` never exists without its fake and autograd
    implementations (loading the library takes about a millisecond).  A missing op or extension
    is left to ``_load`` (the JIT build, on first use or in ``FastRKDLoss()``)."""
    with _lock:
        if _state["ready"]:
            return
        origin = "already registered" if _op_registered() else "ekd_kernels._C"
        if not _op_registered():
            try:
                from . import _C  # noqa: F401  (registers the ops it was built with)
            except (ImportError, OSError):
                return
        if _op_registered():
            _register_python_half()
            _state.update(ready=True, origin=origin)


def preload() -> Optional[str]:
    """Make the op ready now (``_load``), so that a first call inside ``torch.compile`` does not
    trace the loading (a lock, maybe a build); returns None, or why it failed (the failure is
    raised again by the first call that needs the op)."""
    try:
        _load()
    except Exception as exc:  # a missing compiler must surface where the op is used, not here
        _state["error"] = f"{type(exc).__name__}: {exc}"
        return _state["error"]
    return None


def op_origin() -> Optional[str]:
    """Where the op came from once loaded ('ekd_kernels._C', 'jit', or 'already registered' when a
    library loaded before registered it), else None."""
    return _state["origin"]


def _register_python_half() -> None:
    @torch.library.register_fake(_OP_NAME)
    def _fake(student, teacher, distance_weight, angle_weight, compute_grad):
        grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
        return student.new_empty(()), grad

    def _setup_context(ctx, inputs, output):
        ctx.compute_grad = inputs[4]
        ctx.save_for_backward(output[1])
        keep_anchors(ctx, inputs[0])  # (first_order_only's refusal of a second derivative hangs on it)

    @first_order_only("fast RKD op", what="fast_rkd_loss", way_out="")
    def _backward(ctx, grad_loss, _grad_of_gradient):
        (grad_student,) = ctx.saved_tensors
        if not ctx.compute_grad:
            raise RuntimeError("rkd_forward ran with compute_grad=False: no gradient to return")
        return grad_loss * grad_student, None, None, None, None

    torch.library.register_autograd(_OP_NAME, _backward, setup_context=_setup_context)


def rkd_forward(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float, angle_weight: float,
                compute_grad: bool):
    """The raw op: (loss, d loss / d student or an empty tensor).  fp32/fp64 CPU tensors."""
    _load()
    return torch.ops.ekd_kernels.rkd_forward(student, teacher, float(distance_weight), float(angle_weight),
                                             bool(compute_grad))


# ----------------------------------------------------------------------------- tiled PyTorch path
_TILE_ELEMENTS = 1 << 22  # b x B x B values per anchor tile (16 MiB per fp32 temporary)


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 from the Gram matrix of the centred rows, accumulated in fp64 (so that plain
    TF32 or fp32 rounding cannot blur small distances), differentiable, diagonal exactly 0."""
    centred = (x - x.mean(0, keepdim=True)).double()
    squared_norms = centred.pow(2).sum(1)
    q = (squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * (centred @ centred.t())).clamp_min(0)
    return (q * (1 - torch.eye(len(x), dtype=q.dtype, device=q.device))).to(x.dtype)


class _AngleSum(torch.autograd.Function):
    """Sum over all triplets of smooth-L1(c_s - c_t) from the squared distances (rkd_math.h),
    b anchors at a time (b x B x B temporaries); d sum / d Q_s accumulated in the same pass."""

    @staticmethod
    def forward(ctx, q_s, q_t, tile):
        batch = q_s.shape[0]
        want_grad = ctx.needs_input_grad[0]

        def reciprocal(q):
            length = q.sqrt()
            return 1 / length.clamp_min(1e-12), torch.where(length >= 1e-12, 1 / q, torch.zeros_like(q))

        inv_s, slope_s = reciprocal(q_s)
        inv_t, _ = reciprocal(q_t)
        total = q_s.new_zeros((), dtype=torch.float64)
        grad = torch.zeros_like(q_s) if want_grad else None
        for start in range(0, batch, tile):
            stop = min(batch, start + tile)
            anchors = torch.arange(start, stop, device=q_s.device)
            local = torch.arange(stop - start, device=q_s.device)

            def cosines(q, inv):
                qi, invi = q[start:stop], inv[start:stop]                       # b x B
                c = (qi.unsqueeze(2) + qi.unsqueeze(1) - q.unsqueeze(0)) * 0.5 * invi.unsqueeze(2) * invi.unsqueeze(1)
                c[local, anchors, :] = 0                                        # j == i: zero difference
                c[local, :, anchors] = 0                                        # k == i
                return c, invi

            c_s, inv_s_i = cosines(q_s, inv_s)
            c_t, _ = cosines(q_t, inv_t)
            z = c_s - c_t
            total += torch.where(z.abs() < 1, 0.5 * z * z, z.abs() - 0.5).sum(dtype=torch.float64)
            if want_grad:
                g = z.clamp(-1, 1)                                              # 0 where j == i or k == i
                cross = 0.5 * g * inv_s_i.unsqueeze(2) * inv_s_i.unsqueeze(1)   # -g dc/dQ_jk
                own = 0.5 * g * c_s
                # dQ_ij (as j) and dQ_ik (as k) are the same sums by the symmetry c_ijk = c_ikj
                grad[start:stop] += 2 * (cross.sum(2) - own.sum(2) * slope_s[start:stop])
                grad -= cross.sum(0)
        ctx.save_for_backward(grad)
        keep_anchors(ctx, q_s)  # (first_order_only's refusal of a second derivative hangs on it)
        return total.to(q_s.dtype)

    @staticmethod
    @first_order_only("fast RKD torch path", what="fast_rkd_loss", way_out="")
    def backward(ctx, grad_sum):
        (grad,) = ctx.saved_tensors
        return grad_sum * grad, None, None


def _rkd_tiled(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float, angle_weight: float,
               tile: Optional[int] = None) -> torch.Tensor:
    """The same loss by PyTorch ops in anchor tiles: any device, autograd for the O(B^2) parts.
    Memory O(b B^2) for the tile of b anchors, O(B^2) otherwise."""
    batch = student.shape[0]
    tile = tile or max(1, _TILE_ELEMENTS // (batch * batch))
    q_s = _squared_distances(student)
    with torch.no_grad():
        q_t = _squared_distances(teacher)

    def normalised(q):
        d = q.clamp_min(1e-12).sqrt() * (1 - torch.eye(batch, dtype=q.dtype, device=q.device))
        # the mean of the positive distances (d >= 0) without a boolean-mask selection, whose
        # data-dependent size torch.compile(fullgraph=True) refuses before torch 2.11 or so
        return d / (d.sum() / (d > 0).sum())

    with torch.no_grad():
        teacher_distances = normalised(q_t)
    distance = torch.nn.functional.smooth_l1_loss(normalised(q_s), teacher_distances)
    angle = _AngleSum.apply(q_s, q_t, tile) / float(batch) ** 3
    return distance_weight * distance + angle_weight * angle


BACKENDS = ("auto", "op", "torch")
#: Forward mode and torch.func: rkd_loss, the authors' formula in PyTorch ops, has them.
_RKD_WAY_OUT = "use rkd_loss"


@fp32_under_autocast
def fast_rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
                  angle_weight: float = 50.0, backend: str = "auto") -> torch.Tensor:
    """RKD loss of one batch (0-d), equal to ``rkd_loss``; gradient to ``student`` only.

    ``backend``: "op" (the compiled CPU op), "torch" (PyTorch ops in anchor tiles, any device,
    O(b B^2) memory for a tile of b anchors; squared distances from an fp64 Gram of the centred
    rows), "auto" (the op on CPU, "torch" elsewhere).  fp16/bf16 inputs are computed in fp32 (the
    gradient returns in the input dtype), fp64 in fp64.  Exact duplicate rows: the op gives their
    zero difference a zero direction, as the reference does, so the loss agrees; the "torch"
    path's Gram expansion leaves a distance of rounding size there, whose direction is noise.
    The gradient agrees in neither (the reference's is ~1e12-scaled by F.normalize's floor, the
    fast paths' is rounding residue of the same terms): see the module docstring.
    """
    check_embedding_pair(student, teacher, what="fast_rkd_loss")
    check_has_values(student, "fast_rkd_loss")
    check_rkd_weights(distance_weight, angle_weight)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "op" if student.device.type == "cpu" else "torch"
    if backend == "op" and student.device.type != "cpu":
        raise RuntimeError(f"the fast RKD op has a CPU kernel only, got a tensor on {student.device}; "
                           "use backend='torch' (or 'auto')")
    compute, teacher = compute_dtypes(student, teacher)
    # (forward mode: the op computes a gradient only for a student that requires one, which a
    # dual tensor does not, so its tangent was dropped, silently; the torch path's angle sum has
    # no jvp, and a jvp staticmethod there would make Dynamo refuse the path's fullgraph compile)
    refuse_forward_mode(student, "fast RKD", what="fast_rkd_loss", way_out=_RKD_WAY_OUT)
    if backend == "torch":
        refuse_torch_func("fast_rkd_loss (its torch path)", way_out=_RKD_WAY_OUT)
        # A non-finite input: the loss NaN and its gradient NaN throughout, as the op and rkd_loss
        # give (the squared distances' clamp passes no gradient for their NaN entries, which left
        # all but the bad column's gradient finite: hence the rule at the input, not the loss).
        # The input multiplied by 1 or NaN (nan_unless_finite on the input: a finite batch's loss
        # and gradient unchanged), not _autograd.nan_gradient_unless: Dynamo refuses its custom
        # jvp, and this path compiles whole with fullgraph; nothing reads the values past a NaN loss.
        finite = all_finite(compute, teacher)
        return nan_unless_finite(_rkd_tiled(nan_unless_finite(compute, finite), teacher, distance_weight,
                                            angle_weight), finite)
    # (vmap alone runs the op through torch's per-sample fallback: exact, if slow)
    refuse_torch_func("fast_rkd_loss", way_out=_RKD_WAY_OUT, derivatives_only=True)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    loss, _ = rkd_forward(compute, teacher, distance_weight, angle_weight, compute_grad)
    return loss


class FastRKDLoss(nn.Module):
    """``FastRKDLoss()(student, teacher)``: RKD with O(B^2) memory (see ``fast_rkd_loss``).

    With backend "auto" or "op" the op is loaded here (built first if ``ekd_kernels._C`` lacks
    it), as ``EKDLoss`` preloads its backend: a first call inside ``torch.compile`` (even
    ``fullgraph=True``) then traces the op, not its loading.  A load failure is raised by the
    first call that needs the op."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_rkd_weights(distance_weight, angle_weight)
        if backend != "torch":
            preload()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return fast_rkd_loss(student, teacher, self.distance_weight, self.angle_weight, self.backend)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, backend={self.backend!r}"


_register_if_built()
