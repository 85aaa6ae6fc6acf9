"""Draw the benchmark rows of bench/results/*.jsonl as PNGs (needs matplotlib).

    python bench/plot.py [--results bench/results] [--out bench/results]

- loss_<device>_<dtype>.png: forward+backward time per batch vs B (log-log), one line per method
  and run: a line joins only the rows of one run (one script call: the rows share its date and
  commit), so that no curve mixes code or conditions; a method whose rows come from several runs
  gets a line per run, its label naming the run.
- train_step_<device>.png: the paper's Table 5 as bars: per-step time of each training setting,
  each bar labelled with its run when the bars come from several runs.
Only the newest row of each (device, method, B, dtype) is drawn.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

#: One colour per method (a run of the GPU benchmark has 13; matplotlib's default cycle has 10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"]


def slug(text: str) -> str:
    """A file-name part: lower case, without trademark marks, "Processor" and the clock ("Intel(R)
    Xeon(R) Processor @ 2.50GHz (2 cores)" -> "intel-xeon-2-cores")."""
    text = re.sub(r"\((r|tm)\)|\bprocessor\b|@\s*[0-9.]+\s*ghz", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def load_rows(folder: pathlib.Path):
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "note" not in row:
                    rows.append(row)
    return rows


def newest(rows, key):
    out = {}
    for row in sorted(rows, key=lambda r: r.get("date", "")):
        out[key(row)] = row
    return list(out.values())


def run_of(row):
    """The run a row belongs to: the rows of one script call share its start date and commit."""
    return row.get("date", ""), row.get("commit", "")


def run_label(run):
    date, commit = run
    return f"{date[:16].replace('T', ' ')} {commit}".strip()


def plot_loss(rows, out: pathlib.Path, plt):
    written = []
    # D = 512 only (the benchmark's default): a run at another width would join the same curves
    rows = newest([r for r in rows if r.get("benchmark") == "loss" and r.get("dim", 512) == 512],
                  lambda r: (r["device"], r["name"], r["batch"], r["dtype"]))
    for device, dtype in sorted({(r["device"], r["dtype"]) for r in rows}):
        sub = [r for r in rows if r["device"] == device and r["dtype"] == dtype]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for index, name in enumerate(sorted({r["name"] for r in sub})):
            mine = [r for r in sub if r["name"] == name]
            runs = sorted({run_of(r) for r in mine}, reverse=True)  # newest first: the solid line
            for order, run in enumerate(runs):
                points = sorted((r["batch"], r["forward_backward"]["median_s"]) for r in mine if run_of(r) == run)
                ax.plot([p[0] for p in points], [p[1] * 1e3 for p in points], marker="os^vD"[order % 5],
                        linestyle="-" if order == 0 else ":", color=PALETTE[index % len(PALETTE)],
                        label=name if len(runs) == 1 else f"{name} ({run_label(run)})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("forward+backward per batch (ms)")
        ax.set_title(f"EKD vs RKD vs floor, D=512, {dtype}\n{device}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
        path = out / f"loss_{slug(sub[0].get('device_type', 'x') + '-' + device)[:40]}_{dtype}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_train_step(rows, out: pathlib.Path, plt):
    written = []
    rows = newest([r for r in rows if r.get("benchmark") == "train_step"],
                  lambda r: (r["device"], r["setting"], r["batch"], r["dtype"]))
    for device in sorted({r["device"] for r in rows}):
        sub = [r for r in rows if r["device"] == device]
        several = len({run_of(r) for r in sub}) > 1
        labels = [f"{r['setting']}\nB={r['batch']} {r['dtype']}" + (f"\n{run_label(run_of(r))}" if several else "")
                  for r in sub]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sub)), 4.5))
        ax.bar(range(len(sub)), [r["step"]["median_s"] * 1e3 for r in sub],
               color=["#888" if r["setting"] == "baseline" else "#4a7" for r in sub])
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("training step (ms)")
        ax.set_title(f"Table 5: per-step time, MobileFaceNet student, IR teacher\n{device}", fontsize=9)
        fig.tight_layout()
        path = out / f"train_step_{slug(device)[:40]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.results)
    if not folder.is_dir():  # (it drew nothing and exited 0)
        parser.error(f"--results {folder} is not a folder of benchmark rows")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed; no PNG drawn (the JSON rows are complete without it)")
        return []
    out = pathlib.Path(args.out) if args.out else folder
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(folder)
    written = plot_loss(rows, out, plt) + plot_train_step(rows, out, plt)
    if not written:
        print(f"plot: no benchmark rows in {folder}: nothing drawn")
    for path in written:
        print(f"plot: wrote {path}")
    return written


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
