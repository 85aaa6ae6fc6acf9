"""Fast RKD (the compiled op ekd_kernels::rkd_forward) against the reference rkd_loss and the
authors' golden figure: loss (relative 1e-5) and gradient (relative norm 1e-4) in fp32, tight in
fp64; gradcheck; opcheck; bad input.  The op comes from ekd_kernels._C when the package was built
with csrc/rkd, otherwise it is compiled here once (JIT, cached in $EKD_RKD_BUILD_DIR)."""

import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import torch

from ekd_kernels.rkd import rkd_loss
from ekd_kernels.rkd_fast import FastRKDLoss, _rkd_tiled, fast_rkd_loss, rkd_forward

# the compiled op, and the same math by PyTorch ops in anchor tiles (the path used off the CPU)
BACKENDS = ["op", "torch"]

from helpers import assert_grad_close, assert_loss_close, make_batch


@pytest.fixture(scope="module", autouse=True)
def compiled_op():
    try:
        rkd_forward(torch.randn(2, 1), torch.randn(2, 1), 1.0, 1.0, False)
    except Exception as exc:  # pragma: no cover - a missing compiler is a setup problem, say why
        pytest.fail(f"fast RKD op unavailable: {exc}")


def loss_and_grad(fn, student, teacher, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


@pytest.mark.parametrize("batch,student_dim,teacher_dim", [(3, 1, 2), (4, 3, 3), (9, 5, 7), (31, 16, 16),
                                                            (64, 32, 48), (97, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(batch, student_dim, teacher_dim, dtype, backend):
    student, teacher, _ = make_batch(batch, student_dim, teacher_dim, seed=batch, dtype=dtype)
    ref_loss, ref_grad = loss_and_grad(rkd_loss, student, teacher)
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher, backend=backend)
    assert loss.dtype == dtype
    if dtype == torch.float64:
        assert_loss_close(loss, ref_loss, rtol=1e-12)
        assert_grad_close(grad, ref_grad, tol=1e-10)
    else:
        assert_loss_close(loss, ref_loss)
        assert_grad_close(grad, ref_grad)


def test_two_points_have_no_relation_to_distil():
    """B = 2: one distance (normalised to 1 in both) and only degenerate angles: loss 0, gradient
    0 up to rounding (the reference's is rounding noise too, so only its size is compared)."""
    student, teacher, _ = make_batch(2, 3, 3, seed=0)
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("weights", [(25.0, 0.0), (0.0, 50.0), (1.5, 3.0)])
def test_each_term_and_weights(weights):
    student, teacher, _ = make_batch(20, 6, 6, seed=2, dtype=torch.float64)
    ref_loss, ref_grad = loss_and_grad(rkd_loss, student, teacher, distance_weight=weights[0], angle_weight=weights[1])
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher, distance_weight=weights[0], angle_weight=weights[1])
    assert_loss_close(loss, ref_loss, rtol=1e-12)
    assert_grad_close(grad, ref_grad, tol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden(golden_dir, backend):
    case = np.load(golden_dir / "rkd_small.npz")
    student, teacher = torch.from_numpy(case["student"]), torch.from_numpy(case["teacher"])
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher, backend=backend)
    assert_loss_close(loss, torch.tensor(float(case["loss"])))
    assert_grad_close(grad, torch.from_numpy(case["grad_student"]))


def test_duplicate_rows_give_zero_directions_like_the_reference():
    """Two equal rows: their difference is exactly zero, its direction 0 in both implementations
    (integer coordinates keep the reference's Gram expansion exact too).  The gradient there is
    F.normalize's: slope 1 / 1e-12 under the norm floor, so it is ~1e12 in both; it agrees to the
    rounding of such sums (relative 1e-3), the loss to fp64."""
    student = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [3.0, -1.0, 2.0], [0.0, 1.0, 1.0]],
                           dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [2.0, 2.0], [-1.0, 3.0]], dtype=torch.float64)
    ref_loss, ref_grad = loss_and_grad(rkd_loss, student, teacher)
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher)
    assert_loss_close(loss, ref_loss, rtol=1e-12)
    assert torch.isfinite(grad).all()
    assert_grad_close(grad, ref_grad, tol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    student, teacher, _ = make_batch(7, 3, 4, seed=1, dtype=torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: fast_rkd_loss(s, teacher, backend=backend), (student,), eps=1e-6,
                                    atol=1e-6, rtol=1e-4)


def test_tiles_do_not_change_the_torch_path():
    student, teacher, _ = make_batch(13, 5, 6, seed=9, dtype=torch.float64)
    whole_loss, whole_grad = loss_and_grad(_rkd_tiled, student, teacher, distance_weight=25.0, angle_weight=50.0,
                                           tile=13)
    for tile in (1, 4):
        loss, grad = loss_and_grad(_rkd_tiled, student, teacher, distance_weight=25.0, angle_weight=50.0, tile=tile)
        assert_loss_close(loss, whole_loss, rtol=1e-13)
        assert_grad_close(grad, whole_grad, tol=1e-12)


def test_opcheck():
    student, teacher, _ = make_batch(6, 4, 5, seed=3, dtype=torch.float32)
    op = torch.ops.ekd_kernels.rkd_forward.default
    torch.library.opcheck(op, (student.requires_grad_(True), teacher, 25.0, 50.0, True))
    torch.library.opcheck(op, (student.detach(), teacher, 25.0, 50.0, False))


def test_threads_and_strides_do_not_change_the_result():
    student, teacher, _ = make_batch(40, 12, 12, seed=4)
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss_1, grad_1 = loss_and_grad(fast_rkd_loss, student, teacher)
    finally:
        torch.set_num_threads(threads)
    assert_loss_close(loss_1, loss, rtol=1e-6)
    assert_grad_close(grad_1, grad, tol=1e-6)
    wide = torch.zeros(40, 24)
    wide[:, ::2] = student
    loss_strided, grad_strided = loss_and_grad(fast_rkd_loss, wide[:, ::2], teacher.t().contiguous().t())
    assert loss_strided.item() == loss.item()
    torch.testing.assert_close(grad_strided, grad, rtol=0, atol=0)


def test_repeated_runs_are_bitwise_identical():
    """Same inputs, same thread count: the same bits, however the OS schedules the threads (the
    anchor tiles are dealt to the workers' gradient buffers by a fixed rule)."""
    student, teacher, _ = make_batch(100, 8, 8, seed=5)
    first_loss, first_grad = loss_and_grad(fast_rkd_loss, student, teacher)
    for _ in range(6):
        loss, grad = loss_and_grad(fast_rkd_loss, student, teacher)
        assert loss.item() == first_loss.item()
        torch.testing.assert_close(grad, first_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["op", "torch"])
def test_second_derivative_is_refused(backend):
    """The gradient is computed in the forward (in C++, or the torch path's angle sum) and saved:
    differentiating it again (a gradient penalty) must raise, not treat it as a constant, by
    .backward() and by autograd.grad (which runs only the nodes on paths to its inputs)."""
    student, teacher, _ = make_batch(12, 4, 4, seed=6)
    x = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fast_rkd_loss(x, teacher, backend=backend) + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fast_rkd_loss has no second derivative"):
        (grad.pow(2).sum() + x.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fast_rkd_loss has no second derivative"):
        torch.autograd.grad(grad.pow(2).sum(), x, allow_unused=True)
    # under activation checkpointing (each saved tensor unpacked once) a first derivative with
    # create_graph=True is the plain one
    x = student.clone().requires_grad_(True)
    checkpointed = torch.utils.checkpoint.checkpoint(lambda a: fast_rkd_loss(a * 1, teacher, backend=backend), x,
                                                     use_reentrant=False)
    (grad_checkpointed,) = torch.autograd.grad(checkpointed, x, create_graph=True)
    (plain,) = torch.autograd.grad(fast_rkd_loss(x * 1, teacher, backend=backend), x)
    assert torch.equal(grad_checkpointed.detach(), plain)


@pytest.mark.parametrize("backend", ["op", "torch"])
def test_forward_mode_and_torch_func_are_refused(backend):
    """Forward mode has no rule here: a NotImplementedError naming fast_rkd_loss and rkd_loss (which
    has one).  The op computes its gradient only for a student that requires one, which a dual
    tensor does not: it ran without autograd and dropped the tangent (None, torch.func.jvp 0),
    silently.  torch.func's derivative transforms (and every transform on the torch path) are
    refused by name too; vmap alone runs the op exactly, through torch's per-sample fallback."""
    import torch.autograd.forward_ad as forward_ad

    student, teacher, _ = make_batch(8, 4, 4, seed=6)
    tangent = torch.ones_like(student)

    def loss(a):
        return fast_rkd_loss(a, teacher, backend=backend)

    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="fast_rkd_loss has no forward-mode.*rkd_loss"):
        loss(forward_ad.make_dual(student, tangent))
    transforms = ["grad", "jvp"] + (["vmap"] if backend == "torch" else [])
    calls = {"grad": lambda: torch.func.grad(loss)(student),
             "jvp": lambda: torch.func.jvp(loss, (student,), (tangent,)),
             "vmap": lambda: torch.func.vmap(loss)(torch.stack([student, student.flip(0)]))}
    for name in transforms:
        with pytest.raises(NotImplementedError, match="fast_rkd_loss.*(does not run under torch.func|no forward-mode)"):
            calls[name]()
    if backend == "op":
        with warnings.catch_warnings():  # (the per-sample fallback's performance warning)
            warnings.simplefilter("ignore")
            batched = calls["vmap"]()
        assert torch.equal(batched, torch.stack([loss(student), loss(student.flip(0))]))


def test_instruction_set_paths_agree():
    """The triplet loop is compiled for baseline x86-64, AVX2 and AVX-512 and picked at run time;
    the baseline path (forced by EKD_RKD_ISA in a fresh process) gives the same loss and gradient."""
    script = textwrap.dedent("""
        import torch
        from ekd_kernels.rkd_fast import rkd_forward
        g = torch.Generator().manual_seed(0)
        s, t = torch.randn(37, 9, generator=g), torch.randn(37, 5, generator=g)
        loss, grad = rkd_forward(s, t, 25.0, 50.0, True)
        torch.save((loss, grad), "out.pt")
    """)
    with tempfile.TemporaryDirectory() as tmp:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, EKD_RKD_ISA="baseline",
                   PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, check=True,
                       capture_output=True, timeout=300)
        loss_base, grad_base = torch.load(os.path.join(tmp, "out.pt"))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(37, 9, generator=g), torch.randn(37, 5, generator=g)
    loss, grad = rkd_forward(s, t, 25.0, 50.0, True)
    assert_loss_close(loss, loss_base, rtol=1e-6)
    assert_grad_close(grad, grad_base, tol=1e-6)


