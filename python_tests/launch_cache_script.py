"""The launch cache (ekd_kernels/_triton/launch.py) on a small kernel compiled for an H100 by the
sm_90 stand-in (no GPU: each compiled kernel's launcher is replaced by a recorder), run by
test_launch_cache.py in a subprocess of its own (the stand-in replaces Triton's active driver).

Every scenario prints nothing; a failed check raises.  The last line of stdout is a JSON summary.
"""
import json
import sys

import torch

sys.path.insert(0, sys.argv[1])  # tools/
import sm90_stand_in  # noqa: E402

sm90_stand_in.install()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ekd_kernels._triton import launch as launch_module  # noqa: E402
from ekd_kernels._triton.launch import LaunchCache, LaunchMismatch  # noqa: E402

SCALE = tl.constexpr(2)


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr, OFFSET: tl.constexpr = 0):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * alpha * SCALE + OFFSET, mask=mask)


calls = []  # (compiled kernel, launcher arguments) of every launcher call


def stub_launchers():
    """Every compiled kernel's launcher a recorder (handles 'loaded': nothing runs)."""
    for cache in scale_kernel.device_caches.values():
        for compiled in cache[0].values():
            if compiled.module != 1:
                def record(*args, compiled=compiled):
                    calls.append((compiled, args))

                compiled.module, compiled.function, compiled._run = 1, 0, record


def prepare(grid, *args, **kwargs):
    """Compile the launch's kernel (no launch), then stub its launcher."""
    JITFunction.run(scale_kernel, *args, grid=grid, warmup=True, **kwargs)
    stub_launchers()


def launch(cache, grid, *args, **kwargs):
    """One launch through `cache`: exactly one launcher call, returned."""
    before = len(calls)
    cache.launch(scale_kernel, grid, args, kwargs)
    assert len(calls) == before + 1, (before, len(calls))
    return calls[-1]


def through_jit(grid, *args, **kwargs):
    """The launcher call JITFunction.run makes for the same launch."""
    scale_kernel[grid](*args, **kwargs)
    return calls.pop()


def check_hit(cache, grid, *args, **kwargs):
    """A hit: the cache's launcher call is JITFunction.run's (same compiled kernel, same
    arguments; None for the launch metadata and the empty hook chains)."""
    hits = cache.hits
    compiled, launched = launch(cache, grid, *args, **kwargs)
    assert cache.hits == hits + 1, "not a hit"
    jit_compiled, jit_launched = through_jit(grid, *args, **kwargs)
    assert compiled is jit_compiled
    assert launch_module._as_launched(jit_launched, launched), (args, kwargs, jit_launched, launched)
    assert launched[6:9] == (None, None, None)
    return compiled


x, y = torch.randn(300), torch.empty(300)
summary = {}

# 1. A miss (checked through JITFunction.run), then hits; verify_hits agrees.
cache = LaunchCache()
prepare((3,), x, y, 300, 1.5, BLOCK=128)
launch(cache, (3,), x, y, 300, 1.5, BLOCK=128)
assert cache.hits == 0 and len(cache.entries(scale_kernel)) == 1
aligned = check_hit(cache, (3,), x, y, 300, 1.5, BLOCK=128)
check_hit(cache, (5, 1), torch.randn(300), torch.empty(300), 300, 2.5, BLOCK=128)  # new tensors, grid, float
cache.verify_hits = True
hits = cache.hits
launch(cache, (3,), x, y, 300, 1.5, BLOCK=128)
assert cache.hits == hits + 1
cache.verify_hits = False

# 2. A pointer 4 bytes off, all else the same: a key of its own, and Triton's other compiled kernel.
y_off = torch.empty(301)[1:]
prepare((3,), x, y_off, 300, 1.5, BLOCK=128)
hits = cache.hits
launch(cache, (3,), x, y_off, 300, 1.5, BLOCK=128)
assert cache.hits == hits, "the aligned pointer's entry served a misaligned one"
misaligned = check_hit(cache, (3,), x, y_off, 300, 1.5, BLOCK=128)
assert misaligned is not aligned

