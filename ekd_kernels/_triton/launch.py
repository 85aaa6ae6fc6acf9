"""Triton launches without the per-call work of ``JITFunction.run`` that repeats from call to call.

Why: at B <= 1024 a forward+backward of the Triton backend is host time (bench/NOTES.md: 1.9-2.4
ms eager on the H200's host against 0.43-0.52 ms of device time).  ``kernel[grid](*args)`` goes
through ``JITFunction.run``, which on every launch binds the arguments to the kernel's
parameters, specialises each one (dtype, 16-byte alignment of pointers, the class of integers),
builds the compiled-kernel cache key and checks every global the kernel read (a
``tl.constexpr`` comparison each, through Python operator overloads) before it calls the
compiled kernel's launcher: 4-14 us of Python a launch on this project's CPU
(``tools/host_cost.py``), about 13 launches a call.

What: ``LaunchCache.launch`` keeps, per kernel, the compiled kernel that ``JITFunction.run``
picked under a key that is *finer* than Triton's: every integer, bool, string or None
argument's exact class and value, a float's type (Triton compiles any float as fp32), every
tensor's dtype and whether its address is 16-byte aligned, the keyword arguments, the current
device and Triton's debug and instrumentation settings.  Equal keys imply equal
Triton keys, so the same compiled kernel is right, and a hit calls its launcher directly.

Checked, not assumed: the first launch under a key goes through ``JITFunction.run`` with the
compiled kernel's launcher wrapped, and the entry is kept only when ``JITFunction.run`` called it
with exactly what a hit would pass (grid, stream, function, metadata and each argument the same
object; empty hook chains where a hit passes None).  A Triton whose launch convention differs (3.2 passes only the non-constexpr
values) or whose internals are not where this expects them never takes the fast path: that
kernel keeps ``JITFunction.run``.  Launch hooks (profilers: a non-empty
``knobs.runtime.launch_enter_hook`` or ``launch_exit_hook``), pre-run hooks, a callable grid or an
unhashable argument also go through ``JITFunction.run``, as does a hit whose kernel's globals
were rebound since (``JITFunction.run`` then raises, as it would have).

``EKD_TRITON_LAUNCH_CACHE=0`` turns it off (every launch through ``JITFunction.run``).
"""
import os
import threading

import torch

try:
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError:  # triton < 3.3 has no knobs: every launch through JITFunction.run
    knobs = driver = JITFunction = None

_MISSING = object()
_DISABLED = "disabled"  # a kernel's table once its check failed: JITFunction.run from then on

#: Entries kept per kernel before its table is emptied (keys hold exact integer and float
#: values: a run that varies them call after call must not grow the table without bound).
MAX_ENTRIES = 256


def _no_hook(hook) -> bool:
    """Whether a launch hook calls nothing: None (older Triton) or an empty HookChain (3.6 on:
    knobs.runtime's hooks are chains, never None, and the launcher calls them when not None)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def _as_launched(launched, expected) -> bool:
    """Whether JITFunction.run's launcher call `launched` is the fast path's `expected`: grid,
    stream, function and metadata, then every argument, the same; in between, the launch
    metadata (read only by the hooks) and the two hooks, which JITFunction.run passes as empty
    HookChains where the fast path passes None: neither calls anything."""
    return (launched is not None and len(launched) == len(expected) and all(map(_same, launched[:6], expected[:6]))
            and _no_hook(launched[7]) and _no_hook(launched[8]) and all(map(_same, launched[9:], expected[9:])))


def _same(a, b) -> bool:
    """Whether a launcher argument is what JITFunction.run passed: the same object, or an equal
    value of the same class (grid sizes and handles are ints, not always the same object)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


class LaunchMismatch(AssertionError):
    """With ``verify_hits``: a hit would have launched something else than JITFunction.run."""


#: The argument classes a key holds by value (anything else goes through JITFunction.run).
_PLAIN = frozenset((int, float, bool, str, type(None)))


def _key(device, runtime, args, kwargs):
    """The cache key of a launch, or None when an argument is not one this cache keys.  Finer
    than Triton's specialisation, which looks at a tensor's dtype and 16-byte alignment, at an
    integer's class of value (1, a multiple of 16, 32 or 64 bits) and at a float's type only:
    the key holds every other argument's exact class and value, so that equal keys mean the same
    compiled kernel."""
    key = [device, runtime.debug, knobs.compilation.instrumentation_mode]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append(arg.dtype)
            key.append(not arg.data_ptr() & 15)
        elif arg.__class__ is float:  # (Triton takes every float as fp32, whatever its value)
            key.append(float)
            key.append(None)
        elif arg.__class__ in _PLAIN:
            key.append(arg.__class__)
            key.append(arg)
        else:
            return None
    for name, value in kwargs.items():
        if value.__class__ not in _PLAIN:
            return None
        key.append(name)
        key.append(value.__class__)  # (True == 1, and both hash alike)
        key.append(value)
    return tuple(key)


