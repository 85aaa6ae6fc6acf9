"""Registers and spills of every Triton kernel variant a forward+backward launches, compiled for an
H100 (sm_90a) without a GPU: the launches go through the stand-in driver (tools/sm90_stand_in.py)
and compile only; each distinct PTX goes through Triton's bundled `ptxas -v`.  Variants: fp32
and bf16, at a small B (one pass-1 histogram) and with the large-B pass 1 forced (histogram
copies, head and tail).  Run with the triton whose figures you want (the GPU machine's is 3.6:
tools/check_torch_version.sh 2.11.0 leaves a venv with it).

    python tools/kernel_registers.py
    python tools/kernel_registers.py warps8-tiles tile32   # and these A/B variants
                                                                   # (gpu_exercise.TRITON_VARIANTS)

Each line ends with a short hash of the kernel's PTX without its debug lines (.loc, .file, the
debug sections: file paths and line numbers), so that two commits' outputs show which kernels
compile to other code (diff them).
"""
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # native compiles, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import sm90_stand_in  # noqa: E402  (tools/, this script's folder)


def main(variants):
    from gpu_exercise import backend_variant, triton_settings  # (tools/)

    from gpu_exercise import FORCED_TRITON_PATHS

    settings = {name: backend_variant(f"triton:{name}")[1] for name in variants}  # unknown names exit here
    launched = {}  # (label, variant, kernel) -> distinct PTX texts, in launch order

    def record(function, kernel):
        launched.setdefault((label, variant, function.__name__), {})[kernel.asm["ptx"]] = None

    sm90_stand_in.compile_launches(record)  # CPU tensors: nothing runs, all compiles
    from ekd_kernels import ekd_loss

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(300, 512, generator=generator), torch.randn(300, 512, generator=generator)
    labels = torch.arange(300) // 4
    for variant in [None, *variants]:
        for large_b in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                label = f"{str(dtype).replace('torch.', '')}{', large-B pass 1' if large_b else ''}"
                forced = FORCED_TRITON_PATHS["copies+head"] if large_b else {}
                with triton_settings(**{**forced, **settings.get(variant, {})}):  # the variant's win
                    leaf = student.to(dtype).requires_grad_(True)
                    ekd_loss(leaf, teacher.to(dtype), labels, backend="triton").loss.backward()
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    print(f"triton {triton.__version__}, {ptxas}")
    with tempfile.TemporaryDirectory() as tmp:
        for (label, variant, name), ptxs in launched.items():
            if variant is not None:  # a variant's kernels that compile as the default's are not listed again
                ptxs = [ptx for ptx in ptxs if ptx not in launched.get((label, None, name), {})]
                label = f"{label}, {variant}"
            for index, ptx in enumerate(ptxs):
                path = pathlib.Path(tmp) / f"{name}_{index}.ptx"
                path.write_text(ptx)
                done = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                                      capture_output=True, text=True)
                registers = re.search(r"Used (\d+) registers", done.stderr)
                spills = re.search(r"(\d+) bytes spill stores", done.stderr)
                print(f"  {label:40s} {name:26s} variant {index}: "
                      f"{registers.group(1) if registers else '?'} registers, "
                      f"{spills.group(1) if spills else '?'} B spill stores, ptx {code_hash(ptx)}")


def code_hash(ptx):
    """12 hex digits of the PTX's code: its debug lines and sections left out."""
    code = ptx.split(".section\t.debug")[0]
    lines = (line for line in code.splitlines() if not line.strip().startswith(("//", ".loc", ".file", "$L__")))
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="Triton A/B variants (gpu_exercise.TRITON_VARIANTS) compiled beside the default")
    main(parser.parse_args().variants)
