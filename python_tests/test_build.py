"""setup.py's decision whether to build the CUDA ops, on the machines users have.

The build itself is exercised by every test run (make test installs the package first); these
cases cover the machines the run does not see: a CPU-only torch, no nvcc, and an nvcc whose CUDA
major version differs from torch's (torch's build refuses that mix, so a default install must
fall back to the CPU ops with the reason printed, never fail).
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

from helpers import load_setup_module

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_module():
    return load_setup_module()


@pytest.fixture
def toolkit(tmp_path):
    """A CUDA_HOME with an nvcc file in it (the decision checks it exists, never runs it)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    return str(tmp_path)


@pytest.mark.parametrize("setting", ["", "1"])
def test_matching_versions_build_cuda(setup_module, toolkit, monkeypatch, setting):
    monkeypatch.setenv("EKD_BUILD_CUDA", setting)
    assert setup_module._cuda_decision("13.0", toolkit, (13, 0)) == (True, None)
    assert setup_module._cuda_decision("12.4", toolkit, (12, 8)) == (True, None)  # minor may differ
    assert setup_module._cuda_decision("13.0", toolkit, None) == (True, None)     # unknown: torch decides


def test_major_mismatch_falls_back_to_cpu_with_the_reason(setup_module, toolkit, monkeypatch):
    monkeypatch.delenv("EKD_BUILD_CUDA", raising=False)
    build, reason = setup_module._cuda_decision("12.4", toolkit, (13, 0))
    assert build is False
    assert "CUDA 13.0" in reason and "CUDA 12.4" in reason


