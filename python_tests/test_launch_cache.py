"""The launch cache of the Triton backend (ekd_kernels/_triton/launch.py): a hit calls the
launcher JITFunction.run would have called, with the same arguments, and whatever the cache
cannot vouch for goes through JITFunction.run.

Without a GPU the kernels compile for an H100 through the sm_90 stand-in (tools/) and their
launchers are replaced by recorders, in a subprocess (the stand-in replaces Triton's driver).
test_triton.py's sm_90 compile check runs every launch of the package through the cache in
verify mode the same way, and on a GPU test_launch_cache_on_the_gpu (test_triton.py) runs it
with real launches."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = pathlib.Path(__file__).resolve().parent
#: triton.knobs (Triton 3.3 on), which the cache reads at every launch: without it the cache is
#: off and every launch goes through JITFunction.run (launch._supported).
HAS_KNOBS = hasattr(triton, "knobs")


def _run(args, env_update, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not HAS_KNOBS, reason=f"triton {triton.__version__} has no triton.knobs: the launch cache is off "
                                           "there (test_launch_cache_switch checks it)")
def test_launch_cache_scenarios(tmp_path):
    """Misses, hits, the key's parts (alignment, dtype, integer specialisations, bool against
    int, constexpr floats, debug and instrumentation settings, device), the current stream,
    launch / pre-run / stages hooks, globals rebound or changed in place, unkeyed arguments, a
    bounded table, a launcher called twice, a Triton whose launch convention differs (the kernel
    keeps JITFunction.run) and verify_hits catching a wrong entry: launch_cache_script.py."""
    done = _run([str(HERE / "launch_cache_script.py"), str(HERE.parent / "tools")],
                {"TRITON_CACHE_DIR": str(tmp_path / "cache")}, timeout=600)
    last_line = (done.stderr.strip().splitlines() or [""])[-1]
    if "ptxas" in done.stderr and ("not found" in done.stderr or "No such file" in done.stderr):
        pytest.skip(f"no ptxas for an sm_90 compile: {last_line}")
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["entries"] == 12 and summary["hits"] > 20, summary


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_launch_cache_switch(value, enabled):
    """EKD_TRITON_LAUNCH_CACHE=0 turns the cache off (every launch through JITFunction.run), as
    a Triton without triton.knobs (before 3.3) does whatever the variable says."""
    env = {} if value is None else {"EKD_TRITON_LAUNCH_CACHE": value}
    if value is None:
        env["EKD_TRITON_LAUNCH_CACHE"] = ""
    done = _run(["-c", "from ekd_kernels._triton.launch import launches; print(launches.enabled)"], env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(enabled and HAS_KNOBS)
