"""The launch cache (ekd_kernels/_triton/launch.py) on small kernels compiled for an H100 by the
sm_90 stand-in (no GPU: each compiled kernel's launcher is replaced by a recorder, and the
stand-in's current device and stream can be set), run by test_launch_cache.py in a subprocess of
its own (the stand-in replaces Triton's active driver).

A failed check raises; the last line of stdout is a JSON summary.
"""
import json
import sys

import torch

sys.path.insert(0, sys.argv[1])  # tools/
import sm90_stand_in  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ekd_kernels._triton import launch as launch_module  # noqa: E402
from ekd_kernels._triton.launch import LaunchCache, LaunchMismatch  # noqa: E402


class StandIn(sm90_stand_in.Sm90WithoutGpu):
    device, stream = 0, 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return self.stream


stand_in = StandIn()
driver.set_active(stand_in)

SCALE = tl.constexpr(2)
COMPUTE = tl.float32  # (a dtype: a global without a constexpr's value)


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr, OFFSET: tl.constexpr = 0):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    tl.store(y_ptr + offsets, x * alpha * SCALE + OFFSET, mask=mask)


@triton.jit
def fill_kernel(y_ptr, n, C: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.zeros((BLOCK,), tl.float32) + C, mask=offsets < n)


calls = []  # (compiled kernel, launcher arguments) of every launcher call


def stub_launchers():
    """Every compiled kernel's launcher a recorder (handles 'loaded': nothing runs)."""
    def recorder(compiled):
        return lambda *args: calls.append((compiled, args))

    sm90_stand_in.stub_launchers((scale_kernel, fill_kernel), recorder)


def prepare(kernel, grid, *args, **kwargs):
    """Compile the launch's kernel (no launch), then stub its launcher."""
    JITFunction.run(kernel, *args, grid=grid, warmup=True, **kwargs)
    stub_launchers()


def launch(cache, kernel, grid, *args, **kwargs):
    """One launch through `cache`: exactly one launcher call, returned."""
    before = len(calls)
    cache.launch(kernel, grid, args, kwargs)
    assert len(calls) == before + 1, (before, len(calls))
    return calls[-1]


def through_jit(kernel, grid, *args, **kwargs):
    """The launcher call JITFunction.run makes for the same launch."""
    kernel[grid](*args, **kwargs)
    return calls.pop()


def fill(cache, kernel, grid, *args, **kwargs):
    """A key's first two launches: through JITFunction.run (the second checked), no hit; an
    entry after them."""
    prepare(kernel, grid, *args, **kwargs)
    hits, entries = cache.hits, len(cache.entries(kernel))
    launch(cache, kernel, grid, *args, **kwargs)
    launch(cache, kernel, grid, *args, **kwargs)
    assert cache.hits == hits, "a hit before the key's check"
    assert len(cache.entries(kernel)) == entries + 1, "no entry after the check"


def check_hit(cache, kernel, grid, *args, **kwargs):
    """A hit: the cache's launcher call is JITFunction.run's (same compiled kernel, same
    arguments; None for the launch metadata and the empty hook chains)."""
    hits = cache.hits
    compiled, launched = launch(cache, kernel, grid, *args, **kwargs)
    assert cache.hits == hits + 1, "not a hit"
    jit_compiled, jit_launched = through_jit(kernel, grid, *args, **kwargs)
    assert compiled is jit_compiled, "another compiled kernel than JITFunction.run's"
    assert launch_module._as_launched(jit_launched, launched), (args, kwargs, jit_launched, launched)
    assert launched[6:9] == (None, None, None)
    return compiled, launched


def assert_no_hits(cache, kernel, grid, *args, times=3, **kwargs):
    """Every launch through JITFunction.run: no hit, one launch each."""
    hits = cache.hits
    for _ in range(times):
        launch(cache, kernel, grid, *args, **kwargs)
    assert cache.hits == hits, "a hit"


x, y = torch.randn(300), torch.empty(300)
summary = {}

