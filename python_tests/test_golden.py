"""The authors' figures (../shared/golden): every backend, with EKDLoss() at its defaults."""

import json

import numpy as np
import pytest
import torch

from ekd_kernels import EKDLoss, RKDLoss

from helpers import GRAD_REL_NORM, LOSS_RTOL, THRESHOLD_ATOL, assert_grad_close, assert_loss_close

EKD_CASES = ["small_multistep", "mid", "large_all_anchors_distinct"]


def test_every_golden_case_is_known(golden_dir):
    """Fails when a new case appears in cases.json that this file does not replay."""
    listed = {c["case"] for c in json.loads((golden_dir / "cases.json").read_text())}
    assert listed == set(EKD_CASES) | {"small"}, listed


@pytest.mark.parametrize("case", EKD_CASES)
def test_ekd_golden_replay(golden_dir, case, backend, device):
    """Replays every step of a case, in order, on one EKDLoss(): loss, gradient and thresholds."""
    data = np.load(golden_dir / f"ekd_{case}.npz")
    crit = EKDLoss(backend=backend).to(device)
    for step in range(data["loss"].shape[0]):
        student = torch.tensor(data["student"][step], device=device, requires_grad=True)
        teacher = torch.tensor(data["teacher"][step], device=device)
        labels = torch.tensor(data["labels"][step], device=device)
        loss = crit(student, teacher, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert_loss_close(loss.detach().cpu(), torch.tensor(data["loss"][step]), LOSS_RTOL)
        assert_grad_close(student.grad.cpu(), torch.tensor(data["grad_student"][step]), GRAD_REL_NORM)
        for name in ("student_thresholds", "teacher_thresholds"):
            got = getattr(crit, name).cpu().numpy()
            np.testing.assert_allclose(got, data[name][step], rtol=0, atol=THRESHOLD_ATOL,
                                       err_msg=f"{case} step {step}: {name}")


def test_rkd_golden(golden_dir, device):
    data = np.load(golden_dir / "rkd_small.npz")
    student = torch.tensor(data["student"], device=device, requires_grad=True)
    loss = RKDLoss()(student, torch.tensor(data["teacher"], device=device))
    loss.backward()
    assert_loss_close(loss.detach().cpu(), torch.tensor(data["loss"]), LOSS_RTOL)
    assert_grad_close(student.grad.cpu(), torch.tensor(data["grad_student"]), GRAD_REL_NORM)
