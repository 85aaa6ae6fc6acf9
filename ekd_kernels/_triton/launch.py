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
used under a key that is *finer* than Triton's: every integer, float, bool, string or None
argument's exact class and value (and a keyword float's sign: -0.0 == 0.0; Triton looks at a
non-constexpr integer's class of value and a float's type only), every tensor's dtype and whether its address is 16-byte aligned, the
keyword arguments, the current device and the debug and instrumentation settings
(``knobs.runtime.debug``, the kernel's ``debug``, ``knobs.compilation.instrumentation_mode``).
Equal keys imply equal Triton keys, so the same compiled kernel is right, and a hit calls its
launcher directly.

Checked, not assumed: the first launch under a key goes through ``JITFunction.run`` as usual;
the second too, with the launcher of the compiled kernel the first one used wrapped, and the
entry is kept only when ``JITFunction.run`` called that launcher once with exactly what a hit
would pass (grid, stream, function, metadata and each argument the same object; empty hook
chains where a hit passes None).  A Triton whose launch convention differs (3.2 passes only
the non-constexpr values) fails that check and the kernel keeps ``JITFunction.run``, as does
every kernel where ``triton.knobs`` or the attributes read here are missing.  Launch hooks
(profilers: a non-empty ``knobs.runtime.launch_enter_hook`` or ``launch_exit_hook``), pre-run
hooks, a stages inspection hook, a callable grid and arguments of other kinds also go through
``JITFunction.run``, as does a hit whose kernel's globals were rebound or changed in place
since (``JITFunction.run`` then raises, as it would have).

Like Triton's own in-memory cache, an entry outlives a change of a compile setting that is
not part of Triton's key (``knobs.language.default_fp_fusion``, ``TRITON_F32_DEFAULT``, ptxas
or architecture overrides); whoever clears Triton's cache to recompile after such a change
(``kernel.device_caches.clear()``) clears this one with it (``clear()``).

