"""Install what `make test` / `make bench` need, and only what is missing.

On a machine that already has torch, triton and friends (the offline GPU machine) nothing is
downloaded; on a fresh machine the missing packages come from requirements-dev.txt.
"""

import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

REQUIREMENTS = pathlib.Path(__file__).resolve().parent.parent / "requirements-dev.txt"
# distribution name -> how to tell it is present
_PRESENT = {
    "ninja": lambda: importlib.util.find_spec("ninja") is not None or shutil.which("ninja") is not None,
}


def missing_requirements():
    missing = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~ \[]", line, maxsplit=1)[0]
        present = _PRESENT.get(name, lambda n=name: importlib.util.find_spec(n) is not None)
        if not present():
            missing.append(line)
    return missing


def main():
    missing = missing_requirements()
    if not missing:
        print("ensure_deps: everything needed is installed")
        return
    print("ensure_deps: installing", " ".join(missing), flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", *missing])


if __name__ == "__main__":
    main()
