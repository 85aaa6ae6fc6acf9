"""The training kit end to end: the synthetic and folder datasets, and examples/distill.py.

The example runs its --quick preset cut to one epoch on a few identities (the full --quick run
takes minutes; CI only checks that every stage runs and writes its outputs, no accuracy).
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from ekd_kernels.data import FaceFolder, SyntheticFaces, read_pairs

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "distill.py"
TINY = ["--quick", "--threads", "1", "--epochs", "1", "--teacher-epochs", "1", "--teacher-width", "8",
        "--general-size", "4", "--identities-per-batch", "4", "--device", "cpu"]


def test_synthetic_faces_draw_independent_streams():
    """Every (seed, kind, index) key of SyntheticFaces seeds its own random stream: no family
    pattern, identity pattern or image stream starts like another's, for the seeds and the
    index ranges of the example's presets (1300 identities, 325 families).  The additive mix
    used before made (seed, 2, identity) coincide with (seed, 1, family) for a quarter of the
    quick preset's identities, across the train/test split too."""
    from ekd_kernels.data import _generator

    for seed in (0, 1, 7):
        first_draws = {}
        for kind, count in ((1, 325), (2, 1300), (3, 1300)):
            for index in range(count):
                draw = float(torch.randn((), generator=_generator(seed, kind, index)))
                assert draw not in first_draws, f"seed {seed}: {(kind, index)} starts as {first_draws[draw]}"
                first_draws[draw] = (kind, index)


def test_synthetic_faces_deterministic_and_disjoint():
    a = SyntheticFaces(3, 4, image_size=16, seed=1)
    b = SyntheticFaces(3, 4, image_size=16, seed=1)
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8
    assert a.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # identity k of a set starting at 1 is identity k + 1 of a set starting at 0
    c = SyntheticFaces(2, 4, image_size=16, seed=1, first_identity=1)
    assert torch.equal(c.images, a.images[4:])
    assert not torch.equal(SyntheticFaces(3, 4, image_size=16, seed=2).images, a.images)
    image, label = a[5]
    assert image.shape == (3, 16, 16) and label == 1 and -1 <= float(image.min()) <= float(image.max()) <= 1
    images, labels = a.batch([0, 11])
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 2]


