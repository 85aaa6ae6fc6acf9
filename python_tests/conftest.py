"""Shared fixtures: where the golden figures are, and the (backend, device) grid every test runs on.

A new backend gets the whole suite by appearing in ``ekd_kernels.BACKEND_NAMES``; a backend
that cannot run here is skipped with its reason printed (pytest -ra shows it).
"""

import os
import pathlib

import pytest
import torch

# Without a GPU, the Triton kernels run under the interpreter (CPU tensors, slow: the tests keep
# B small there). Triton reads the flag when a kernel is defined, which the backend does on its
# first call, so setting it here, before any test runs, switches the whole suite over.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _check_triton_interpreter():
    """Stop at once, saying why, when this triton's interpreter cannot run a loop over a scalar
    argument: triton 3.6's interpreter does int() on a 1-element array, which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"), and every Triton test
    would fail with that cryptic message instead."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return  # the triton backend reports itself unavailable, and its tests are skipped

    @triton.jit
    def probe_kernel(out_ptr, n):
        total = 0
        for k in range(0, n, 2):
            total += k
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe_kernel[(1,)](out, 5)
    except Exception as exc:  # noqa: BLE001 - any failure here is the environment's
        import numpy

        pytest.exit(f"the Triton interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run "
                    f"the kernels on this machine: {exc!r}. With triton < 3.7 install numpy < 2.4.", returncode=4)


def _patch_each_module_once_per_launch():
    """Make the Triton interpreter patch triton.language once per module and launch, not at
    every device-function call: the same results, about a quarter less interpreter time.

    At a launch the interpreter swaps triton.language's builtins for numpy ones
    (`interpreter._patch_lang(kernel)`), and it does it again at each call of a @triton.jit
    helper, tl.sum and tl.zeros included.  Each time it walks every member of the triton.language
    modules the helper's module can see (about 0.2 ms), and one forward and backward at B = 90
    makes about 1500 such calls.  The repeats change nothing: a patch reads the helper's globals
    only to find tl / tl.core; within a launch nothing restores a patch until the launch ends
    (triton 3.6 and 3.8 restore only the launch's own; 3.2 restores none), and a second patch
    finds the members already swapped.  So a module's first patch in a launch is kept and the
    later ones are skipped.  Keyed by the module (the helper's globals), since tl.sum's module
    patches tl.core, which the kernel's own patch does not.  (A module can see one more module
    later in a launch: the interpreter copies `tl` into standard.py's globals on its first
    rewrite.  That `tl` is the kernel's, already patched by the launch itself.)

    Only the interpreter's work changes, never what the kernels compute;
    test_triton.py::test_interpreter_patching_once_changes_nothing checks it.  Where this
    triton's interpreter lacks the two hooks, nothing is changed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None or getattr(patch_lang, "_ekd_once", False):
        return
    launch = executor.__call__
    patched = set()  # id() of the globals of the modules patched in the current launch

    no_patch = getattr(interpreter, "_LangPatchScope", lambda: None)

    def patch_once(fn):
        key = id(fn.__globals__)
        if key in patched:
            return no_patch()  # an empty scope: only the launch's own patch is restored, by its caller
        scope = patch_once.original(fn)
        patched.add(key)  # after the patch, so that a failed one is tried again
        return scope

    def launch_patching_once(self, *args, **kwargs):
        patched.clear()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.clear()

    patch_once._ekd_once = True
    patch_once.original = patch_lang  # an attribute, so that test_triton.py can count the walks
    launch_patching_once.original = launch
    interpreter._patch_lang = patch_once
    executor.__call__ = launch_patching_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _check_triton_interpreter()
    _patch_each_module_once_per_launch()

from ekd_kernels import BACKEND_NAMES
from ekd_kernels.backends import resolve_backend

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _apply_triton_variant(name: str) -> dict:
    """EKD_TEST_TRITON_VARIANT=NAME: the whole run under one of the GPU lease's A/B variants
    (tools/gpu_exercise.py TRITON_VARIANTS, e.g. tile32): its triton_ekd settings set for the
    session, so that a candidate default runs every test before it ships (tests that set a
    setting themselves still do, and restore the variant's)."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from gpu_exercise import TRITON_VARIANTS, triton_settings

    if name not in TRITON_VARIANTS:
        raise pytest.UsageError(f"EKD_TEST_TRITON_VARIANT={name}: not one of {', '.join(TRITON_VARIANTS)}")
    triton_settings(**TRITON_VARIANTS[name]).__enter__()  # (for the session: never left)
    return TRITON_VARIANTS[name]


_TRITON_VARIANT = os.environ.get("EKD_TEST_TRITON_VARIANT")
_TRITON_VARIANT_SETTINGS = _apply_triton_variant(_TRITON_VARIANT) if _TRITON_VARIANT else None


def pytest_report_header(config):
    if _TRITON_VARIANT:
        return f"EKD_TEST_TRITON_VARIANT={_TRITON_VARIANT}: triton_ekd settings {sorted(_TRITON_VARIANT_SETTINGS)}"
    return None


def find_golden_dir() -> pathlib.Path:
    """../shared/golden relative to the repository root (the checkout sits beside shared/); a
    copy in ./shared/golden (what travels to a remote GPU machine) or $EKD_GOLDEN_DIR also do."""
    candidates = [pathlib.Path(os.environ["EKD_GOLDEN_DIR"])] if os.environ.get("EKD_GOLDEN_DIR") else []
    candidates += [REPO_ROOT.parent / "shared" / "golden", REPO_ROOT / "shared" / "golden"]
    for candidate in candidates:
        if (candidate / "cases.json").is_file():
            return candidate
    return candidates[0]


GOLDEN_DIR = find_golden_dir()

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not (GOLDEN_DIR / "cases.json").is_file():
        raise FileNotFoundError(
            f"golden figures not found at {GOLDEN_DIR}: the repository must sit beside shared/ "
            "(../shared/golden relative to the repository root), or set EKD_GOLDEN_DIR")
    return GOLDEN_DIR


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def require_backend(name: str, device: torch.device) -> str:
    """`name`, when it can run on `device`; otherwise the test is skipped with the reason."""
    try:
        resolve_backend(name, device)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return name


@pytest.fixture(params=BACKEND_NAMES)
def backend(request, device) -> str:
    return require_backend(request.param, device)


@pytest.fixture(params=[name for name in BACKEND_NAMES if name != "reference"])
def fast_backend(request, device) -> str:
    """A backend to check against the reference (the reference itself is not one)."""
    return require_backend(request.param, device)
