"""The paper's Table 5: time of one training step with and without distillation.

    python bench/bench_train_step.py                  # the default for the device it finds
    python bench/bench_train_step.py --quick          # CI-sized
    python bench/bench_train_step.py --batches 32 512 --amp

One step of a MobileFaceNet student (ekd_kernels.models, random weights, 112x112 input, 512-d)
on a batch of `general` random images plus `general` balanced images (identities x 4): ArcFace
(s = 64, m = 0.5) on the general half, the distillation loss on both halves against a frozen IR
teacher (IR-50 by default) run under no_grad, backward, SGD step. Settings: baseline (ArcFace
only; the teacher is not run), + RKD (reference, and the O(B^2) one where built), + EKD on every
available backend. Reported: per-step time (median, p20, p80), the loss's share of the step (the
loss's own forward+backward on the step's embeddings and labels, under the same autocast, timed
separately, over the step time), peak memory.  The settings take turns, in rounds (the repeats
split between them; 3 on CUDA), so that none owes its figure to its place in the order; they
share one student, which every step trains further.
The paper (16 V100s, 32 + 32 per GPU): baseline 0.068 s, RKD 0.147 s, EKD 0.129 s.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from common import (REPO, PeakMemory, Progress, append_rows, describe, environment, host_issue_times, summary,
                    time_calls)

sys.path.insert(0, str(REPO))

from ekd_kernels import EKDLoss, RKDLoss  # noqa: E402
from ekd_kernels.arcface import ArcFace  # noqa: E402
from ekd_kernels.backends import BACKEND_NAMES, resolve_backend  # noqa: E402
from ekd_kernels.models import build_backbone, count_parameters  # noqa: E402

PAPER_SECONDS = {"baseline": 0.068, "rkd": 0.147, "ekd": 0.129}


def distillation_losses(device):
    """{setting: loss(student_emb, teacher_emb, labels)} available on this device, and skip reasons."""
    losses, skipped = {}, {}
    rkd = RKDLoss()
    losses["rkd/reference"] = lambda s, t, y: rkd(s, t)
    try:
        from ekd_kernels.rkd_fast import fast_rkd_loss
        # (the compiled kernel on CPU, PyTorch ops elsewhere: both what a user of it gets)
        losses["rkd/fast"] = lambda s, t, y: fast_rkd_loss(s, t)
    except Exception as exc:
        skipped["rkd/fast"] = f"unavailable ({type(exc).__name__}: {exc})"
    for name in BACKEND_NAMES:
        try:
            resolve_backend(name, device)
        except RuntimeError as exc:
            skipped[f"ekd/{name}"] = str(exc)
            continue
        losses[f"ekd/{name}"] = EKDLoss(backend=name).to(device)
    return losses, skipped


def make_batch(general, num_classes, device, seed):
    """general random images + the same number of balanced ones (identities x 4, the last one
    cut short when general is not a multiple of 4)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * general, 3, 112, 112, generator=g)
    identities = -(-general // 4)
    labels = torch.cat([torch.randint(0, num_classes, (general,), generator=g),
                        torch.randint(0, num_classes, (identities,), generator=g).repeat_interleave(4)[:general]])
    return images.to(device), labels.to(device)


def make_step(student, teacher, head, optimizer, loss_fn, images, labels, general, amp_dtype):
    autocast = (torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            embeddings = student(images)
            loss = head(embeddings[:general].float(), labels[:general])
            if loss_fn is not None:
                with torch.no_grad():
                    teacher_embeddings = teacher(images)
                loss = loss + loss_fn(embeddings, teacher_embeddings, labels)
        loss.backward()
        optimizer.step()

    return step


def loss_in_step(loss_fn, student, teacher, images, labels, amp_dtype):
    """The distillation loss's own forward+backward as the step runs it: on the step's embeddings
    (bf16 under AMP, from the student's last layers, in training mode) and labels, inside the same
    autocast.  (It was
    timed on fp32 random embeddings outside autocast, where RKD and the reference EKD multiply in
    fp32 rather than the step's bf16.)"""
    autocast = (torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    # In training mode, as the step (eval mode's BatchNorm, with statistics still near their
    # initial values, gave every image the same embedding: collapsed similarities), the BatchNorm
    # statistics restored after this extra forward.
    buffers = [b.clone() for b in student.buffers()]
    with torch.no_grad(), autocast:
        student_embeddings, teacher_embeddings = student(images), teacher(images)
    with torch.no_grad():
        for b, saved in zip(student.buffers(), buffers):
            b.copy_(saved)

    def call():
        x = student_embeddings.detach().requires_grad_(True)
        with autocast:
            loss = loss_fn(x, teacher_embeddings, labels)
        loss.backward()

    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CI-sized: 4 + 4 images, a small IR teacher")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="general-part sizes; each step uses twice as many images (general + balanced)")
    parser.add_argument("--teacher", default=None, help="ir50 (default), ir18, ...")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of: baseline rkd/reference rkd/fast "
                        "ekd/reference ekd/triton ekd/csrc")
    parser.add_argument("--amp", action="store_true", help="autocast bf16 (default on CUDA)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over the settings, the repeats split between them (default 3, at most the "
                             "repeats): a setting's figure does not depend on its place in the order")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--out", default=None, help="a .jsonl file or a folder (default bench/results/)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_float32_matmul_precision("highest")
    generals = args.batches or ([4] if args.quick else ([32, 512] if cuda else [16]))
    if min(generals) < 1:
        parser.error(f"--batches takes general-part sizes of at least 1, got {args.batches}")
    repeats = args.repeats or (2 if args.quick else (10 if cuda else 3))
    # (one round on CPU once made the first setting absorb the start-up: a baseline 20x slower than
    # a distillation step that does more work)
    rounds = max(1, min(repeats, args.rounds or 3))
    teacher_name = args.teacher or ("ir18" if args.quick else "ir50")
    amp_dtype = torch.bfloat16 if (args.amp or cuda) else None

    losses, skipped = distillation_losses(device)
    settings = {"baseline": None, **losses}
    if args.methods:  # (before the models are built)
        unknown = set(args.methods) - set(settings) - set(skipped)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; known: {sorted(set(settings) | set(skipped))}")
        settings = {k: v for k, v in settings.items() if k in args.methods}
        skipped = {k: v for k, v in skipped.items() if k in args.methods}
    torch.manual_seed(0)
    student = build_backbone("mobilefacenet").to(device)
    teacher = build_backbone(teacher_name).to(device).eval().requires_grad_(False)
    head = ArcFace(512, args.num_classes).to(device)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)

    env = environment(device)
    print(f"training step: MobileFaceNet ({count_parameters(student) / 1e6:.2f} M params) student, "
          f"{teacher_name} ({count_parameters(teacher) / 1e6:.1f} M) teacher, ArcFace over {args.num_classes} "
          f"classes, {'AMP bf16' if amp_dtype else 'fp32'}, {env['device']}", flush=True)
    rows = []
    progress = Progress(len(generals) * len(settings), "bench train step")
    for general in generals:
        images, labels = make_batch(general, args.num_classes, device, seed=general)
        prepared = {}  # setting -> (step, the loss's own call or None, peak bytes)
        for name, loss_fn in settings.items():
            progress.step(f"{name} B={general}+{general}")
            step = make_step(student, teacher, head, optimizer, loss_fn, images, labels, general, amp_dtype)
            try:
                with PeakMemory(device) as peak:
                    step()
                loss_call = (loss_in_step(loss_fn, student, teacher, images, labels, amp_dtype)
                             if loss_fn is not None else None)
            except (RuntimeError, MemoryError) as exc:
                skipped[f"{name} B={general}"] = describe(exc)
                continue
            prepared[name] = (step, loss_call, peak.bytes)
        # The settings in turn, `rounds` times (repeats split between the rounds): no setting owes
        # its figure to its place in the order (each block of steps trains the one student further).
        times = {name: {"step": [], "issue": [], "loss": []} for name in prepared}
        per_round = max(1, -(-repeats // rounds))
        for _ in range(rounds):
            for name, (step, loss_call, _) in list(prepared.items()):
                try:
                    times[name]["step"] += time_calls(step, device, per_round)
                    times[name]["issue"] += host_issue_times(step, device, per_round)
                    if loss_call is not None:
                        times[name]["loss"] += time_calls(loss_call, device, per_round)
                except (RuntimeError, MemoryError) as exc:
                    skipped[f"{name} B={general}"] = describe(exc)
                    del prepared[name]
        measured = []
        for name, (_, loss_call, peak_bytes) in prepared.items():
            step_times, issue_times = summary(times[name]["step"]), summary(times[name]["issue"])
            loss_times = summary(times[name]["loss"]) if loss_call is not None else None
            measured.append({**env, "benchmark": "train_step", "setting": name, "batch": 2 * general,
                             "general": general, "teacher": teacher_name,
                             "dtype": "bf16-amp" if amp_dtype else "float32",
                             "step": step_times, "loss": loss_times, "rounds": rounds,
                             "loss_share": (loss_times["median_s"] / step_times["median_s"]) if loss_times else None,
                             "step_host_issue": issue_times, "peak_memory_bytes": peak_bytes})
        # Appended as each batch size is measured: a run cut short by a time limit (a GPU lease's
        # step: one lost every row when they were written at the end) keeps the sizes it finished
        append_rows(measured, "train_step", device, args.out)
        for row in measured:
            print(f"  measured {row['setting']} {general}+{general}: {row['step']['median_s'] * 1e3:.2f} ms a step"
                  + (f", the loss {row['loss']['median_s'] * 1e3:.3f} ms" if row["loss"] else ""), flush=True)
        rows += measured

    print_report(rows, skipped, env)
    notes = [{**env, "benchmark": "train_step", "note": "skipped", "setting": k, "why": v} for k, v in skipped.items()]
    path = append_rows(notes, "train_step", device, args.out)
    print(f"\nappended {len(rows)} rows to {path}")
    return rows


def print_report(rows, skipped, env):
    print(f"\nper training step ({env['device']}; paper, 16 V100s at 32+32: baseline 0.068 s, RKD 0.147 s, "
          "EKD 0.129 s)")
    print("| images | setting | step (ms) | p20-p80 (ms) | host issue (ms) | loss share | vs baseline | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["batch"]: r["step"]["median_s"] for r in rows if r["setting"] == "baseline"}
    for r in rows:
        st = r["step"]
        share = f"{100 * r['loss_share']:.1f}%" if r["loss_share"] is not None else "-"
        rel = f"{st['median_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        issue = f"{r['step_host_issue']['median_s'] * 1e3:.1f}" if r.get("step_host_issue") else "-"
        print(f"| {r['general']}+{r['general']} | {r['setting']} | {st['median_s'] * 1e3:.1f} | "
              f"{st['p20_s'] * 1e3:.1f}-{st['p80_s'] * 1e3:.1f} | {issue} | {share} | {rel} | "
              f"{(r['peak_memory_bytes'] or 0) / 2**20:.0f} |")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")


if __name__ == "__main__":
    main()