def write_folder(root: pathlib.Path, identities=4, images=3, size=32):
    rng = np.random.default_rng(0)
    for i in range(identities):
        (root / f"person{i}").mkdir(parents=True)
        for j in range(images):
            np.save(root / f"person{i}" / f"{j}.npy", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_face_folder_and_pairs(tmp_path):
    write_folder(tmp_path / "faces")
    dataset = FaceFolder(tmp_path / "faces")
    assert len(dataset) == 12 and dataset.classes == [f"person{i}" for i in range(4)]
    image, label = dataset[4]
    assert image.shape == (3, 32, 32) and label == 1
    assert FaceFolder(tmp_path / "faces", image_size=16)[0][0].shape == (3, 16, 16)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# a comment\nperson0/0.npy person0/1.npy 1\n\nperson0/0.npy person2/1.npy 0\n")
    a, b, same = read_pairs(pairs, dataset)
    assert a.tolist() == [0, 0] and b.tolist() == [1, 7] and same.tolist() == [True, False]
    pairs.write_text("person0/0.npy person9/1.npy 1\n")
    with pytest.raises(ValueError, match="person9"):
        read_pairs(pairs, dataset)
    with pytest.raises(FileNotFoundError):
        FaceFolder(tmp_path / "missing")


def run_example(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_example_quick_writes_outputs(tmp_path):
    out = tmp_path / "out"
    stdout = run_example([*TINY, "--train-identities", "12", "--train-images", "6", "--test-identities", "8",
                          "--test-images", "4", "--out", str(out)], tmp_path)
    assert "final TPRs" in stdout
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["run"] for r in rows] == ["arcface", "rkd", "ekd"]
    for r in rows:
        assert 0.0 <= float(r["critical_ratio"]) <= 1.0
        assert all(0.0 <= float(r[f"tpr@{f}"]) <= 1.0 for f in ("0.01", "0.001", "0.0001"))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final_student_tpr"]) == {"arcface", "rkd", "ekd"}
    assert set(summary["teacher_tpr"]) == {"tpr@0.01", "tpr@0.001", "tpr@0.0001"}
    assert (out / "critical_ratio.svg").read_text().startswith("<svg")
    for name in summary["outputs"]:
        assert (out / name).is_file()


def test_example_on_a_folder_with_pairs_list(tmp_path):
    write_folder(tmp_path / "faces", identities=8, images=5)
    pairs = tmp_path / "pairs.txt"
    lines = [f"person{i}/0.npy person{i}/1.npy 1" for i in range(8)]
    lines += [f"person{i}/2.npy person{(i + 1) % 8}/3.npy 0" for i in range(8)]
    pairs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_example([*TINY, "--data", str(tmp_path / "faces"), "--pairs", str(pairs), "--runs", "ekd",
                 "--ekd-warm-start", "--out", str(out)], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final_student_tpr"]) == {"ekd"}


def test_pairs_flag_must_match_the_folders(tmp_path):
    """A pair marked 1 across two identities (or 0 within one) contradicts the dataset: the TPR
    would count it on the wrong side, so read_pairs refuses it, naming the line."""
    write_folder(tmp_path / "faces")
    dataset = FaceFolder(tmp_path / "faces")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("person0/0.npy person0/1.npy 1\nperson0/0.npy person1/0.npy 1\n")
    with pytest.raises(ValueError, match=r"pairs.txt:2: the pair is marked 1 \(same\) but its images are of two "
                                         r"identities \('person0', 'person1'\)"):
        read_pairs(pairs, dataset)
    pairs.write_text("person2/0.npy person2/2.npy 0\n")
    with pytest.raises(ValueError, match="marked 0 .different. but its images are of one identity"):
        read_pairs(pairs, dataset)
    # a list of one kind only: no TPR at an FPR, refused when read (before a teacher's training)
    pairs.write_text("person0/0.npy person0/1.npy 1\nperson1/0.npy person1/1.npy 1\n")
    with pytest.raises(ValueError, match=r"every pair is marked same \(1\): TPR at an FPR needs different \(0\)"):
        read_pairs(pairs, dataset)
    pairs.write_text("person0/0.npy person1/1.npy 0\n")
    with pytest.raises(ValueError, match=r"every pair is marked different \(0\): TPR at an FPR needs same \(1\)"):
        read_pairs(pairs, dataset)


@pytest.mark.parametrize("make, match", [
    (lambda root: FaceFolder(root, image_size=0), "image_size must be a positive integer or None"),
    (lambda root: SyntheticFaces(3, 2, 16, family_size=0), "family_size must be a positive integer"),
    # by type and value, naming the argument (a TypeError, a RuntimeError or silent zero images before)
    (lambda root: SyntheticFaces(2.5, 3, 16), "num_identities must be an integer, got 2.5"),
    (lambda root: SyntheticFaces(2, 2, 16, grid=0), "grid >= 1"),
    (lambda root: SyntheticFaces(2, 2, 16, noise=float("nan")), "noise must be a finite number >= 0, got nan"),
    (lambda root: SyntheticFaces(2, 2, 16, expression=-1.0), "expression must be a finite number >= 0"),
])
def test_data_options_are_checked(tmp_path, make, match):
    write_folder(tmp_path / "faces")
    with pytest.raises(ValueError, match=match):
        make(tmp_path / "faces")


@pytest.mark.parametrize("args, message", [
    (["--quick", "--pairs", "pairs.txt"], "--pairs and --eval-data evaluate real data: they need --data"),
    (["--quick", "--eval-data", "faces"], "--pairs and --eval-data evaluate real data: they need --data"),
    (["--quick", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--quick", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["--quick", "--teacher", "mobilefacenet"], "invalid choice: 'mobilefacenet'"),
    (["--quick", "--lr", "-1"], "--lr must be positive"),
    (["--quick", "--data", "missing_folder"], "missing_folder does not exist"),
    # (before: each of these failed only after the teacher's training, or trained a NaN epoch)
    (["--quick", "--student", "foo"], "invalid choice: 'foo'"),
    (["--quick", "--ekd-momentum", "2"], "momentum must lie in [0, 1], got 2.0"),
    (["--quick", "--ekd-weight", "-1"], "--ekd-weight must be a finite number >= 0, got -1.0"),
    (["--quick", "--rkd-weight", "nan"], "--rkd-weight must be a finite number >= 0, got nan"),
    (["--quick", "--margin", "2"], "margin must lie in [0, pi/2), got 2.0"),
    (["--quick", "--images-per-identity", "1"], "--images-per-identity must be at least 2, got 1"),
    (["--quick", "--image-size", "40"], "--image-size must be a multiple of 16, got 40"),
    # (the data's identities against the balanced part's: checked once the data are loaded)
    (["--quick", "--identities-per-batch", "101"], "num_identities=101 but only 100 identities"),
])
def test_example_refuses_bad_arguments_before_training(tmp_path, args, message):
    """Arguments that would fail later (after the teacher's training) or be silently ignored are
    refused by the parser, at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_example_needs_twenty_identities_to_hold_out_a_tenth(tmp_path):
    write_folder(tmp_path / "faces", identities=5, images=3)
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import distill
        args = distill.parse_args(["--quick", "--data", str(tmp_path / "faces")])
        with pytest.raises(ValueError, match="holds 5 identities: holding out every tenth .* needs at least 20"):
            distill.load_data(args)
    finally:
        sys.path.remove(str(EXAMPLE.parent))


def test_empty_identity_folder_takes_no_label(tmp_path):
    write_folder(tmp_path / "faces", identities=3, images=2)
    (tmp_path / "faces" / "aaa_empty").mkdir()
    dataset = FaceFolder(tmp_path / "faces")
    assert dataset.classes == ["person0", "person1", "person2"]
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.fixture
def distill():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import distill
        yield distill
    finally:
        sys.path.remove(str(EXAMPLE.parent))


class _Embedder(torch.nn.Module):
    """Fixed random embeddings of each image (by its mean), with `bad` written into row 0."""

    def __init__(self, bad=None):
        super().__init__()
        self.projection = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
        self.bad = bad

    def forward(self, images):
        out = images.mean(dim=(1, 2, 3)).unsqueeze(1) * 100 + self.projection * torch.arange(len(images)).unsqueeze(1)
        if self.bad is not None:
            out[0, 0] = self.bad
        return out


def test_student_arcface_sees_the_general_part_only(distill, monkeypatch):
    """ArcFace on each batch's general part and the distillation loss on the whole batch, as the
    authors train (TFace's EKD task) and as the Table 5 benchmark's step does; the example gave
    ArcFace the whole batch, the balanced identities included."""
    from ekd_kernels.arcface import ArcFace

    args = distill.parse_args([*TINY, "--train-identities", "12", "--train-images", "6", "--test-identities", "4",
                               "--test-images", "3", "--runs", "ekd"])
    train, test = distill.load_data(args)
    seen = {"arcface": [], "ekd": []}
    arcface_forward, ekd_forward = ArcFace.forward, distill.EKDLoss.forward

    def arcface(self, embeddings, labels):
        seen["arcface"].append(len(embeddings))
        return arcface_forward(self, embeddings, labels)

    def ekd(self, student, teacher, labels, generator=None):
        seen["ekd"].append(len(student))
        return ekd_forward(self, student, teacher, labels, generator)

    monkeypatch.setattr(ArcFace, "forward", arcface)
    monkeypatch.setattr(distill.EKDLoss, "forward", ekd)
    teacher_embeddings = torch.randn(len(train.labels), 512, generator=torch.Generator().manual_seed(0))
    distill.train_student("ekd", args, train, test, teacher_embeddings, torch.device("cpu"))
    assert seen["arcface"] and set(seen["arcface"]) == {4}  # --general-size 4
    assert set(seen["ekd"]) == {4 + 4 * 4}  # + 4 identities x 4 images


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_evaluate_records_nan_for_non_finite_embeddings(distill, bad):
    """A diverged student (non-finite test embeddings) made verify_all_pairs / tpr_at_fpr raise,
    which ended the whole script and lost the runs already finished: its TPRs are NaN instead,
    for all-pairs and pairs-list evaluation, and the printed lines say why."""
    dataset = SyntheticFaces(4, 3, image_size=16, seed=0)
    pairs = (torch.tensor([0, 3, 0, 6]), torch.tensor([1, 4, 3, 9]), torch.tensor([True, True, False, False]))
    for split in (distill.Split(dataset), distill.Split(dataset, pairs)):
        finite = distill.evaluate(_Embedder(), split, torch.device("cpu"))
        diverged = distill.evaluate(_Embedder(bad), split, torch.device("cpu"))
        assert list(finite) == list(diverged) == ["tpr@0.01", "tpr@0.001", "tpr@0.0001"]
        assert all(0.0 <= v <= 1.0 for v in finite.values()) and all(np.isnan(v) for v in diverged.values())
        assert distill.diverged_note(finite) == ""
        assert "non-finite test embeddings, TPRs recorded as NaN" in distill.diverged_note(diverged)


def test_diverged_run_does_not_end_the_others(tmp_path):
    """--ekd-weight 1e30 makes the EKD student NaN in its first steps: its epoch line says so and
    records NaN TPRs, the RKD run after it still runs, and every output is written."""
    out = tmp_path / "out"
    stdout = run_example([*TINY, "--train-identities", "12", "--train-images", "6", "--test-identities", "8",
                          "--test-images", "4", "--runs", "ekd", "rkd", "--ekd-weight", "1e30", "--out", str(out)],
                         tmp_path)
    assert "ekd     epoch 1: " in stdout and "tpr@0.01 nan" in stdout and "[diverged: non-finite test embeddings, " \
        "TPRs recorded as NaN]" in stdout.split("ekd     epoch 1: ")[1].splitlines()[0]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["run"] for r in rows] == ["ekd", "rkd"]
    assert rows[0]["tpr@0.01"] == "nan" and 0.0 <= float(rows[1]["tpr@0.01"]) <= 1.0
    def refuse_constant(name):
        raise AssertionError(f"summary.json holds {name}, which is not JSON")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse_constant)
    assert summary["final_student_tpr"]["ekd"]["tpr@0.01"] is None  # (null: a NaN TPR)
    assert "nan" not in (out / "critical_ratio.svg").read_text()
    for name in summary["outputs"]:
        assert (out / name).is_file()


STOP_IN_RKD = """
import sys
import distill
original = distill.train_student
def stopped(run, *args, on_epoch, **kwargs):
    def save_then_stop(history):
        on_epoch(history)
        if run == "rkd":
            raise RuntimeError("stopped in rkd")
    return original(run, *args, on_epoch=save_then_stop, **kwargs)
distill.train_student = stopped
distill.main(sys.argv[1:])
"""


def test_finished_runs_are_saved_before_a_later_run_fails(tmp_path):
    """A run that fails (or is stopped) after others finished: history.csv holds every epoch done
    so far, and summary.json the finished runs (before, both were written only at the very end)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(EXAMPLE.parent)])}
    proc = subprocess.run([sys.executable, "-c", STOP_IN_RKD, *TINY, "--train-identities", "12", "--train-images",
                           "6", "--test-identities", "8", "--test-images", "4", "--runs", "arcface", "rkd", "ekd",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "stopped in rkd" in proc.stderr, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [(r["run"], r["epoch"]) for r in rows] == [("arcface", "1"), ("rkd", "1")]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["final_student_tpr"]) == ["arcface"] and "rkd" not in summary["seconds"]
