"""End-to-end EKD distillation: a teacher, then a MobileFaceNet student three ways.

    python examples/distill.py --quick                 # CPU, a few minutes, synthetic faces
    python examples/distill.py                         # the same at 112 x 112 and full length (GPU)
    python examples/distill.py --data FACES/ --pairs pairs.txt --teacher-checkpoint ir50.pt

Steps:
1. Data: by default ``SyntheticFaces`` (deterministic, no download): training identities and a
   disjoint set of test identities.  With ``--data ROOT`` a folder per identity of aligned
   crops (``ekd_kernels.data.FaceFolder``); evaluation then uses ``--pairs FILE`` (a pairs list,
   ``<image a> <image b> <0|1>`` per line, paths relative to ``--eval-data`` or ``--data``), or
   all pairs of ``--eval-data ROOT``, or all pairs of a held-out tenth of the identities.
2. Teacher: an IR ResNet (``--teacher ir18 --teacher-width 32`` in ``--quick``), trained here
   with ArcFace on the same training data for ``--teacher-epochs``, or loaded from
   ``--teacher-checkpoint`` (a state_dict of that architecture).  It is then frozen; since the
   data carry no random augmentation its embeddings of the training images are computed once.
3. Students (MobileFaceNet, same initialisation in every run): ArcFace alone, ArcFace + RKD
   (``ekd_kernels.RKDLoss``), ArcFace + EKD (``ekd_kernels.EKDLoss``), on the same batches
   (``BalancedBatchSampler``: a general random part plus p identities x q = 4 images).
4. Every epoch: the losses, the critical-relation ratio (EKD's Eq. 5 pairs among all pairs of
   the batch, the paper's Fig. 4; the ArcFace and RKD runs measure it with a monitoring
   ``EKDLoss`` that does not train) and the TPR at FPR 1e-2 / 1e-3 / 1e-4 of all test pairs
   (``ekd_kernels.metrics``), against the teacher's.  A run that diverges (non-finite test
   embeddings) gets NaN TPRs, marked on its printed lines, and the other runs go on.

Outputs in ``--out``: history.csv (one row per run and epoch), summary.json (settings, teacher
and final student TPRs, run times), teacher.pt (the trained teacher, reusable with
``--teacher-checkpoint``), critical_ratio.svg, and critical_ratio.png when matplotlib is
installed.  history.csv is rewritten after every epoch and summary.json after every run (with the
runs finished so far), so a later failure or interruption does not lose them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ekd_kernels import EKDLoss, RKDLoss, ekd_loss  # noqa: E402
from ekd_kernels.arcface import ArcFace  # noqa: E402
from ekd_kernels.data import FaceFolder, SyntheticFaces, read_pairs  # noqa: E402
from ekd_kernels.metrics import pair_scores, tpr_at_fpr, verify_all_pairs  # noqa: E402
from ekd_kernels.models import build_backbone, count_parameters  # noqa: E402
from ekd_kernels.sampler import BalancedBatchSampler  # noqa: E402

EVAL_FPRS = (1e-2, 1e-3, 1e-4)
RUNS = ("arcface", "rkd", "ekd")

# Settings of the two presets; every one can be overridden on the command line.  A batch is half
# general, half balanced (p identities x 4), as the authors' (TFace's EKD task: 32 + 8 x 4).
PRESETS = {
    "quick": dict(image_size=32, train_identities=100, train_images=10, test_identities=60, test_images=10,
                  teacher="ir18", teacher_width=32, teacher_epochs=8, epochs=5, general_size=32,
                  identities_per_batch=8, lr=0.1, teacher_lr=0.1),
    "full": dict(image_size=112, train_identities=1000, train_images=20, test_identities=300, test_images=10,
                 teacher="ir50", teacher_width=64, teacher_epochs=20, epochs=20, general_size=64,
                 identities_per_batch=16, lr=0.1, teacher_lr=0.1),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized preset (32 x 32 synthetic faces, few epochs)")
    p.add_argument("--out", default="runs/distill", help="output folder (default: runs/distill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which student runs")
    # data
    p.add_argument("--data", default=None, help="folder per identity of aligned crops (default: synthetic)")
    p.add_argument("--eval-data", default=None, help="folder of test identities (all-pairs or --pairs)")
    p.add_argument("--pairs", default=None, help="pairs list for verification (see the module docstring)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--train-identities", type=int)
    p.add_argument("--train-images", type=int, help="images per training identity (synthetic)")
    p.add_argument("--test-identities", type=int)
    p.add_argument("--test-images", type=int, help="images per test identity (synthetic)")
    p.add_argument("--expression", type=float, default=0.4,
                   help="within-identity variation of the synthetic faces (higher = harder)")
    # models and training
    p.add_argument("--student", default="mobilefacenet", choices=("mobilefacenet", "ir18", "ir34", "ir50", "ir100"),
                   help="student backbone")
    p.add_argument("--teacher", choices=("ir18", "ir34", "ir50", "ir100"), help="teacher backbone")
    p.add_argument("--teacher-width", type=int, help="channels of the teacher's first stage (64 = published)")
    p.add_argument("--teacher-checkpoint", default=None, help="state_dict of the teacher (skips its training)")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--epochs", type=int, help="student epochs")
    p.add_argument("--general-size", type=int, help="random samples per batch, which ArcFace trains the student on "
                   "(0: ArcFace on the whole batch)")
    p.add_argument("--identities-per-batch", type=int, help="p of the balanced part")
    p.add_argument("--images-per-identity", type=int, default=4, help="q of the balanced part (4 in the paper)")
    p.add_argument("--lr", type=float)
    p.add_argument("--teacher-lr", type=float)
    p.add_argument("--scale", type=float, default=64.0, help="ArcFace s")
    p.add_argument("--margin", type=float, default=0.5, help="ArcFace m")
    p.add_argument("--rkd-weight", type=float, default=1.0, help="multiplies RKDLoss() (its own weights 25, 50)")
    p.add_argument("--ekd-weight", type=float, default=1.0, help="multiplies EKDLoss() (its own weights)")
    p.add_argument("--ekd-momentum", type=float, default=0.01,
                   help="EMA momentum of the EKD thresholds (0.01 = the authors', tuned for long runs)")
    p.add_argument("--ekd-warm-start", action="store_true",
                   help="start the EKD thresholds at the first batch's instead of 0 (the authors start at 0)")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(p, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what would fail later (some of it after the teacher's training) or be ignored."""
    if args.data is None and (args.pairs is not None or args.eval_data is not None):
        parser.error("--pairs and --eval-data evaluate real data: they need --data (without it the run is synthetic)")
    for name in ("threads",):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    for name in ("epochs", "teacher_epochs", "image_size", "train_identities", "train_images", "test_identities",
                 "test_images", "teacher_width", "identities_per_batch", "images_per_identity"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.general_size is not None and args.general_size < 0:
        parser.error(f"--general-size must be at least 0, got {args.general_size}")
    if args.images_per_identity < 2:  # (the balanced part's q images of an identity make its positive pairs)
        parser.error(f"--images-per-identity must be at least 2, got {args.images_per_identity}")
    if args.image_size % 16 != 0:  # (the backbones' four stride-2 stages)
        parser.error(f"--image-size must be a multiple of 16, got {args.image_size}")
    for name in ("lr", "teacher_lr", "scale"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("rkd_weight", "ekd_weight"):  # (negative: the distillation loss would be maximised)
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    try:  # the loss and the head refuse these themselves, but only once they are built (after the teacher)
        EKDLoss(momentum=args.ekd_momentum)
        ArcFace(2, 2, scale=args.scale, margin=args.margin)
    except ValueError as error:
        parser.error(f"--ekd-momentum, --scale or --margin: {error}")
    for path in (args.data, args.eval_data, args.pairs, args.teacher_checkpoint):
        if path is not None and not pathlib.Path(path).exists():
            parser.error(f"{path} does not exist")


# --------------------------------------------------------------------------- data
class Split:
    """A dataset with `.batch(indices)` and `.labels`, plus how to evaluate it."""

    def __init__(self, dataset, pairs=None):
        self.dataset = dataset
        self.pairs = pairs  # (index_a, index_b, is_same) or None for all pairs


def load_data(args):
    if args.data is None:
        train = SyntheticFaces(args.train_identities, args.train_images, args.image_size, seed=args.seed,
                               expression=args.expression)
        test = SyntheticFaces(args.test_identities, args.test_images, args.image_size, seed=args.seed,
                              first_identity=args.train_identities, expression=args.expression)
        return train, Split(test)
    train = FaceFolder(args.data, image_size=args.image_size)
    if args.pairs is not None:
        test = FaceFolder(args.eval_data or args.data, image_size=args.image_size)
        return train, Split(test, read_pairs(args.pairs, test))
    if args.eval_data is not None:
        return train, Split(FaceFolder(args.eval_data, image_size=args.image_size))
    # Hold out every tenth identity for all-pairs verification.
    if len(train.classes) < 20:
        raise ValueError(f"{args.data} holds {len(train.classes)} identities: holding out every tenth for the "
                         "evaluation needs at least 20 (two test identities, so that there are negative pairs); "
                         "give --eval-data or --pairs instead")
    held_out = (train.labels % 10) == 9
    train_index = torch.nonzero(~held_out).squeeze(1)
    test_index = torch.nonzero(held_out).squeeze(1)
    return _Subset(train, train_index), Split(_Subset(train, test_index))


class _Subset:
    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices
        self.labels = dataset.labels[indices]

    def __len__(self):
        return len(self.indices)

    def batch(self, indices):
        return self.dataset.batch(self.indices[torch.as_tensor(indices)].tolist())


def num_classes(dataset) -> int:
    return int(dataset.labels.max()) + 1


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(model, dataset, device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        images, _ = dataset.batch(list(range(start, min(start + batch_size, len(dataset)))))
        out.append(model(images.to(device)).float())
    return torch.cat(out)


def evaluate(model, split: Split, device) -> Dict[str, float]:
    """TPR at each of EVAL_FPRS; NaN for all of them when the model's test embeddings are not
    finite (a diverged run: the metrics refuse such scores, and one run must not end the others)."""
    embeddings = embed(model, split.dataset, device)
    if not bool(torch.isfinite(embeddings).all()):
        return {f"tpr@{f:g}": math.nan for f in EVAL_FPRS}
    if split.pairs is None:
        result = verify_all_pairs(embeddings, split.dataset.labels.to(device), EVAL_FPRS)
    else:
        a, b, same = split.pairs
        scores = pair_scores(embeddings[a.to(device)], embeddings[b.to(device)])
        result = tpr_at_fpr(scores[same.to(device)], scores[~same.to(device)], EVAL_FPRS)
    return {f"tpr@{f:g}": t for f, t in zip(result.fprs, result.tprs)}


def diverged_note(tprs: Dict[str, float]) -> str:
    """What to append to a printed line whose TPRs are NaN (see evaluate); empty otherwise."""
    if any(math.isnan(v) for v in tprs.values()):
        return "  [diverged: non-finite test embeddings, TPRs recorded as NaN]"
    return ""


# --------------------------------------------------------------------------- training
def make_optimizer(params, lr: float, steps: int):
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = max(1, steps)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, schedule


def make_sampler(args, dataset, seed: int) -> BalancedBatchSampler:
    return BalancedBatchSampler(dataset.labels, general_size=args.general_size,
                                num_identities=args.identities_per_batch,
                                images_per_identity=args.images_per_identity, seed=seed)


def train_teacher(args, train, device) -> torch.nn.Module:
    torch.manual_seed(args.seed + 1)
    teacher = build_backbone(args.teacher, width=args.teacher_width, input_size=args.image_size).to(device)
    if args.teacher_checkpoint:
        teacher.load_state_dict(torch.load(args.teacher_checkpoint, map_location=device))
        print(f"teacher: {args.teacher} loaded from {args.teacher_checkpoint}", flush=True)
        return teacher.eval()
    head = ArcFace(512, num_classes(train), args.scale, args.margin).to(device)
    sampler = make_sampler(args, train, args.seed + 1)
    optimizer, schedule = make_optimizer(list(teacher.parameters()) + list(head.parameters()), args.teacher_lr,
                                         args.teacher_epochs * len(sampler))
    print(f"teacher: {args.teacher} width {args.teacher_width}, {count_parameters(teacher) / 1e6:.2f} M "
          f"parameters, {args.teacher_epochs} epochs of {len(sampler)} batches", flush=True)
    for epoch in range(args.teacher_epochs):
        teacher.train()
        sampler.set_epoch(epoch)
        start, total = time.time(), 0.0
        for indices in sampler:
            images, labels = train.batch(indices)
            loss = head(teacher(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        print(f"  teacher epoch {epoch + 1}: arcface {total / len(sampler):.3f} ({time.time() - start:.1f} s)",
              flush=True)
    torch.save(teacher.state_dict(), pathlib.Path(args.out) / "teacher.pt")
    return teacher.eval()


def train_student(run: str, args, train, test: Split, teacher_embeddings: torch.Tensor, device,
                  on_epoch: Callable[[List[dict]], None] = lambda history: None) -> List[dict]:
    """The run's history, one row per epoch; `on_epoch(history)` after each epoch (main saves it)."""
    torch.manual_seed(args.seed + 2)  # same initial student and head in every run
    student = build_backbone(args.student, input_size=args.image_size).to(device)
    head = ArcFace(512, num_classes(train), args.scale, args.margin).to(device)
    sampler = make_sampler(args, train, args.seed + 2)  # same batches in every run
    optimizer, schedule = make_optimizer(list(student.parameters()) + list(head.parameters()), args.lr,
                                         args.epochs * len(sampler))
    rkd = RKDLoss().to(device)
    ekd = EKDLoss(momentum=args.ekd_momentum, compute_critical_ratio=True).to(device)
    # The ArcFace and RKD runs measure the critical ratio with a monitor that does not train.
    monitor = ekd if run == "ekd" else EKDLoss(momentum=args.ekd_momentum, compute_critical_ratio=True).to(device)
    if args.ekd_warm_start:
        warm_start(args, train, sampler, student, teacher_embeddings, [ekd, monitor], device)
    classified = slice(0, args.general_size) if args.general_size > 0 else slice(None)  # (none: the whole batch)
    history = []
    for epoch in range(args.epochs):
        student.train()
        sampler.set_epoch(epoch)
        start = time.time()
        sums = {"arcface": 0.0, "distill": 0.0, "critical_ratio": 0.0}
        for indices in sampler:
            images, labels = train.batch(indices)
            images, labels = images.to(device), labels.to(device)
            teacher_emb = teacher_embeddings[torch.as_tensor(indices, device=device)]
            student_emb = student(images)
            # ArcFace on the general part, distillation on the whole batch, as the authors train
            # (TFace's EKD task; the benchmark's Table 5 step too): the balanced part's identities
            # are drawn for their positive pairs, not as a sample of the classes
            loss_cls = head(student_emb[classified], labels[classified])
            if run == "rkd":
                distill = args.rkd_weight * rkd(student_emb, teacher_emb)
            elif run == "ekd":
                distill = args.ekd_weight * ekd(student_emb, teacher_emb, labels)
            else:
                distill = torch.zeros((), device=device)
            if run != "ekd":
                with torch.no_grad():
                    monitor(student_emb.detach(), teacher_emb, labels)
            loss = loss_cls + distill
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            sums["arcface"] += float(loss_cls.detach())
            sums["distill"] += float(distill.detach())
            sums["critical_ratio"] += float(monitor.last_stats.critical_ratio)
        row = {"run": run, "epoch": epoch + 1, **{k: v / len(sampler) for k, v in sums.items()}}
        tprs = evaluate(student, test, device)
        row.update(tprs)
        row["seconds"] = time.time() - start
        history.append(row)
        print(f"  {run:7s} epoch {epoch + 1}: arcface {row['arcface']:.3f}  distill {row['distill']:.4f}  "
              f"critical {row['critical_ratio']:.4f}  " +
              "  ".join(f"{k} {row[k]:.4f}" for k in row if k.startswith("tpr@")) +
              f"  ({row['seconds']:.1f} s)" + diverged_note(tprs), flush=True)
        on_epoch(history)
    return history


@torch.no_grad()
def warm_start(args, train, sampler, student, teacher_embeddings, losses, device) -> None:
    """Set the EMA thresholds to the batch thresholds of the first batch (momentum 1 once)."""
    indices = next(iter(sampler))
    images, labels = train.batch(indices)
    student.train()
    result = ekd_loss(student(images.to(device)), teacher_embeddings[torch.as_tensor(indices, device=device)],
                      labels.to(device), momentum=1.0)
    for loss in losses:
        loss.student_thresholds.copy_(result.student_thresholds)
        loss.teacher_thresholds.copy_(result.teacher_thresholds)


# --------------------------------------------------------------------------- outputs
def write_history(path: pathlib.Path, rows: List[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_critical_ratio(out: pathlib.Path, rows: List[dict]) -> List[str]:
    """critical_ratio.svg always (no dependency); critical_ratio.png when matplotlib is installed."""
    runs = {}
    for r in rows:
        runs.setdefault(r["run"], []).append((r["epoch"], r["critical_ratio"]))
    written = [_svg_plot(out / "critical_ratio.svg", runs)]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote critical_ratio.svg and the CSV, no PNG", flush=True)
        return written
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run, points in runs.items():
        ax.plot(*zip(*points), marker="o", label=run)
    ax.set_xlabel("epoch")
    ax.set_ylabel("critical relations / all pairs")
    ax.set_title("Critical-relation ratio (EKD Fig. 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "critical_ratio.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "critical_ratio.png"))
    return written


def _svg_plot(path: pathlib.Path, runs: Dict[str, list]) -> str:
    width, height, pad = 480, 320, 50
    points = [p for series in runs.values() for p in series]
    x_max = max(x for x, _ in points)
    # A diverged run's ratio can be NaN: it is left out, not allowed to scale (or void) the others.
    y_max = max((y for _, y in points if math.isfinite(y)), default=0.0) * 1.1 or 1.0

    def xy(x, y):
        return (pad + (x - 1) / max(x_max - 1, 1) * (width - 2 * pad), height - pad - y / y_max * (height - 2 * pad))

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">epoch</text>',
             f'<text x="{width / 2}" y="20" text-anchor="middle">critical relations / all pairs '
             f'(EKD Fig. 4)</text>',
             f'<text x="{pad - 5}" y="{pad + 4}" text-anchor="end">{y_max:.3g}</text>',
             f'<text x="{pad - 5}" y="{height - pad + 4}" text-anchor="end">0</text>']
    for i, (run, series) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        path_points = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(x, y) for x, y in series if math.isfinite(y)))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path_points}"/>')
        parts.append(f'<text x="{width - pad + 5}" y="{pad + 15 * i}" fill="{colour}">{run}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return str(path)


def write_summary(out: pathlib.Path, args, device, teacher_tpr: Dict[str, float], rows: List[dict],
                  seconds: Dict[str, float], began: float, plots: List[str]) -> dict:
    """summary.json for the runs in `rows` (all of them at the end; those finished so far before)."""
    runs = list(dict.fromkeys(r["run"] for r in rows))  # in the order of args.runs
    final = {run: {k: v for k, v in [r for r in rows if r["run"] == run][-1].items() if k.startswith("tpr@")}
             for run in runs}
    summary = {
        "settings": {k: v for k, v in vars(args).items()},
        "device": str(device),
        "teacher_tpr": teacher_tpr,
        "final_student_tpr": final,
        "seconds": {**seconds, "total": time.time() - began},
        "outputs": (["history.csv", "summary.json"] + ([] if args.teacher_checkpoint else ["teacher.pt"])
                    + [pathlib.Path(p).name for p in plots]),
    }
    (out / "summary.json").write_text(json.dumps(_standard_json(summary), indent=2, allow_nan=False))
    return summary


def _standard_json(value):
    """`value` with NaN floats (a diverged run's TPRs) as None: null in the file, which every JSON
    reader takes (Python's json would write NaN, which is not JSON)."""
    if isinstance(value, dict):
        return {k: _standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_standard_json(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Denormal floats make CPU convolutions many times slower in the first steps of training.
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()

    train, test = load_data(args)
    try:  # (the data's identities against the balanced part's, before a teacher trains)
        make_sampler(args, train, args.seed)
    except ValueError as error:  # (as the parser's errors: the message, exit status 2)
        print(f"distill.py: error: the batches (--general-size, --identities-per-batch, --images-per-identity) "
              f"do not fit the data: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(f"data: {len(train)} training images of {num_classes(train)} identities, "
          f"{len(test.dataset)} test images ({'pairs list' if test.pairs else 'all pairs'}), "
          f"{args.image_size} x {args.image_size}", flush=True)
    teacher = train_teacher(args, train, device)
    teacher_tpr = evaluate(teacher, test, device)
    print("teacher: " + "  ".join(f"{k} {v:.4f}" for k, v in teacher_tpr.items()) + diverged_note(teacher_tpr),
          flush=True)
    teacher_embeddings = embed(teacher, train, device)
    teacher_seconds = time.time() - began

    # history.csv after every epoch and summary.json after every run, so that the runs already
    # finished survive a later one that fails (or is stopped); the plots come at the end.
    rows, runtimes = [], {}
    for run in args.runs:
        start = time.time()
        print(f"student run '{run}': {args.student}", flush=True)
        rows += train_student(run, args, train, test, teacher_embeddings, device,
                              on_epoch=lambda history: write_history(out / "history.csv", rows + history))
        runtimes[run] = time.time() - start
        write_summary(out, args, device, teacher_tpr, rows, {"teacher": teacher_seconds, **runtimes}, began, [])

    write_history(out / "history.csv", rows)
    plots = plot_critical_ratio(out, rows)
    summary = write_summary(out, args, device, teacher_tpr, rows, {"teacher": teacher_seconds, **runtimes}, began,
                            plots)
    final = summary["final_student_tpr"]
    print(f"\nfinal TPRs (test identities, {'pairs list' if test.pairs else 'all pairs'}):")
    print(f"  {'teacher':8s} " + "  ".join(f"{k} {v:.4f}" for k, v in teacher_tpr.items()))
    for run, tprs in final.items():
        print(f"  {run:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in tprs.items()) + diverged_note(tprs))
    print(f"outputs in {out}/ ({summary['seconds']['total']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
