"""Install what `make test` / `make bench` need, and only what is missing.

On a machine that already has torch, triton and friends (the offline GPU machine) nothing is
downloaded; on a fresh machine the missing packages come from requirements-dev.txt. A line whose
comment says "optional" (plots, for instance) is attempted, and its failure (no network) is
reported without stopping: the code that uses it says what it skipped.
"""

import argparse
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

REQUIREMENTS = pathlib.Path(__file__).resolve().parent.parent / "requirements-dev.txt"
# distribution name -> how to tell it is present, where the import name differs or a binary will do
_PRESENT = {
    "ninja": lambda: importlib.util.find_spec("ninja") is not None or shutil.which("ninja") is not None,
    "scikit-learn": lambda: importlib.util.find_spec("sklearn") is not None,
    "pytest-xdist": lambda: importlib.util.find_spec("xdist") is not None,
}


def requirements():
    """(requirement, optional) per line of requirements-dev.txt."""
    out = []
    for line in REQUIREMENTS.read_text().splitlines():
        spec, _, comment = line.partition("#")
        spec = spec.strip()
        if spec:
            out.append((spec, "optional" in comment))
    return out


def is_present(spec: str) -> bool:
    """Whether `spec` (a requirement line) is met: importable (or, for ninja, on the PATH), and its
    installed version within the line's bounds (a system torch 2.4 seen through
    --system-site-packages does not meet torch>=2.6)."""
    name = re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0]
    if not _PRESENT.get(name, lambda: importlib.util.find_spec(name.replace("-", "_")) is not None)():
        return False
    return _version_allowed(spec, name)


def _version_allowed(spec: str, name: str) -> bool:
    """The installed distribution's version against the bounds of `spec`; True without bounds, for
    what is present without a distribution (a ninja binary), or without `packaging` to read them."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return True
    requirement = Requirement(spec)
    if not requirement.specifier:
        return True
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        return True
    return requirement.specifier.contains(installed, prereleases=True)


def _version(distribution: str):
    """(major, minor) of an installed distribution, None when absent."""
    from importlib import metadata

    try:
        return tuple(int(part) for part in re.findall(r"\d+", metadata.version(distribution))[:2])
    except metadata.PackageNotFoundError:
        return None


def compatibility_fixes():
    """Pins for known-bad combinations of what is installed. triton < 3.7's interpreter (the
    Triton tests' CPU path) does int() on 1-element arrays, which numpy >= 2.4 refuses: every
    Triton test would fail. The tests' conftest stops with the same explanation."""
    triton, numpy = _version("triton"), _version("numpy")
    if triton is not None and numpy is not None and triton < (3, 7) and numpy >= (2, 4):
        return ["numpy<2.4"]
    return []


def main():
    missing = [(spec, optional) for spec, optional in requirements() if not is_present(spec)]
    required = [spec for spec, optional in missing if not optional]
    optional = [spec for spec, optional in missing if optional]
    if required:
        print("ensure_deps: installing", " ".join(required), flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", *required])
    for spec in optional:
        print(f"ensure_deps: installing optional {spec}", flush=True)
        if subprocess.call([sys.executable, "-m", "pip", "install", spec]) != 0:
            print(f"ensure_deps: could not install optional {spec}; continuing without it", flush=True)
    fixes = compatibility_fixes()
    if fixes:
        print("ensure_deps: installing", " ".join(fixes), "(triton < 3.7's interpreter needs numpy < 2.4)", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", *fixes])
    if not missing and not fixes:
        print("ensure_deps: everything needed is installed")


if __name__ == "__main__":
    # (no options: but --help must print this, not install, and a stray argument is refused)
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