def test_no_grad_forward_and_module():
    student, teacher, _ = make_batch(16, 8, 8, seed=5)
    with torch.no_grad():
        loss, grad = rkd_forward(student, teacher, 25.0, 50.0, False)
    assert grad.numel() == 0
    assert loss.item() == fast_rkd_loss(student, teacher).item() == FastRKDLoss()(student, teacher).item()
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    FastRKDLoss()(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    student, teacher, _ = make_batch(12, 8, 8, seed=6)
    student, teacher = student.to(dtype), teacher.to(dtype)
    ref_loss, ref_grad = loss_and_grad(rkd_loss, student, teacher)
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad.float(), ref_grad.float(), tol=1e-2)


@pytest.mark.parametrize("backend", ["op", "torch"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_input_gives_nan(backend, where):
    """A NaN loss and a gradient NaN throughout on both paths, as rkd_loss gives (the torch path's
    squared distances clamp their NaN entries' gradient away: 7 of 42 NaN before)."""
    student, teacher, _ = make_batch(7, 6, 6, seed=7)
    (student if where == "student" else teacher)[3, 2] = float("nan")
    student.requires_grad_(True)
    loss = fast_rkd_loss(student, teacher, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(student.grad).all(), student.grad


def test_torch_path_compiles_whole():
    """The torch path (the default off the CPU) under torch.compile(fullgraph=True): the same
    loss and gradient as eager, and still NaN throughout for a non-finite input (its rule is a
    multiply Dynamo traces: an autograd.Function with a custom jvp there made Dynamo refuse it)."""
    student, teacher, _ = make_batch(9, 6, 6, seed=3)
    module = FastRKDLoss(backend="torch")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for bad in (False, True):
        s = student.clone()
        if bad:
            s[4, 1] = float("nan")
        x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        eager, got = module(x, teacher), compiled(y, teacher)
        eager.backward()
        got.backward()
        if bad:
            assert torch.isnan(got) and torch.isnan(y.grad).all()
        else:
            torch.testing.assert_close(got, eager, rtol=1e-6, atol=0)
            torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)


def test_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        fast_rkd_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        FastRKDLoss()(torch.randn(4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least 2"):
        fast_rkd_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="float"):
        fast_rkd_loss(torch.ones(4, 3, dtype=torch.int32), torch.randn(4, 3))
    with pytest.raises(ValueError, match="backend"):
        fast_rkd_loss(torch.randn(4, 3), torch.randn(4, 3), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        FastRKDLoss(backend="triton")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        rkd_forward(torch.randn(4, 3).half(), torch.randn(4, 3).half(), 1.0, 1.0, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_runs_the_tiled_path_and_refuses_the_op():
    student, teacher, _ = make_batch(33, 8, 8, seed=10)
    ref_loss, ref_grad = loss_and_grad(rkd_loss, student, teacher)
    loss, grad = loss_and_grad(fast_rkd_loss, student.cuda(), teacher.cuda())
    assert_loss_close(loss.cpu(), ref_loss)
    assert_grad_close(grad.cpu(), ref_grad)
    with pytest.raises(RuntimeError, match="CPU kernel only"):
        fast_rkd_loss(student.cuda(), teacher.cuda(), backend="op")


def _fresh_process(script):
    """Run `script` in a new interpreter (nothing of ekd_kernels loaded yet), from this checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_first_call_compiled_with_fullgraph():
    """FastRKDLoss() loads the op in __init__: a first call inside torch.compile(fullgraph=True)
    traces the op, not the loading (a lock, which dynamo refuses).  A fresh process: in this one
    the op is already loaded by the module fixture."""
    out = _fresh_process("""
        import torch
        from ekd_kernels import FastRKDLoss, rkd_loss
        g = torch.Generator().manual_seed(0)
        s, t = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
        x = s.clone().requires_grad_(True)
        loss = torch.compile(FastRKDLoss(), fullgraph=True)(x, t)
        loss.backward()
        y = s.clone().requires_grad_(True)
        ref = rkd_loss(y, t)
        ref.backward()
        print(abs(loss.item() - ref.item()) / ref.item(), ((x.grad - y.grad).norm() / y.grad.norm()).item())
    """)
    loss_err, grad_err = map(float, out.split()[-2:])
    assert loss_err < 1e-5 and grad_err < 1e-4


def test_raw_op_has_its_autograd_and_fake_once_visible():
    """The op exists as soon as ekd_kernels._C is loaded; its fake and autograd registrations come
    with it (registered when the package is imported), so the raw op differentiates without
    autograd's 'not registered' warning, before any fast_rkd_loss call."""
    out = _fresh_process("""
        import warnings
        import torch
        import ekd_kernels  # noqa: F401
        from ekd_kernels import rkd_fast
        g = torch.Generator().manual_seed(0)
        s, t = torch.randn(9, 4, generator=g).requires_grad_(True), torch.randn(9, 4, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, grad = torch.ops.ekd_kernels.rkd_forward(s, t, 25.0, 50.0, True)
            loss.backward()
        print(torch.equal(s.grad, grad), rkd_fast.op_origin())
        with torch._subclasses.fake_tensor.FakeTensorMode():
            fake_loss, fake_grad = torch.ops.ekd_kernels.rkd_forward(torch.empty(9, 4), torch.empty(9, 4), 1.0, 1.0,
                                                                      True)
        print(tuple(fake_loss.shape), tuple(fake_grad.shape))
    """)
    lines = out.strip().splitlines()
    assert lines[-2].split()[0] == "True"
    assert lines[-1] == "() (9, 4)"


def test_batch_of_one_names_the_loss():
    with pytest.raises(ValueError, match="fast_rkd_loss needs a batch of at least 2"):
        FastRKDLoss()(torch.randn(1, 3), torch.randn(1, 3))


def test_duplicate_rows_random_features_as_documented():
    """Exact duplicate rows with random (non-integer) features, as the README and the module
    docstring describe them: the op's loss equals the reference's; the reference's gradient on
    the duplicated rows is F.normalize's 1/eps artefact (huge, opposite, ordinary sum); the op's
    fp64 gradient agrees only roughly and its fp32 gradient is 0 on the duplicated rows.  If the
    op changes, update the documentation with this test."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g,
                                                                                      dtype=torch.float64)
    student[1] = student[0]
    ref_loss, ref_grad = loss_and_grad(rkd_loss, student, teacher)
    assert ref_grad[:2].norm(dim=1).min() > 1e8                       # the eps artefact
    assert ref_grad[:2].sum(0).norm() < 1e3 and ref_grad[2:].abs().max() < 1e3
    loss, grad = loss_and_grad(fast_rkd_loss, student, teacher, backend="op")
    assert_loss_close(loss, ref_loss, rtol=1e-12)
    assert_grad_close(grad[2:], ref_grad[2:], tol=1e-3)
    assert_grad_close(grad[:2], ref_grad[:2], tol=1e-1)
    loss_32, grad_32 = loss_and_grad(fast_rkd_loss, student.float(), teacher.float(), backend="op")
    assert_loss_close(loss_32.double(), ref_loss, rtol=1e-6)
    assert grad_32[:2].abs().max().item() == 0.0


def test_jit_build_without_sources_says_why_the_op_is_missing(monkeypatch, tmp_path):
    """An installed package has no csrc/ beside it: the build on first use cannot run, and the
    message says why the op was not in ekd_kernels._C instead of naming a path in site-packages
    only."""
    from ekd_kernels import csrc_ops, rkd_fast

    monkeypatch.setattr(rkd_fast, "_source_dir", lambda: tmp_path / "csrc" / "rkd")
    monkeypatch.setattr(csrc_ops, "_LOAD_ERROR", "the C++ extension ekd_kernels._C failed to load: (test)")
    with pytest.raises(RuntimeError, match=r"fast RKD op is not in ekd_kernels._C \(the C\+\+ extension "
                                           r"ekd_kernels._C failed to load: \(test\)\) and its sources"):
        rkd_fast._jit_build()
