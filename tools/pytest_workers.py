"""Print the pytest-xdist options `make test` runs the suite with: `-n N --dist loadfile` where
pytest-xdist is installed and this process may use two cores or more, nothing otherwise (the
suite then runs in one process, as it always can).

Why workers: most of the suite's time on a CPU machine is one core's Python (the Triton
interpreter, Dynamo, the example's training); on CI's two cores a second worker runs the other
files beside test_triton.py. Why `loadfile`: a file runs whole in one worker, so its module
fixtures (the distributed runs of test_distributed.py, test_triton.py's background sm_90
compiles) run once, as in one process, and no file depends on the order of another's tests.
At most four workers: test_triton.py alone is about half of the suite, so more would only wait
for it.

`EKD_TEST_WORKERS=N` sets the count (0 or 1: one process); `PYTEST_ARGS=-n0` also overrides.
"""

import argparse
import importlib.util
import os
import sys

MAX_WORKERS = 4


def usable_cores() -> int:
    """The cores this process may run on (the affinity mask, which a container's cpuset limits),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def workers() -> int:
    wanted = os.environ.get("EKD_TEST_WORKERS", "").strip()
    if wanted:
        try:
            count = int(wanted)
        except ValueError:
            sys.exit(f"pytest_workers: EKD_TEST_WORKERS={wanted!r} is not a whole number of workers")
        if count < 0:
            sys.exit(f"pytest_workers: EKD_TEST_WORKERS={count} is negative")
        return count
    return min(usable_cores(), MAX_WORKERS)


def options() -> str:
    count = workers()
    if count < 2 or importlib.util.find_spec("xdist") is None:
        return ""
    return f"-n {count} --dist loadfile"


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(options())