``EKD_TRITON_LAUNCH_CACHE=0`` turns it off (every launch through ``JITFunction.run``).
"""
import math
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

#: The argument classes a key holds by value (anything else goes through JITFunction.run).
_PLAIN = frozenset((int, float, bool, str, type(None)))


def _supported() -> bool:
    """Whether this Triton has what the cache reads on every launch."""
    runtime = getattr(knobs, "runtime", None)
    compilation = getattr(knobs, "compilation", None)
    return (runtime is not None and compilation is not None and hasattr(compilation, "instrumentation_mode")
            and all(hasattr(runtime, name) for name in ("debug", "launch_enter_hook", "launch_exit_hook")))


def _no_hook(hook) -> bool:
    """Whether a launch hook calls nothing: None (older Triton) or an empty HookChain (3.6 on:
    knobs.runtime's hooks are chains, never None, and the launcher calls them when not None)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def _same(a, b) -> bool:
    """Whether a launcher argument is what JITFunction.run passed: the same object, or an equal
    value of the same class (grid sizes and handles are ints, not always the same object)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


def _as_launched(launched, expected) -> bool:
    """Whether JITFunction.run's launcher call `launched` is the fast path's `expected`: grid,
    stream, function and metadata, then every argument, the same; in between, the launch
    metadata (read only by the hooks) and the two hooks, which JITFunction.run passes as empty
    HookChains where the fast path passes None: neither calls anything."""
    return (len(launched) == len(expected) and all(map(_same, launched[:6], expected[:6]))
            and _no_hook(launched[7]) and _no_hook(launched[8]) and all(map(_same, launched[9:], expected[9:])))


def _key(kernel, device, runtime, args, kwargs):
    """The cache key of a launch, or None when an argument is not one this cache keys (see the
    module's docstring: finer than Triton's, so that equal keys mean the same compiled kernel)."""
    key = [device, runtime.debug, kernel.debug, knobs.compilation.instrumentation_mode]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append(arg.dtype)
            key.append(not arg.data_ptr() & 15)
        elif arg.__class__ in _PLAIN:
            key.append(arg.__class__)  # (True == 1, and both hash alike)
            key.append(arg)
        else:
            return None
    for name, value in kwargs.items():
        if value.__class__ not in _PLAIN:
            return None
        key.append(name)
        key.append(value.__class__)
        key.append(value)
        if value.__class__ is float:
            # A hit passes the keyword values stored at the key's check, not this launch's:
            # -0.0 == 0.0, so the sign is part of the key (a positional value is passed as given).
            key.append(math.copysign(1.0, value))
    return tuple(key)


def _launcher_args(compiled, grid, stream, args, tail):
    """What JITFunction.run passes the compiled kernel's launcher, with no launch hooks."""
    size = len(grid)
    return (grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, compiled.function,
            compiled.packed_metadata, None, None, None, *args, *tail)


def _globals_now(kernel):
    """(globals dict, name, object, its value) of every global the kernel read: a hit checks that
    none was rebound (the object) or changed in place (a constexpr's value)."""
    now = [(globals_dict, name, globals_dict.get(name, _MISSING))
           for (name, _), (_, globals_dict) in kernel.used_global_vals.items()]
    return tuple((globals_dict, name, value, getattr(value, "value", _MISSING)) for globals_dict, name, value in now)


class LaunchMismatch(AssertionError):
    """With ``verify_hits``: a hit would have launched something else than JITFunction.run."""


class LaunchCache:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and _supported()
        #: Tests: every hit goes through JITFunction.run instead (its launcher wrapped), which
        #: must have launched what the hit would have, else LaunchMismatch.
        self.verify_hits = False
        self.hits = 0
        self._tables = {}  # id(kernel) -> (name, {key: (compiled, tail, globals)} or _DISABLED)
        self._pending = {}  # (id(kernel), key) -> the compiled kernel of the key's first launch
        self._lock = threading.RLock()  # misses and verified hits (they swap a launcher)

    def clear(self) -> None:
        """Forget every entry and every kernel's failed check."""
        with self._lock:
            self._tables, self._pending = {}, {}
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
                or getattr(kernel, "pre_run_hooks", True) or getattr(runtime, "add_stages_inspection_hook", None)):
            return kernel[grid](*args, **kwargs)
        table = self._tables.get(id(kernel), (None, None))[1]
        if table is _DISABLED:
            return kernel[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        key = _key(kernel, device, runtime, args, kwargs)
        if key is None:
            return kernel[grid](*args, **kwargs)
        entry = table.get(key) if table else None
        if entry is None:
            return self._miss(kernel, grid, args, kwargs, key, device)
        compiled, tail, globals_then = entry
        for globals_dict, name, value, constant in globals_then:
            now = globals_dict.get(name, _MISSING)
            if now is not value or getattr(now, "value", _MISSING) != constant:
                table.pop(key, None)  # rebound or changed: JITFunction.run decides (and raises)
                return kernel[grid](*args, **kwargs)
        launcher_args = _launcher_args(compiled, grid, driver.active.get_current_stream(device), args, tail)
        if self.verify_hits:
            with self._lock:
                launched = self._through_jit(kernel, grid, args, kwargs, compiled)
            if launched is None or not _as_launched(launched, launcher_args):
                raise LaunchMismatch(f"{kernel.__name__}: the cached launch differs from JITFunction.run's")
        else:
            compiled.run(*launcher_args)
        self.hits += 1
        return compiled

    @staticmethod
    def _through_jit(kernel, grid, args, kwargs, compiled):
        """Launch through JITFunction.run with `compiled`'s launcher wrapped (under the lock): the
        arguments it was called with, or None unless it was called exactly once."""
        real = getattr(compiled, "_run", None)
        if real is None:  # (not a launched CompiledKernel of these internals)
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

    def _miss(self, kernel, grid, args, kwargs, key, device):
        """A launch under a key without an entry, through JITFunction.run: the key's first notes
        the compiled kernel it used; the second is checked against a hit's launch, and the entry
        kept when they agree (the kernel keeps JITFunction.run for good when they differ)."""
        with self._lock:
            pending = self._pending.pop((id(kernel), key), None)
            if pending is None:
                compiled = kernel[grid](*args, **kwargs)
                if getattr(compiled, "_run", None) is not None:
                    if len(self._pending) >= 16 * MAX_ENTRIES:
                        self._pending = {}
                    self._pending[(id(kernel), key)] = compiled
                return compiled
            tail = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in kernel.params[len(args):])
            expected = _launcher_args(pending, grid, driver.active.get_current_stream(device), args, tail)
            launched = self._through_jit(kernel, grid, args, kwargs, pending)
            name, table = self._tables.get(id(kernel), (kernel.__name__, {}))
            if launched is None or table is _DISABLED:  # (another compiled kernel, or launched twice)
                return pending
            if not _as_launched(launched, expected):
                self._tables[id(kernel)] = (name, _DISABLED)
                return pending
            if len(table) >= MAX_ENTRIES:
                table = {}
            table[key] = (pending, tail, _globals_now(kernel))
            self._tables[id(kernel)] = (name, table)
            return pending


launches = LaunchCache(enabled=os.environ.get("EKD_TRITON_LAUNCH_CACHE", "1").strip().lower()
                       not in ("0", "false", "no", "off"))
