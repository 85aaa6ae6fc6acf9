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


if os.environ.get("TRITON_INTERPRET") == "1":
    _check_triton_interpreter()

from ekd_kernels import BACKEND_NAMES
from ekd_kernels.backends import resolve_backend

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


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