def test_major_mismatch_fails_when_cuda_is_required(setup_module, toolkit, monkeypatch):
    monkeypatch.setenv("EKD_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="CUDA 12.4"):
        setup_module._cuda_decision("12.4", toolkit, (13, 0))


def test_cpu_torch_or_no_nvcc(setup_module, toolkit, tmp_path, monkeypatch):
    monkeypatch.delenv("EKD_BUILD_CUDA", raising=False)
    build, reason = setup_module._cuda_decision(None, toolkit, (13, 0))
    assert build is False and "CPU-only" in reason
    build, reason = setup_module._cuda_decision("13.0", str(tmp_path / "missing"), None)
    assert build is False and "no nvcc" in reason
    monkeypatch.setenv("EKD_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="CPU-only"):
        setup_module._cuda_decision(None, toolkit, None)


def test_cuda_can_be_switched_off_and_bad_settings_are_named(setup_module, toolkit, monkeypatch):
    monkeypatch.setenv("EKD_BUILD_CUDA", "0")
    assert setup_module._cuda_decision("13.0", toolkit, (13, 0)) == (False, "EKD_BUILD_CUDA=0")
    monkeypatch.setenv("EKD_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="'yes'"):
        setup_module._cuda_decision("13.0", toolkit, (13, 0))


def test_nvcc_version_is_read_from_its_banner(setup_module, tmp_path):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    nvcc.chmod(0o755)
    assert setup_module._nvcc_version(str(tmp_path)) == (12, 8)
    assert setup_module._nvcc_version(str(tmp_path / "missing")) is None
    assert setup_module._nvcc_version(None) is None


def test_default_archs_carry_ptx_for_newer_gpus(setup_module):
    archs = setup_module.DEFAULT_CUDA_ARCHS.split(";")
    assert "8.0" in archs and any(a.startswith("9.0") for a in archs)
    assert archs[-1].endswith("+PTX")


def test_sdist_holds_every_csrc_file(tmp_path):
    """A source distribution builds only with csrc's headers in it: setuptools adds the
    extension's .cpp/.cu sources, not the headers they include (MANIFEST.in does).  Every file
    git tracks under csrc/ must be in the sdist, built from a copy of the tracked tree."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of tracked files")
    tracked = listed.stdout.split()
    tree = tmp_path / "tree"
    for name in tracked + ["MANIFEST.in"]:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree, check=True,
                   capture_output=True, env={**os.environ, "EKD_BUILD_CUDA": "0"})
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(name for name in tracked if name.startswith("csrc/") and name not in packed)
    assert not missing, f"the sdist lacks {missing}"


def _tool(name):
    """A module of tools/, imported by name."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "tools"))


def test_ensure_deps_reads_version_bounds():
    """make test's installer takes a requirement as met only within its bounds: an older torch
    or setuptools (say, a system one seen through --system-site-packages) is upgraded."""
    ensure_deps = _tool("ensure_deps")
    assert ensure_deps.is_present("torch>=2.6") and ensure_deps.is_present("torch")
    assert not ensure_deps.is_present("torch>=99") and not ensure_deps.is_present("setuptools>=999")
    assert not ensure_deps.is_present("no-such-distribution-ekd")


def test_ensure_deps_finds_pytest_xdist_by_its_import_name():
    """pytest-xdist imports as `xdist`: looked up as `pytest_xdist` it read as missing, and every
    make test tried to install it again (on the offline GPU machine, a failed download each run)."""
    ensure_deps = _tool("ensure_deps")
    assert ensure_deps.is_present("pytest-xdist") == (importlib.util.find_spec("xdist") is not None)


@pytest.mark.parametrize("cores, wanted, xdist, expected", [
    (2, "", True, "-n 2 --dist loadfile"),     # CI's two cores
    (16, "", True, "-n 4 --dist loadfile"),    # at most four: test_triton.py alone is half the suite
    (1, "", True, ""),                         # one core: one process
    (8, "", False, ""),                        # without pytest-xdist (the offline GPU machine may lack it)
    (2, "1", True, ""), (2, "0", True, ""),    # EKD_TEST_WORKERS turns the workers off
    (2, "3", True, "-n 3 --dist loadfile"),    # or sets their count, past the cores too
])
def test_make_test_workers(monkeypatch, cores, wanted, xdist, expected):
    """The pytest-xdist options make test runs the suite with (tools/pytest_workers.py)."""
    workers = _tool("pytest_workers")
    monkeypatch.setattr(workers, "usable_cores", lambda: cores)
    monkeypatch.setenv("EKD_TEST_WORKERS", wanted)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(workers.importlib.util, "find_spec",
                        lambda name: (object() if xdist else None) if name == "xdist" else real_find_spec(name))
    assert workers.options() == expected


@pytest.mark.parametrize("wanted", ["two", "-2"])
def test_make_test_refuses_a_bad_worker_count(wanted):
    """A bad EKD_TEST_WORKERS stops make test with its name, rather than run in one process
    unasked (the Makefile runs pytest only when tools/pytest_workers.py succeeds)."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "pytest_workers.py")], capture_output=True, text=True,
                          env={**os.environ, "EKD_TEST_WORKERS": wanted}, timeout=60)
    assert done.returncode != 0 and f"EKD_TEST_WORKERS={wanted}" in done.stderr.replace("'", ""), done.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert "workers=$$($(PY) tools/pytest_workers.py) && $(PY) -m pytest python_tests $$workers" in makefile


def test_a_build_without_torch_says_how_to_install(setup_module, monkeypatch):
    """pip's default (isolated) build compiled the ops against a torch it downloaded into a
    temporary environment, and the installed library then failed to load against the user's
    torch, silently leaving the reference backend.  torch is no build requirement now, so such
    a build finds none: the commands that compile stop with the remedy; metadata and sdist
    commands need no torch and go on without the extension."""
    monkeypatch.setitem(sys.modules, "torch", None)  # (import torch raises ImportError)
    for command in ("bdist_wheel", "editable_wheel", "build_ext"):
        monkeypatch.setattr(sys, "argv", ["setup.py", command, "--dist-dir", "x"])
        with pytest.raises(SystemExit, match="pip install --no-build-isolation"):
            setup_module._extensions()
    for command in ("egg_info", "dist_info", "sdist"):
        monkeypatch.setattr(sys, "argv", ["setup.py", command])
        assert setup_module._extensions() == []
    with open(ROOT / "pyproject.toml") as f:
        requires = next(line for line in f if line.startswith("requires"))
    assert "torch" not in requires and "setuptools>=70.1" in requires


def test_setup_py_without_torch_writes_metadata_and_refuses_a_build(tmp_path):
    """The same through setup.py as pip's isolated build runs it (torch not importable): egg_info
    succeeds (it once failed on the build command class's torch import), bdist_wheel stops with
    the advice."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".venv", "build", "*.egg-info", ".git", "*.so",
                                                                "shared", "bench", "__pycache__"))
    runner = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py'] + sys.argv[1:]; "
              "runpy.run_path('setup.py', run_name='__main__')")

    def setup_py(*args):
        return subprocess.run([sys.executable, "-c", runner, *args], cwd=tree, capture_output=True, text=True,
                              timeout=300)

    metadata = setup_py("-q", "egg_info", "--egg-base", str(tmp_path))
    assert metadata.returncode == 0, metadata.stderr[-2000:]
    assert (tmp_path / "ekd_kernels.egg-info" / "PKG-INFO").is_file()
    build = setup_py("-q", "bdist_wheel", "--dist-dir", str(tmp_path / "dist"))
    assert build.returncode != 0 and "pip install --no-build-isolation" in build.stderr, build.stderr[-2000:]


def test_cpu_torch_gives_that_reason_alone(setup_module, toolkit, monkeypatch):
    """A CPU-only torch sets no CUDA_HOME, so 'no nvcc found' beside it contradicted the nvcc on
    the PATH it printed: the CPU-only reason stands alone."""
    monkeypatch.delenv("EKD_BUILD_CUDA", raising=False)
    assert setup_module._cuda_decision(None, None, None) == (
        False, "torch is a CPU-only build (torch.version.cuda is None)")


def test_extension_load_errors_name_their_remedy():
    """Not built, or built against another torch (pip's isolated build): each message says which
    and how to rebuild, and importing the package without its library warns once, so that
    backend="auto" does not fall back to the reference without a word."""
    from ekd_kernels.csrc_ops import load_error_message

    missing = ModuleNotFoundError("No module named 'ekd_kernels._C'", name="ekd_kernels._C")
    assert "was not built" in load_error_message(missing)
    foreign = ImportError("libc10_cuda.so: cannot open shared object file: No such file or directory")
    message = load_error_message(foreign)
    assert "failed to load: libc10_cuda.so" in message and "another torch" in message
    assert "pip install --no-build-isolation" in message
    # (the backend's module is imported on first use: EKDLoss(), or asking for the backends)
    script = ("import sys, warnings; sys.modules['ekd_kernels._C'] = None\n"
              "import ekd_kernels\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n"
              "    backends = ekd_kernels.available_backends('cpu')\n"
              "    ekd_kernels.EKDLoss()\n"
              "print(backends, [str(w.message) for w in caught if w.category is RuntimeWarning])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    backends, _, warned = out.stdout.strip().splitlines()[-1].partition(" ")
    assert "'csrc'" not in backends
    assert warned.count("the C++ extension ekd_kernels._C was not built") == 1, out.stdout
