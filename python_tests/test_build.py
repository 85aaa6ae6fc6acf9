"""setup.py's decision whether to build the CUDA ops, on the machines users have.

The build itself is exercised by every test run (make test installs the package first); these
cases cover the machines the run does not see: a CPU-only torch, no nvcc, and an nvcc whose CUDA
major version differs from torch's (torch's build refuses that mix, so a default install must
fall back to the CPU ops with the reason printed, never fail).
"""

import pytest

from helpers import load_setup_module


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
