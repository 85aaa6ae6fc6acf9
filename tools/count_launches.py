"""Launch count of the Triton backend per call: its Triton kernels and the torch "glue" ops around
them (each a kernel launch on a GPU, ~5 us of launch and dispatch whatever B is: at B <= 2048
they, not the arithmetic, set the time). Runs on CPU under the Triton interpreter, whose own
torch work inside a launch is excluded; ops that launch nothing (views, empty) are not counted.

    python tools/count_launches.py triton 256                      # default options
    python tools/count_launches.py triton 256 critical_only=True   # EKDLoss options as key=value
    python tools/count_launches.py triton 256 negative_selection=random num_hard_negatives=100
"""
import os, pathlib, sys, collections
os.environ["TRITON_INTERPRET"]="1"
import torch
# (from this file, not the working folder: it ran from the repository's root only)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "python_tests"))
from helpers import make_batch
from ekd_kernels import EKDLoss
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
NOLAUNCH = {"empty","empty_strided","view","as_strided","select","slice","detach","reshape","expand","t","transpose",
 "unsqueeze","squeeze","alias","_reshape_alias","lift_fresh","empty_like","_unsafe_view","permute","unbind","split",
 "narrow","_local_scalar_dense","set_","resize_","expand_as","view_as","flatten","sym_size","sym_stride","sym_numel","dim", "is_same_size",
 "split_with_sizes"}  # (split_with_sizes: views of one scratch buffer, _forward_impl's carving)
class Count(TorchDispatchMode):
    def __init__(s): super().__init__(); s.c=collections.Counter()
    def __torch_dispatch__(s, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOLAUNCH: s.c[name] += 1
        return func(*args, **(kwargs or {}))
from triton.runtime import interpreter
launches = collections.Counter()
orig = interpreter.GridExecutor.__call__
def call(self, *a, **k):
    launches[self.fn.__name__] += 1
    with _disable_current_modes():
        return orig(self, *a, **k)
interpreter.GridExecutor.__call__ = call
import argparse
_parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_parser.add_argument("backend", choices=["triton"], help="the backend counted (its kernels run in the interpreter)")
_parser.add_argument("batch", type=int, nargs="?", default=256, help="B (default 256)")
_parser.add_argument("options", nargs="*", help="EKDLoss options as key=value")
_args = _parser.parse_args()
for _option in _args.options:
    if "=" not in _option:
        _parser.error(f"options are key=value, got {_option!r}")
backend, B = _args.backend, _args.batch
opts = dict(a.split("=", 1) for a in _args.options)
def parse(v):
    if v in ("True", "False"): return v == "True"
    for kind in (int, float):
        try: return kind(v)
        except ValueError: pass
    return v
opts = {k: parse(v) for k,v in opts.items()}
kw = dict(generator=torch.Generator().manual_seed(0)) if opts.get("negative_selection") == "random" else {}
import ekd_kernels.triton_ekd as te
# The GPU's small-sort limit, not the interpreter's lower one (kept low there for speed only): the
# backward's 2N entries then take the sort kernel as on a GPU (N <= 4096), not torch.sort.
te.INTERPRETER_SMALL_SORT_MAX = te.SMALL_SORT_MAX
crit = EKDLoss(backend=backend, **opts)
s,t,l = make_batch(B, 64, 64, B//4, seed=0)
x = s.clone().requires_grad_(True); crit(x,t,l,**kw).backward()
counter = Count()
fi = te._forward_impl
launches.clear()
def fwd(*a, **k):
    with counter: return fi(*a, **k)
te._forward_impl = fwd
x = s.clone().requires_grad_(True)
loss = crit(x,t,l,**kw)
fw, fl = counter.c.copy(), dict(launches); counter.c.clear(); launches.clear()
bi = te._backward_impl
def bwd(*a, **k):
    with counter: return bi(*a, **k)
te._backward_impl = bwd
loss.backward()
print(f"{backend} B={B} {opts}: forward {sum(fw.values())} glue ops + {sum(fl.values())} kernels; backward {sum(counter.c.values())} glue ops + {sum(launches.values())} kernels")
print("fw", fw.most_common(), "kernels", fl)
print("bw", counter.c.most_common(), "kernels", dict(launches))
# The whole call as a training step makes it (EKDLoss.forward, then loss.backward()): adds the
# module's glue (EMA state copies) and what autograd dispatches around the ops.  Under the counting
# mode the call takes the registered op (a dispatch mode sees the op, _autograd.eager_call); the
# eager path runs no torch op around the kernels' either (teacher.detach and the stats' detach
# are views), so the glue counted here is what an eager call dispatches too.
te._forward_impl, te._backward_impl = fi, bi
counter.c.clear(); launches.clear()
x = s.clone().requires_grad_(True)
with counter:
    crit(x, t, l, **kw).backward()
outside = {k: v for k, v in counter.c.items() if not k.startswith(("triton_ekd_", "ekd_"))}  # the ops: counted above
print(f"outside the ops (module + autograd, ones_like is backward()'s seed): {sum(outside.values())} glue ops",
      sorted(outside.items()))
