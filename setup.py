"""Build of ekd_kernels (metadata lives in pyproject.toml).

The Python package is always installed.  The compiled ops come from csrc/ as one extension,
``ekd_kernels._C``:

- the C++ (CPU) ops are always built;
- the CUDA ops are built whenever nvcc and a CUDA build of torch are present, whether or not a
  GPU is visible (a GPU-less build machine must not ship a CPU-only package by accident).
  ``EKD_BUILD_CUDA=0`` skips them; ``EKD_BUILD_CUDA=1`` requires them and fails with the reason
  when they cannot be built.

Targets sm_80 and sm_90, plus sm_90 PTX that newer GPUs compile at load time, unless
``TORCH_CUDA_ARCH_LIST`` says otherwise.  ``MAX_JOBS`` bounds the parallel compile jobs (ninja).
nvcc and torch must come from the same CUDA major version (torch refuses to mix them); when they
do not, the CUDA ops are skipped with the reason printed (or the build fails, with EKD_BUILD_CUDA=1).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# A100 and H100 machine code; "+PTX" adds sm_90 PTX, which GPUs newer than Hopper compile when
# the library loads, so that they run the CUDA ops instead of failing with "no kernel image".
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _nvcc_toolkit_root(nvcc: str):
    """The toolkit root nvcc really uses (a wrapper script in /usr/local/bin is common), from
    its own dry run: the line `#$ TOP=...`."""
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _prepare_cuda_home():
    """Point CUDA_HOME at a toolkit with headers before torch.utils.cpp_extension reads it.

    torch guesses CUDA_HOME as the parent of the folder holding nvcc, which is wrong when nvcc
    is a wrapper; ask nvcc instead when the guess has no cuda_runtime.h.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = pathlib.Path(nvcc).resolve().parent.parent
    if (guess / "include" / "cuda_runtime.h").is_file():
        return
    root = _nvcc_toolkit_root(nvcc)
    if root and (pathlib.Path(root) / "include" / "cuda_runtime.h").is_file():
        os.environ["CUDA_HOME"] = root


def _wheel_cuda_include_dirs():
    """`nvidia/cu13/include` (and the like) of site-packages: the cuBLAS / cuSPARSE headers that
    torch's CUDA headers include live there when the toolkit itself lacks them."""
    dirs = []
    for entry in sys.path:
        base = pathlib.Path(entry) / "nvidia"
        if not base.is_dir():
            continue
        for include in sorted(base.glob("cu*/include")):
            if include.is_dir() and str(include) not in dirs:
                dirs.append(str(include))
    return dirs


def _nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, from its `--version` banner; None when unknown."""
    if cuda_home is None:
        return None
    try:
        out = subprocess.run([str(pathlib.Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _cuda_decision(torch_cuda_version, cuda_home, nvcc_version=None):
    """(build_cuda, reason): whether to build the CUDA ops, and why not.

    torch_cuda_version: torch.version.cuda ("13.0", or None for a CPU build); nvcc_version:
    (major, minor) of the toolkit found, None when unknown."""
    setting = os.environ.get("EKD_BUILD_CUDA", "").strip()
    if setting not in ("", "0", "1"):
        raise SystemExit(f"EKD_BUILD_CUDA must be 0 or 1, got {setting!r}")
    if setting == "0":
        return False, "EKD_BUILD_CUDA=0"
    problems = []
    if torch_cuda_version is None:  # (the reason, alone: torch sets no CUDA_HOME then, whatever nvcc)
        problems.append("torch is a CPU-only build (torch.version.cuda is None)")
    elif cuda_home is None or not (pathlib.Path(cuda_home) / "bin" / "nvcc").exists():
        problems.append(f"no nvcc found (CUDA_HOME={cuda_home!r}, nvcc on PATH: {shutil.which('nvcc')!r})")
    elif nvcc_version is not None:
        torch_major = int(torch_cuda_version.split(".")[0])
        if torch_major != nvcc_version[0]:
            problems.append(f"nvcc is CUDA {nvcc_version[0]}.{nvcc_version[1]} but torch was built with CUDA "
                            f"{torch_cuda_version}: the major versions must match (point CUDA_HOME at a CUDA "
                            f"{torch_major} toolkit)")
    if problems:
        if setting == "1":
            raise SystemExit("EKD_BUILD_CUDA=1 but the CUDA ops cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, None


#: setup.py commands that compile the extension (the others, egg_info, dist_info and sdist, only
#: write metadata or pack sources, and need no torch).
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}

_NO_TORCH = ("ekd_kernels compiles its C++/CUDA ops against the torch it will run with, and none is importable "
             "here. Install torch first, then this package with `pip install --no-build-isolation .` (pip's "
             "default isolated build would compile against another torch, in a temporary environment, and leave "
             "an extension that does not load).")


def _extensions():
    _prepare_cuda_home()
    try:
        import torch
    except ImportError:
        if _BUILD_COMMANDS & set(sys.argv[1:]):
            raise SystemExit(_NO_TORCH)
        return []  # metadata or an sdist
    from torch.utils import cpp_extension

    build_cuda, reason = _cuda_decision(torch.version.cuda, cpp_extension.CUDA_HOME,
                                        _nvcc_version(cpp_extension.CUDA_HOME))
    # Every C++ file under csrc/ (op families may live in subfolders, e.g. csrc/rkd/); one library.
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    # (the C++ standard comes from torch, C++17 or C++20; -g0: Python's default flags carry -g,
    # which made the library 95% debug information, 10 MB of 10.5 on CPU)
    cxx_flags = ["-O3", "-fopenmp", "-g0"]
    include_dirs = [str(CSRC)]
    if not build_cuda:
        print(f"ekd_kernels: building the C++ CPU ops only ({reason})", flush=True)
        return [cpp_extension.CppExtension("ekd_kernels._C", cpp_sources, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
    print(f"ekd_kernels: building the C++ CPU ops and the CUDA ops for sm {os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"(CUDA_HOME={cpp_extension.CUDA_HOME})", flush=True)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return [cpp_extension.CUDAExtension(
        "ekd_kernels._C", cpp_sources + cuda_sources, include_dirs=include_dirs + _wheel_cuda_include_dirs(),
        define_macros=[("EKD_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class NinjaBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """Objects live in build/temp.ekd_kernels of the checkout, not in the fresh temporary folder
        that pip's editable install gives every run, so that ninja recompiles only what changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / "temp.ekd_kernels")

    return NinjaBuildExtension


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    extensions = _extensions()
    setup(
        packages=find_packages(include=["ekd_kernels", "ekd_kernels.*"]),
        ext_modules=extensions,
        cmdclass={"build_ext": _build_ext()} if extensions else {},  # (none: metadata or an sdist, no torch)
    )
