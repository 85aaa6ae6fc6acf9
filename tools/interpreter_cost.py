"""Per-kernel time of the Triton backend under the interpreter (TRITON_INTERPRET=1, CPU tensors):
where CI's time goes, not a GPU figure.  Times each launch (GridExecutor.__call__) over a few
forward + backward calls after a first, untimed one, with the test suite's interpreter fast path
(python_tests/conftest.py: triton.language patched once per module and launch) unless
--every-call.

    python tools/interpreter_cost.py              # B = 90, 3 timed calls
    python tools/interpreter_cost.py 256 --calls 1
    python tools/interpreter_cost.py 90 --every-call   # the interpreter's own patching, for the A/B
"""
import argparse
import collections
import os
import pathlib
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
TESTS = pathlib.Path(__file__).resolve().parent.parent / "python_tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "bench"))

from common import at_least  # noqa: E402  (bench/)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=at_least(2), nargs="?", default=90)
    parser.add_argument("--calls", type=at_least(1), default=3)
    parser.add_argument("--every-call", action="store_true",
                        help="without the suite's fast path: the interpreter patches at every helper call")
    args = parser.parse_args()
    if not args.every_call:
        import conftest  # noqa: F401 - installs the fast path, as under pytest

    from triton.runtime import interpreter

    from ekd_kernels import EKDLoss
    from helpers import make_batch

    seconds, launches = collections.Counter(), collections.Counter()
    launch = interpreter.GridExecutor.__call__

    def timed_launch(self, *a, **k):
        start = time.perf_counter()
        try:
            return launch(self, *a, **k)
        finally:
            seconds[self.fn.__name__] += time.perf_counter() - start
            launches[self.fn.__name__] += 1

    interpreter.GridExecutor.__call__ = timed_launch
    loss = EKDLoss(backend="triton")
    student, teacher, labels = make_batch(args.batch, 64, 64, max(args.batch // 4, 1), seed=0)

    def call():
        loss(student.clone().requires_grad_(True), teacher, labels).backward()

    call()  # first call: the kernels' rewrite, untimed
    seconds.clear()
    launches.clear()
    start = time.perf_counter()
    for _ in range(args.calls):
        call()
    total = (time.perf_counter() - start) / args.calls
    path = "every helper call patches" if args.every_call else "patched once per module and launch"
    print(f"B = {args.batch}, {args.calls} timed calls, {path}: per forward + backward")
    for name, value in seconds.most_common():
        print(f"  {name:32s} {value / args.calls * 1e3:8.1f} ms  ({launches[name] // args.calls} launches)")
    print(f"  {'kernels':32s} {sum(seconds.values()) / args.calls * 1e3:8.1f} ms")
    print(f"  {'whole call':32s} {total * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