# 1. Two launches through JITFunction.run (the second checked), then hits: new tensors and
#    another grid alike; verify_hits agrees.
cache = LaunchCache()
fill(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
aligned, _ = check_hit(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
check_hit(cache, scale_kernel, (5, 1), torch.randn(300), torch.empty(300), 300, 1.5, BLOCK=128)
cache.verify_hits = True
hits = cache.hits
launch(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
assert cache.hits == hits + 1
cache.verify_hits = False

# 2. A pointer 4 bytes off, all else the same: a key of its own, and Triton's other compiled
#    kernel.  A bf16 input: another key and kernel too.
y_off = torch.empty(301)[1:]
fill(cache, scale_kernel, (3,), x, y_off, 300, 1.5, BLOCK=128)
misaligned, _ = check_hit(cache, scale_kernel, (3,), x, y_off, 300, 1.5, BLOCK=128)
assert misaligned is not aligned
x_bf16 = x.to(torch.bfloat16)
fill(cache, scale_kernel, (3,), x_bf16, y, 300, 1.5, BLOCK=128)
assert check_hit(cache, scale_kernel, (3,), x_bf16, y, 300, 1.5, BLOCK=128)[0] is not aligned

# 3. Integers of each specialisation (1, a multiple of 16, other), a float of another value, a
#    bool against an int by name and by position, a default constexpr given: keys of their own,
#    each hit JITFunction.run's compiled kernel.
for n, alpha, offset in ((1, 1.5, 0), (16, 1.5, 0), (17, 1.5, 0), (100, 1.5, 0), (100, 2.5, 0), (100, 1.5, 1),
                         (100, 1.5, True)):
    fill(cache, scale_kernel, (1,), x, y, n, alpha, BLOCK=128, OFFSET=offset)
    check_hit(cache, scale_kernel, (1,), x, y, n, alpha, BLOCK=128, OFFSET=offset)
for offset in (1, True):
    fill(cache, scale_kernel, (1,), x, y, 100, 1.5, 128, offset)
    check_hit(cache, scale_kernel, (1,), x, y, 100, 1.5, 128, offset)
summary["entries"] = len(cache.entries(scale_kernel))
assert summary["entries"] == 3 + 7 + 2, summary

# 4. A float constexpr by position: each value its own key and compiled kernel.
compiled = []
for c in (1.5, 2.5):
    fill(cache, fill_kernel, (3,), y, 300, c, 128)
    compiled.append(check_hit(cache, fill_kernel, (3,), y, 300, c, 128)[0])
assert compiled[0] is not compiled[1]

# 5. The debug settings (knobs.runtime.debug, the kernel's own) and the instrumentation mode
#    (one that changes nothing but the compile options): keys of their own, their kernel's launch.
for owner, name, value in ((knobs.runtime, "debug", True), (scale_kernel, "debug", True),
                           (knobs.compilation, "instrumentation_mode", "ekd-test")):
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        fill(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
        assert check_hit(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)[0] is not aligned
    finally:
        setattr(owner, name, before)
check_hit(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)

# 6. The current stream: a hit launches on it; another current device: a key of its own.
stand_in.stream = 7
assert check_hit(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)[1][3] == 7
stand_in.stream, stand_in.device = 0, 1
fill(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
assert check_hit(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)[0] is not aligned
stand_in.device = 0

# 7. Hooks: a launch enter or exit hook (a profiler: JITFunction.run, which hands the hook chain
#    to the launcher), a pre-run hook, a stages inspection hook (triton 3.8: part of the kernel's
#    key): JITFunction.run at every launch.
hook = lambda metadata: None  # noqa: E731
for chain in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
    chain.add(hook)
    try:
        assert_no_hits(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
        assert launch(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)[1][7:9] == (
            knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    finally:
        chain.remove(hook)
pre_run = []
scale_kernel.add_pre_run_hook(lambda *args, **kwargs: pre_run.append(1))
assert_no_hits(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
assert len(pre_run) == 3
scale_kernel.pre_run_hooks.clear()
if hasattr(knobs.runtime, "add_stages_inspection_hook"):
    knobs.runtime.add_stages_inspection_hook = lambda *args: ("ekd-test", "0") if not args else None
    try:
        prepare(scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
        assert_no_hits(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
    finally:
        knobs.runtime.add_stages_inspection_hook = None
check_hit(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)

# 8. A global the kernel reads, rebound (a constexpr, a dtype) or changed in place: JITFunction.run's
#    error, not the old kernel; restored, the key is filled again.
def changed_global_raises(name):
    try:
        cache.launch(scale_kernel, (3,), (x, y, 300, 1.5), dict(BLOCK=128))
    except RuntimeError as error:
        assert name in str(error), error
    else:
        raise AssertionError(f"a changed {name} launched the old kernel")


def change_global(change, changed):
    """Rebind SCALE, change its value in place, or rebind COMPUTE; or undo it."""
    global SCALE, COMPUTE
    if change == "rebind":
        SCALE = tl.constexpr(3 if changed else 2)
    elif change == "in place":
        SCALE.value = 3 if changed else 2
    else:
        COMPUTE = tl.bfloat16 if changed else tl.float32


for change in ("rebind", "in place", "dtype"):
    change_global(change, True)
    changed_global_raises("COMPUTE" if change == "dtype" else "SCALE")
    change_global(change, False)
    fill(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)
    check_hit(cache, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)

# 9. Arguments the cache does not key (a constexpr object, by name or position), a callable grid,
#    the cache off: JITFunction.run each time.
base = (x, y, 300, 1.5)
for grid, args, kwargs, use in (((3,), base, dict(BLOCK=tl.constexpr(128)), cache),
                                ((3,), base + (tl.constexpr(128),), dict(), cache),
                                (lambda meta: (3,), base, dict(BLOCK=128), cache),
                                ((3,), base, dict(BLOCK=128), LaunchCache(enabled=False))):
    prepare(scale_kernel, (3,), *args, **kwargs)
    assert_no_hits(use, scale_kernel, grid, *args, **kwargs)

# 10. A bounded table: past MAX_ENTRIES keys it starts again.
launch_module.MAX_ENTRIES, bounded = 2, LaunchCache()
for n in (17, 100, 300):
    for _ in range(2):
        launch(bounded, scale_kernel, (3,), x, y, n, 1.5, BLOCK=128)
assert len(bounded.entries(scale_kernel)) == 1
launch_module.MAX_ENTRIES = 256

# 11. A JITFunction.run that called the launcher twice (a hit of another thread through the
#     wrapped launcher): no entry, the kernel not given up; the next launches fill the key.
real_run = JITFunction.run


def run_twice(self, *args, grid, warmup, **kwargs):
    compiled = real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    if not warmup:
        real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    return compiled


twice = LaunchCache()
JITFunction.run = run_twice
for _ in range(3):
    twice.launch(scale_kernel, (3,), (x, y, 300, 1.5), dict(BLOCK=128))
JITFunction.run = real_run
assert twice.hits == 0 and not twice.entries(scale_kernel) and twice.disabled_kernels() == []
launch(twice, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)  # (the third launch above noted the key)
assert twice.hits == 0 and len(twice.entries(scale_kernel)) == 1
check_hit(twice, scale_kernel, (3,), x, y, 300, 1.5, BLOCK=128)

# 12. A Triton whose JITFunction.run passes the launcher something else (3.2 passed only the
#     non-constexpr values): the check fails, the kernel keeps JITFunction.run, every launch
#     still launches once.
def run_without_constexprs(self, *args, grid, warmup, **kwargs):
    compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
    if not warmup:
        compiled.run(grid[0], 1, 1, 0, compiled.function, compiled.packed_metadata, None, None, None, *args)
    return compiled


JITFunction.run = run_without_constexprs
other = LaunchCache()
assert_no_hits(other, scale_kernel, (3,), x, y, 300, 1.5, times=4, BLOCK=128)
assert other.disabled_kernels() == ["scale_kernel"], other.disabled_kernels()
JITFunction.run = real_run

# 13. verify_hits catches a hit that would launch something else than JITFunction.run.
cache.verify_hits = True
key = launch_module._key(scale_kernel, 0, knobs.runtime, (x, y, 300, 1.5), dict(BLOCK=128))
compiled_kernel, tail, globals_then = cache._tables[id(scale_kernel)][1][key]
cache._tables[id(scale_kernel)][1][key] = (compiled_kernel, (64, 0), globals_then)  # a wrong BLOCK
try:
    cache.launch(scale_kernel, (3,), (x, y, 300, 1.5), dict(BLOCK=128))
except LaunchMismatch:
    pass
else:
    raise AssertionError("verify_hits missed a wrong launch")

# 14. A float given by keyword, 0.0 then -0.0 (equal by ==): a hit passes the keyword values
#     stored at its key's check, so each sign is a key of its own, and a hit passes -0.0.
cache.verify_hits = False
for alpha in (0.0, -0.0):
    fill(cache, scale_kernel, (3,), x, y, 300, alpha=alpha, BLOCK=128)
    _, launched = check_hit(cache, scale_kernel, (3,), x, y, 300, alpha=alpha, BLOCK=128)
    assert str(launched[9 + 3]) == str(alpha), (alpha, launched[9:])  # (x, y, n, alpha, ...)

summary["hits"] = cache.hits
print(json.dumps(summary))
