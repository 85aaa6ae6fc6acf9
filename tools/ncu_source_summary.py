"""Where a kernel's warps stall, instruction by instruction, from Nsight Compute's source page.

    ncu --section SourceCounters --section WarpStateStats -o rep python ...   # on the GPU
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python tools/ncu_source_summary.py sass.csv [--top 25]

The source page is a CSV with, per profiled kernel, a "Kernel Name" row, then a header row
(first column "Address") and one row per SASS instruction: its text ("Source"), how often it
ran ("Instructions Executed"), the warp-state samples taken at it (a column whose name holds
"Samples") and those samples by stall reason (columns named stall_* in recent versions, or
holding "Stall").  Printed per kernel: the samples by stall reason over the whole kernel, by
opcode, and the instructions with the most samples with their main reasons, so that a lease's
few seconds of profiling come back as a page of text (the device tool returns at most 8 files)
that says which instructions of a kernel written without a GPU its time goes to.  Column names
differ between Nsight Compute versions: they are matched by these patterns, and what is missing
is said, not guessed.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict

_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


def opcode(source: str) -> str:
    """The opcode of a SASS line without its predicate and modifiers ("@!P0 LDG.E.64 ..." -> LDG)."""
    text = _PREDICATE.sub("", source.strip())
    return text.split(None, 1)[0].split(".", 1)[0] if text else ""


def number(text: str) -> float:
    text = text.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return 0.0


def sample_column(header):
    """The column of all warp-state samples at an instruction (not a per-reason one)."""
    named = [h for h in header if "Samples" in h and "not" not in h.lower() and not h.startswith("stall")]
    preferred = [h for h in named if "All" in h] or named
    return preferred[0] if preferred else None


def stall_columns(header):
    return [h for h in header if h.startswith("stall_") or ("Stall" in h and "Samples" not in h)]


def kernels(rows):
    """(kernel name, header, instruction rows) per kernel of the CSV."""
    name, header, body = "", None, []
    for row in rows:
        if not row:
            continue
        if row[0] == "Kernel Name":
            if header is not None:
                yield name, header, body
            name, header, body = (row[1] if len(row) > 1 else ""), None, []
        elif row[0] == "Address":
            header = row
        elif header is not None and len(row) == len(header):
            body.append(dict(zip(header, row)))
    if header is not None:
        yield name, header, body


def summarize(name, header, body, top, out):
    samples_key = sample_column(header)
    stalls = stall_columns(header)
    executed_key = "Instructions Executed" if "Instructions Executed" in header else None
    print(f"kernel {name[:120]}: {len(body)} SASS instructions", file=out)
    if samples_key is None:
        print(f"  no column of warp-state samples (columns: {', '.join(header)[:400]})", file=out)
        return
    total = sum(number(r[samples_key]) for r in body) or 1.0
    executed = sum(number(r[executed_key]) for r in body) if executed_key else 0.0
    print(f"  {total:.0f} samples ({samples_key})" + (f", {executed:.4g} warp instructions executed" if executed_key
                                                     else ""), file=out)
    if stalls:
        shares = sorted(((sum(number(r[s]) for r in body) / total, s) for s in stalls), reverse=True)
        print("  by reason: " + ", ".join(f"{s} {100 * share:.1f}%" for share, s in shares if share >= 0.005),
              file=out)
    else:
        print("  no per-reason columns", file=out)
    by_opcode = defaultdict(float)
    for r in body:
        by_opcode[opcode(r.get("Source", ""))] += number(r[samples_key])
    ranked = sorted(by_opcode.items(), key=lambda kv: -kv[1])[:12]
    print("  by opcode: " + ", ".join(f"{op} {100 * v / total:.1f}%" for op, v in ranked if v > 0), file=out)
    print(f"  top {top} instructions (samples %, executed, address, main reasons, SASS):", file=out)
    for r in sorted(body, key=lambda r: -number(r[samples_key]))[:top]:
        here = number(r[samples_key])
        if here <= 0:
            break
        reasons = sorted(((number(r[s]), s) for s in stalls), reverse=True)[:3]
        why = " ".join(f"{s.replace('stall_', '')}:{100 * v / here:.0f}%" for v, s in reasons if v > 0)
        ran = f"{number(r[executed_key]):.0f}" if executed_key else "-"
        print(f"  {100 * here / total:5.1f}% {ran:>9} {r.get('Address', '').strip():>8}  {why:<44} "
              f"{r.get('Source', '').strip()[:70]}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.csv, newline="", errors="replace") as handle:
        found = False
        for name, header, body in kernels(csv.reader(handle)):
            found = True
            summarize(name, header, body, args.top, sys.stdout)
    if not found:
        print(f"{args.csv}: no source page (no row starting with Address)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