def _launcher_args(compiled, grid, stream, args, tail):
    """What JITFunction.run passes the compiled kernel's launcher, with no launch hooks."""
    size = len(grid)
    return (grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, compiled.function,
            compiled.packed_metadata, None, None, None, *args, *tail)


class LaunchCache:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and knobs is not None
        #: Tests: every hit goes through JITFunction.run instead (its launcher wrapped), which
        #: must have launched what the hit would have, else LaunchMismatch.
        self.verify_hits = False
        self.hits = 0
        self._tables = {}  # id(kernel) -> (name, {key: (compiled, tail, globals)} or _DISABLED)
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every entry and every kernel's failed check."""
        with self._lock:
            self._tables = {}
            self.hits = 0

    def disabled_kernels(self):
        """The kernels whose check failed: JITFunction.run at each of their launches."""
        return sorted(name for name, table in self._tables.values() if table is _DISABLED)

    def entries(self, kernel):
        """{key: compiled kernel} of `kernel`'s entries (tests)."""
        table = self._tables.get(id(kernel), (None, None))[1]
        return {key: entry[0] for key, entry in table.items()} if isinstance(table, dict) else {}

    def launch(self, kernel, grid, args, kwargs):
        """``kernel[grid](*args, **kwargs)``."""
        runtime = knobs.runtime if self.enabled else None
        if (runtime is None or type(kernel) is not JITFunction or not isinstance(grid, tuple)
                or not _no_hook(runtime.launch_enter_hook) or not _no_hook(runtime.launch_exit_hook)
                or kernel.pre_run_hooks or getattr(runtime, "add_stages_inspection_hook", None) is not None):
            return kernel[grid](*args, **kwargs)
        table = self._tables.get(id(kernel), (None, None))[1]
        if table is _DISABLED:
            return kernel[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        key = _key(device, runtime, args, kwargs)
        if key is None:
            return kernel[grid](*args, **kwargs)
        entry = table.get(key) if table else None
        if entry is None:
            return self._first_launch(kernel, grid, args, kwargs, key, device)
        compiled, tail, rebound = entry
        for globals_dict, name, value in rebound:
            if globals_dict.get(name, _MISSING) is not value:  # rebound since: Triton's own check decides
                table.pop(key, None)
                return kernel[grid](*args, **kwargs)
        launcher_args = _launcher_args(compiled, grid, driver.active.get_current_stream(device), args, tail)
        if self.verify_hits:
            if not _as_launched(self._through_jit(kernel, grid, args, kwargs, compiled), launcher_args):
                raise LaunchMismatch(f"{kernel.__name__}: the cached launch differs from JITFunction.run's")
        else:
            compiled.run(*launcher_args)
        self.hits += 1
        return compiled

    def _through_jit(self, kernel, grid, args, kwargs, compiled):
        """Launch through JITFunction.run with `compiled`'s launcher wrapped: the arguments it was
        called with (None when it was not called once, or there is no launcher to wrap yet)."""
        real = getattr(compiled, "_run", None)
        if real is None:  # (JITFunction.run makes it at the kernel's first launch)
            kernel[grid](*args, **kwargs)
            return None
        calls = []

        def wrapped(*launcher_args):
            calls.append(launcher_args)
            return real(*launcher_args)

        compiled._run = wrapped
        try:
            kernel[grid](*args, **kwargs)
        finally:
            compiled._run = real
        return calls[0] if len(calls) == 1 else None

    def _first_launch(self, kernel, grid, args, kwargs, key, device):
        """A launch under a new key: through JITFunction.run, checked; the entry kept when it
        launched what a hit would have (else the kernel keeps JITFunction.run for good)."""
        with self._lock:
            compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)  # compiles; launches nothing
            if hasattr(compiled, "result"):  # (an asynchronous compile)
                compiled = compiled.result()
            if getattr(compiled, "_run", None) is None:  # not launched yet (or not a CompiledKernel):
                return kernel[grid](*args, **kwargs)  # checked at the next launch
            tail = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in kernel.params[len(args):])
            expected = _launcher_args(compiled, grid, driver.active.get_current_stream(device), args, tail)
            launched = self._through_jit(kernel, grid, args, kwargs, compiled)
            name, table = self._tables.get(id(kernel), (kernel.__name__, {}))
            if table is _DISABLED:
                return compiled
            if not _as_launched(launched, expected):
                self._tables[id(kernel)] = (name, _DISABLED)
                return compiled
            if len(table) >= MAX_ENTRIES:
                table = {}
            rebound = tuple((globals_dict, global_name, globals_dict.get(global_name, _MISSING))
                            for (global_name, _), (_, globals_dict) in kernel.used_global_vals.items())
            table[key] = (compiled, tail, rebound)
            self._tables[id(kernel)] = (name, table)
            return compiled


launches = LaunchCache(enabled=os.environ.get("EKD_TRITON_LAUNCH_CACHE", "1").strip().lower()
                       not in ("0", "false", "no", "off"))
