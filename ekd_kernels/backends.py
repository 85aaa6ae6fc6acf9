"""Backend registry: which implementations of SPEC.md exist, where they run, and which "auto" picks.

A backend is a callable with the signature of ``reference.ekd_reference`` plus an
``unavailable_reason(device)`` that says why it cannot run on a device (None when it can).
New backends register themselves here; the tests are parametrized over ``BACKEND_NAMES``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from .reference import ekd_reference

BACKEND_NAMES = ("reference", "triton", "csrc")

# Fastest first, per device type: "auto" takes the first one available (that takes the dtypes).
# On meta tensors (shape propagation) only the csrc op computes anything: its fake kernels.
_AUTO_ORDER = {
    "cuda": ("triton", "csrc", "reference"),
    "cpu": ("csrc", "reference"),
    "meta": ("csrc",),  # (the reference refuses meta tensors: resolve_backend)
}
#: Backends that compute in fp32 and refuse float64 embeddings: "auto" passes over them for
#: fp64 inputs (gradcheck), which the others compute in fp64.
_NO_FLOAT64 = ("triton",)


class Backend:
    def __init__(self, name: str, fn: Optional[Callable], unavailable: Callable[[torch.device], Optional[str]]):
        self.name = name
        self._fn = fn
        self._unavailable = unavailable

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return self._unavailable(torch.device(device))

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


class _LazyBackend(Backend):
    """A fast backend that lives in its own module, imported on first use.

    The module exposes ``ekd_forward`` (the signature of ``ekd_reference``) and
    ``unavailable_reason(device)``.  Importing lazily keeps ``import ekd_kernels`` cheap and
    lets a missing compiler, GPU or extension show up as a reason instead of an ImportError.
    """

    def __init__(self, name: str, module: str, importer: Callable[[], Any], what: str):
        super().__init__(name, None, lambda device: None)
        self._module_name = module
        self._importer = importer
        self._what = what
        self._module = None
        self._import_error: Optional[str] = None

    def _load(self):
        if self._module is None and self._import_error is None:
            try:
                self._module = self._importer()
            except ModuleNotFoundError as exc:
                if exc.name == self._module_name:
                    self._import_error = f"{self._what} are not part of this build yet"
                else:
                    self._import_error = f"{self._what} could not be imported ({exc})"
            except Exception as exc:  # a broken build must say so, not vanish
                self._import_error = f"{self._what} could not be imported ({type(exc).__name__}: {exc})"
        return self._module

    def unavailable_reason(self, device) -> Optional[str]:
        module = self._load()
        if module is None:
            return self._import_error
        return module.unavailable_reason(torch.device(device))

    def __call__(self, *args, **kwargs):
        module = self._load()
        if module is None:
            raise RuntimeError(f"EKD backend {self.name!r} is unavailable: {self._import_error}")
        return module.ekd_forward(*args, **kwargs)


# The lazy backends' imports are import statements, not importlib.import_module: Dynamo runs an
# import statement while it traces (it refuses importlib), so that an EKDLoss built inside a
# torch.compile(fullgraph=True) function of a fresh process compiles.  Absolute "import a.b as m"
# (not "from . import b"): a missing module then raises ModuleNotFoundError naming it, which
# _load tells from an error inside the module.
def _import_triton():
    import ekd_kernels.triton_ekd as module
    return module


def _import_csrc():
    import ekd_kernels.csrc_ops as module
    return module


_REGISTRY: Dict[str, Backend] = {
    "reference": Backend("reference", ekd_reference, lambda device: None),
    "triton": _LazyBackend("triton", "ekd_kernels.triton_ekd", _import_triton, "the fused Triton kernels"),
    "csrc": _LazyBackend("csrc", "ekd_kernels.csrc_ops", _import_csrc, "the compiled C++/CUDA ops"),
}


def preload(name: str) -> None:
    """Import the module of `name` (every lazy backend for "auto") now rather than on the first
    call, so that a first call inside torch.compile does not have to trace an import."""
    for backend in (_REGISTRY.values() if name == "auto" else [_REGISTRY[name]]):
        if isinstance(backend, _LazyBackend):
            backend._load()


def register_backend(backend: Backend) -> None:
    """Install (or replace) a backend under its name; used by the optional fast backends."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; known: {BACKEND_NAMES}")
    _REGISTRY[backend.name] = backend


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {name!r}")


def available_backends(device) -> tuple:
    """Names of the backends that can run on `device`, fastest first (on meta tensors the
    compiled op's fake implementation only: the reference backend refuses them)."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    return tuple(n for n in order if _REGISTRY[n].unavailable_reason(device) is None)


def resolve_backend(name: str, device, dtypes=()) -> Backend:
    """The backend to run on `device`: the named one (error saying why if it cannot run there),
    or for "auto" the fastest available one that takes the embeddings' `dtypes` (fp64: not
    triton)."""
    check_backend_name(name)
    device = torch.device(device)
    if name == "auto":
        names = available_backends(device)
        if torch.float64 in tuple(dtypes):
            names = tuple(n for n in names if n not in _NO_FLOAT64)
        # (the reference is available on every device but meta, where it raises below why)
        name = names[0] if names else "reference"
        backend = _REGISTRY[name]
    else:
        backend = _REGISTRY[name]
        reason = backend.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"EKD backend {name!r} cannot run on {device}: {reason}")
    if name == "reference" and device.type == "meta":
        # (its selection reads values: nonzero, sort indices; it would fail deep inside torch)
        raise ValueError("meta tensors hold no values, and the reference EKD backend needs them (its selection of "
                         "thresholds and pairs is data-dependent); the csrc backend's ops have meta (fake) "
                         "implementations: backend='csrc' or 'auto' with the compiled ops built")
    return backend
