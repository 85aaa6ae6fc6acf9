"""Why a refusal raised inside the compiled op kills the process on the GPU machine.

On the first GPU run (2026-11-26, H200 image: Python 3.12, torch 2.11.0+cu130) every argument
check that fails *inside* the C++/CUDA op (``TORCH_CHECK`` in csrc/) ended in a segmentation
fault instead of a RuntimeError / ValueError, on CPU and CUDA tensors alike, while a device
mismatch refused by the same check function raised normally.  Here (Debian, gcc 12, Python
3.11, torch 2.11 and 2.14) every one of them raises.  This script gathers what tells the causes
apart, each case in its own process so that a crash costs only that case:

    python tools/diagnose_throw.py [--inline] [--cpu-build] [--gdb]

- the toolchain: ``c++ --version``, torch's C++ ABI flag, the TORCH_* environment, the
  library's dynamic dependencies and x86 feature notes (CET);
- raw-op refusals that crashed there (CPU and CUDA: a bad temperature, float labels, a 1-D
  student) and the one that did not (CUDA with an argument on the CPU), each with
  TORCH_SHOW_CPP_STACKTRACES unset and set;
- torch's own refusals (``torch.mm`` of mismatched shapes, CPU and CUDA) and glibc's
  ``backtrace()`` (the unwinder c10::Error runs to record its stack), each with the library not
  loaded, loaded, and loaded after one valid call of the op: whether every C++ throw in such a
  process dies, or only the throws from this library, and whether loading it is what breaks them;
- ``--inline``: a minimal extension built on the spot (torch.utils.cpp_extension.load_inline)
  whose ops refuse with a plain std::runtime_error (no stack recorded) or a TORCH_CHECK whose
  message holds text only, an int, a double or a shape (through c10::str's ostream), and one
  that formats numbers through an ostringstream without throwing, with this package's flags
  (-O3 -fopenmp) and without: whether any extension's throw crashes or only this package's
  build, and whether recording the stack or printing a number is what crashes;
- ``--cpu-build``: the same sources built without the CUDA ops, in a copy, and the CPU cases on
  that library: whether the crash comes with the nvcc-compiled objects linked in;
- ``--gdb``: the native backtrace of the first crashing case under cuda-gdb (the GPU image has
  no gdb; cuda-gdb debugs host code too).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parent.parent

# Each case: (name, device, python statement that calls the op; it must raise).
_SETUP = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import ekd_kernels.csrc_ops  # loads the library
    from test_csrc import _raw_backward_args, op_args, make_batch
    from ekd_kernels import EKDConfig
    device = {device!r}
""")
_CASES = [
    ("backward_temperature_0", "cpu", "a, _ = _raw_backward_args(device); a['temperature'] = 0.0; "
                                      "torch.ops.ekd_kernels.ekd_backward(*a.values())"),
    ("backward_student_1d", "cpu", "a, _ = _raw_backward_args(device); a['student'] = a['student'][0]; "
                                   "torch.ops.ekd_kernels.ekd_backward(*a.values())"),
    ("forward_labels_float", "cpu", "s, t, y = make_batch(12, 6, 4, 4, seed=5, device=device); "
                                    "st = (torch.zeros(6, device=device), torch.zeros(6, device=device)); "
                                    "torch.ops.ekd_kernels.ekd_forward(*op_args(s, t, y.float(), "
                                    "EKDConfig(num_hard_negatives=10), st))"),
    # The first GPU run's pattern: every refusal whose message printed a number crashed, those
    # with only text, dtypes and devices raised.  Since csrc/check.h prints numbers without an
    # ostream: a pair of each kind.
    ("backward_grad_loss_int (text only)", "cpu", "a, _ = _raw_backward_args(device); "
                                                  "a['grad_loss'] = a['grad_loss'].long(); "
                                                  "torch.ops.ekd_kernels.ekd_backward(*a.values())"),
    ("backward_grad_loss_vector (a shape)", "cpu", "a, _ = _raw_backward_args(device); "
                                                   "a['grad_loss'] = a['grad_loss'].new_ones(3); "
                                                   "torch.ops.ekd_kernels.ekd_backward(*a.values())"),
    ("backward_temperature_0", "cuda", None),
    ("backward_grad_loss_on_cpu", "cuda", "a, _ = _raw_backward_args(device); a['grad_loss'] = a['grad_loss'].cpu(); "
                                          "torch.ops.ekd_kernels.ekd_backward(*a.values())"),
]
_INLINE_CPP = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <sstream>
#include <stdexcept>
// Each refuse_* op refuses x unless it is 2-D, its message built another way.
at::Tensor refuse_plain(const at::Tensor& x) {
  if (x.dim() != 2) throw std::runtime_error("refuse_plain: x must be 2-D");  // no c10 backtrace
  return x.clone();
}
at::Tensor refuse_text(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "refuse_text: x must be 2-D, got dtype ", x.scalar_type());
  return x.clone();
}
at::Tensor refuse_int(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "refuse_int: x must be 2-D, got ", x.dim(), " dimensions");
  return x.clone();
}
at::Tensor refuse_double(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "refuse_double: x must be 2-D, got ", 0.5 * x.dim());
  return x.clone();
}
at::Tensor refuse_shape(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "refuse_shape: x must be 2-D, got shape ", x.sizes());
  return x.clone();
}
// No throw at all: a number through an ostringstream (as c10::str formats), its text's length.
at::Tensor format_numbers(const at::Tensor& x) {
  std::ostringstream text;
  text << x.dim() << " " << 0.5 << " " << x.sizes();
  return at::full({}, int64_t(text.str().size()), at::kLong);
}
TORCH_LIBRARY(ekd_diagnose_NAME, m) {
  for (const char* name : {"refuse_plain", "refuse_text", "refuse_int", "refuse_double", "refuse_shape",
                           "format_numbers"})
    m.def((std::string(name) + "(Tensor x) -> Tensor").c_str());
}
TORCH_LIBRARY_IMPL(ekd_diagnose_NAME, CPU, m) {
  m.impl("refuse_plain", &refuse_plain);
  m.impl("refuse_text", &refuse_text);
  m.impl("refuse_int", &refuse_int);
  m.impl("refuse_double", &refuse_double);
  m.impl("refuse_shape", &refuse_shape);
  m.impl("format_numbers", &format_numbers);
}
"""


def run(cmd, env=None, timeout=300, cwd=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def outcome(rc, text):
    if rc < 0:
        return f"CRASHED (signal {-rc})"
    said = [line for line in text.splitlines() if line.startswith(("raised", "did not raise"))]
    said = said or [line for line in text.splitlines() if line.strip()][-1:]
    return f"exit {rc}: {said[0][:160] if said else ''}"


def case_program(device, statement, repo=REPO):
    body = _SETUP.format(tests=str(repo / "python_tests"), device=device)
    return body + textwrap.dedent(f"""
        try:
            {statement}
        except (RuntimeError, ValueError) as exc:
            print("raised", type(exc).__name__, str(exc).splitlines()[0][:120])
        else:
            print("did not raise")
    """)


def environment():
    print("== toolchain and environment", flush=True)
    for cmd in (["c++", "--version"], ["nvcc", "--version"]):
        if shutil.which(cmd[0]):
            print(" ", " ".join(cmd), "->", run(cmd)[1].splitlines()[0])
    code = ("import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, "
            "'cxx11abi', torch._C._GLIBCXX_USE_CXX11_ABI, 'cuda', torch.cuda.is_available())")
    print(" ", run([sys.executable, "-c", code])[1])
    print("  TORCH_* env:", {k: v for k, v in os.environ.items() if k.startswith("TORCH")})
    libs = sorted((REPO / "ekd_kernels").glob("_C*.so"))
    for lib in libs:
        print("  library", lib.name, f"{lib.stat().st_size / 2**20:.1f} MiB")
        if shutil.which("readelf"):
            notes = [line.strip() for line in run(["readelf", "-n", str(lib)])[1].splitlines() if "x86" in line]
            print("   x86 notes:", notes or "none")
        if shutil.which("ldd"):
            for line in run(["ldd", str(lib)])[1].splitlines():
                if any(k in line for k in ("stdc++", "gcc_s", "gomp", "c10", "torch_cpu", "libc.so")):
                    print("   ", line.strip())


def raw_op_cases(cuda, repo=REPO, label="this build"):
    print(f"== raw-op refusals ({label}), each in its own process", flush=True)
    crashed = []
    for index, (name, device, statement) in enumerate(_CASES):
        if device == "cuda" and not cuda:
            print(f"  {name} [{device}]: skipped (no CUDA)")
            continue
        if statement is None:  # the same statement as the CPU case of that name
            statement = next(s for n, d, s in _CASES if n == name and s is not None)
        program = case_program(device, statement, repo)
        for show in ("0", "1") if index == 0 else ("0",):  # the stack-trace setting: once is telling
            env = {**os.environ, "TORCH_SHOW_CPP_STACKTRACES": show}
            if repo != REPO:
                env["PYTHONPATH"] = str(repo)
            rc, text = run([sys.executable, "-X", "faulthandler", "-c", program], env=env, cwd=repo)
            print(f"  {name} [{device}] TORCH_SHOW_CPP_STACKTRACES={show}: {outcome(rc, text)}", flush=True)
            if rc < 0:
                crashed.append(program)
    return crashed


# Does a throw that is not this library's die too?  (name, statement before the check, check)
_LOAD = {"not loaded": "",
         "loaded": "import ekd_kernels.csrc_ops",
         "loaded, one valid call": ("import ekd_kernels.csrc_ops; from test_csrc import make_batch, op_args; "
                                    "from ekd_kernels import EKDConfig; "
                                    "s, t, y = make_batch(12, 6, 4, 4, seed=5, device=device); "
                                    "st = (torch.zeros(6, device=device), torch.zeros(6, device=device)); "
                                    "torch.ops.ekd_kernels.ekd_forward(*op_args(s, t, y, EKDConfig(num_hard_negatives=10), st))")}
_OTHER_THROWS = {
    "torch.mm refusal": ("try:\n    torch.mm(torch.ones(2, 3, device=device), torch.ones(2, 3, device=device))\n"
                         "except RuntimeError as exc:\n    print('raised', type(exc).__name__, str(exc)[:80])\n"
                         "else:\n    print('did not raise')"),
    "glibc backtrace()": ("import ctypes\nframes = (ctypes.c_void_p * 64)()\n"
                          "print('raised nothing: backtrace() returned', ctypes.CDLL(None).backtrace(frames, 64), 'frames')"),
}


def other_throw_cases(cuda):
    print("== torch's own refusal and glibc backtrace(), each in its own process", flush=True)
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        for load_name, load in _LOAD.items():
            for check_name, check in _OTHER_THROWS.items():
                if check_name == "glibc backtrace()" and device == "cuda":
                    continue  # the same call whatever the device: once is enough
                program = (f"import sys, torch\nsys.path.insert(0, {str(REPO / 'python_tests')!r})\n"
                           f"device = {device!r}\n{load}\n{check}\n")
                rc, text = run([sys.executable, "-X", "faulthandler", "-c", program], cwd=REPO)
                print(f"  {check_name} [{device}], library {load_name}: {outcome(rc, text)}", flush=True)


def inline_cases():
    """A minimal extension, each op in its own process (the first builds it, the others load the
    build): which way of building a refusal's message crashes, if any, and whether formatting a
    number alone does."""
    print("== a minimal extension's refusals (load_inline), each in its own process", flush=True)
    for label, flags in (("-O3 -fopenmp (this package's)", ["-O3", "-fopenmp"]), ("-O2", ["-O2"])):
        name = "o3omp" if "-fopenmp" in flags else "o2"
        for op in ("format_numbers", "refuse_plain", "refuse_text", "refuse_int", "refuse_double", "refuse_shape"):
            program = textwrap.dedent(f"""
                import torch
                from torch.utils.cpp_extension import load_inline
                load_inline("ekd_diagnose_{name}", cpp_sources=[{_INLINE_CPP.replace('NAME', name)!r}],
                            extra_cflags={flags!r}, extra_ldflags={['-fopenmp'] if '-fopenmp' in flags else []!r},
                            is_python_module=False, verbose=False)
                try:
                    out = torch.ops.ekd_diagnose_{name}.{op}(torch.zeros(3))
                except (RuntimeError, ValueError) as exc:
                    print("raised", type(exc).__name__, str(exc).splitlines()[0][:100])
                else:
                    print("raised nothing: returned", out.tolist())
            """)
            rc, text = run([sys.executable, "-X", "faulthandler", "-c", program], timeout=600)
            print(f"  {label} {op}: {outcome(rc, text)}", flush=True)


def cpu_only_build():
    """The same sources built without the CUDA ops (EKD_BUILD_CUDA=0) in a copy: whether the crash
    comes with the nvcc-compiled objects and CUDA libraries linked into the library."""
    copy = pathlib.Path("/tmp/ekd_diagnose_cpu_only")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.so", "bench", "shared",
                                                              "*.egg-info", "__pycache__"))
    env = {**os.environ, "EKD_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "16")}
    rc, text = run([sys.executable, "setup.py", "build_ext", "--inplace"], env=env, timeout=600, cwd=copy)
    if rc != 0:
        print("== CPU-only build failed:", text.splitlines()[-3:] if text else "")
        return None
    code = ("import ekd_kernels._C as c, ekd_kernels.csrc_ops as o, torch; "
            "print(c.__file__, o.unavailable_reason(torch.device('cuda')))")
    # cwd and PYTHONPATH: `python -c` puts the working folder first on sys.path
    print("== CPU-only build:", run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(copy)},
                                    cwd=copy)[1])
    return copy


def native_backtrace(program):
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if gdb is None:
        print("== native backtrace: no cuda-gdb or gdb here")
        return
    path = pathlib.Path("/tmp/ekd_diagnose_case.py")
    path.write_text(program)
    print(f"== native backtrace of the first crash ({pathlib.Path(gdb).name})", flush=True)
    rc, text = run([gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info registers rip",
                    "--args", sys.executable, str(path)], timeout=300)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "SIGSEGV" in line or "signal" in line.lower()), 0)
    print("\n".join(lines[max(0, start - 2):start + 60]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inline", action="store_true", help="also build and try a minimal extension")
    parser.add_argument("--gdb", action="store_true", help="native backtrace of the first crash (cuda-gdb)")
    parser.add_argument("--cpu-build", action="store_true",
                        help="also build the sources without the CUDA ops in a copy and run the CPU cases on it")
    args = parser.parse_args()
    import torch

    environment()
    # Cheapest and most telling first: a lease may cut the run short (the output is flushed as it goes).
    crashed = raw_op_cases(torch.cuda.is_available())
    other_throw_cases(torch.cuda.is_available())
    if args.gdb and crashed:
        native_backtrace(crashed[0])
    if args.inline:
        inline_cases()
    if args.cpu_build:
        copy = cpu_only_build()
        if copy is not None:
            raw_op_cases(False, repo=copy, label="the same sources, CPU ops only")
    print(f"== {len(crashed)} crashing case runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