# 3. Integers of each specialisation (1, a multiple of 16, other), a bool against an int, a
#    default constexpr given: keys of their own, each hit JITFunction.run's compiled kernel.
for n, offset in ((1, 0), (16, 0), (17, 0), (100, 0), (100, 1), (100, True)):
    prepare((1,), x, y, n, 1.5, BLOCK=128, OFFSET=offset)
    launch(cache, (1,), x, y, n, 1.5, BLOCK=128, OFFSET=offset)
    check_hit(cache, (1,), x, y, n, 1.5, BLOCK=128, OFFSET=offset)
summary["entries"] = len(cache.entries(scale_kernel))
assert summary["entries"] == 2 + 6, summary

# 4. A launch hook (a profiler): JITFunction.run, with the hook chain passed on.
hook = lambda metadata: None  # noqa: E731
knobs.runtime.launch_enter_hook.add(hook)
try:
    hits = cache.hits
    _, launched = launch(cache, (3,), x, y, 300, 1.5, BLOCK=128)
    assert cache.hits == hits and launched[7] is knobs.runtime.launch_enter_hook
finally:
    knobs.runtime.launch_enter_hook.remove(hook)
check_hit(cache, (3,), x, y, 300, 1.5, BLOCK=128)

# 5. A global the kernel reads, rebound: JITFunction.run's error, not the old kernel.
SCALE = tl.constexpr(3)
try:
    cache.launch(scale_kernel, (3,), (x, y, 300, 1.5), dict(BLOCK=128))
except RuntimeError as error:
    assert "SCALE" in str(error), error
else:
    raise AssertionError("a rebound global launched the old kernel")
SCALE = tl.constexpr(2)
launch(cache, (3,), x, y, 300, 1.5, BLOCK=128)  # (its entry was dropped: a miss, checked again)
check_hit(cache, (3,), x, y, 300, 1.5, BLOCK=128)

# 6. Arguments the cache does not key (a constexpr object, by name or position), a callable grid,
#    the cache off: JITFunction.run each time, no hit, one launch each.
base = (x, y, 300, 1.5)
for grid, args, kwargs, use in (((3,), base, dict(BLOCK=tl.constexpr(128)), cache),
                                ((3,), base + (tl.constexpr(128),), dict(), cache),
                                (lambda meta: (3,), base, dict(BLOCK=128), cache),
                                ((3,), base, dict(BLOCK=128), LaunchCache(enabled=False))):
    prepare((3,), *args, **kwargs)
    hits = use.hits
    for _ in range(2):  # (a second launch would be a hit if the first had made an entry)
        launch(use, grid, *args, **kwargs)
    assert use.hits == hits

# 7. A bounded table: past MAX_ENTRIES keys it starts again.
launch_module.MAX_ENTRIES, bounded = 2, LaunchCache()
for n in (17, 100, 300):
    launch(bounded, (3,), x, y, n, 1.5, BLOCK=128)
assert len(bounded.entries(scale_kernel)) == 1
launch_module.MAX_ENTRIES = 256

# 8. A Triton whose JITFunction.run passes the launcher something else (3.2 passed only the
#    non-constexpr values): the check fails, the kernel keeps JITFunction.run, every launch
#    still launches once.
real_run = JITFunction.run


def run_without_constexprs(self, *args, grid, warmup, **kwargs):
    compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
    if not warmup:
        compiled.run(grid[0], 1, 1, 0, compiled.function, compiled.packed_metadata, None, None, None, *args)
    return compiled


JITFunction.run = run_without_constexprs
other = LaunchCache()
for _ in range(3):
    launch(other, (3,), x, y, 300, 1.5, BLOCK=128)
assert other.hits == 0 and other.disabled_kernels() == ["scale_kernel"], other.disabled_kernels()
JITFunction.run = real_run

# 9. verify_hits catches a hit that would launch something else than JITFunction.run.
cache.verify_hits = True
key = launch_module._key(launch_module.driver.active.get_current_device(), knobs.runtime, (x, y, 300, 1.5),
                         dict(BLOCK=128))
compiled_kernel, tail, rebound = cache._tables[id(scale_kernel)][1][key]
cache._tables[id(scale_kernel)][1][key] = (compiled_kernel, (64, 0), rebound)  # a wrong BLOCK
try:
    cache.launch(scale_kernel, (3,), (x, y, 300, 1.5), dict(BLOCK=128))
except LaunchMismatch:
    pass
else:
    raise AssertionError("verify_hits missed a wrong launch")

summary["hits"] = cache.hits
print(json.dumps(summary))
