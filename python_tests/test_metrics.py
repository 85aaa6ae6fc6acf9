"""ekd_kernels.metrics: TPR at FPR against a numpy sort, the roc_curve correspondence, and the
tiled all-pairs evaluator against a brute-force computation of every pair."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from ekd_kernels.metrics import (VerificationResult, key_to_float, order_keys, pair_scores, threshold_indices,
                                 tpr_at_fpr, verify_all_pairs)

FPRS = (0.5, 1e-1, 1e-2, 3e-3, 1e-3, 1e-4)


def numpy_tpr_at_fpr(pos, neg, fprs):
    """The definition, by a full sort: element floor(L * f) of the negatives in descending order."""
    ordered = np.sort(np.asarray(neg))[::-1]
    out = []
    for m in threshold_indices(len(ordered), fprs):
        t = ordered[m]
        out.append((float(t), float(np.mean(np.asarray(pos) > t))))
    return out


def numpy_roc_curve(y_true, scores):
    """scikit-learn's roc_curve(y_true, scores, drop_intermediate=False), re-derived in numpy:
    one point per distinct score u (descending) with fpr = #(neg >= u) / L, tpr = #(pos >= u) / P,
    preceded by the point (0, 0) at threshold +inf.  Returns integer counts instead of rates."""
    y_true = np.asarray(y_true, dtype=bool)
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, y = np.asarray(scores)[order], y_true[order]
    last_of_value = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    true_positives = np.cumsum(y)[last_of_value]
    false_positives = np.cumsum(~y)[last_of_value]
    return np.r_[0, false_positives], np.r_[0, true_positives], np.r_[np.inf, s[last_of_value]]


def integer_scores(generator, count, low=-20, high=20):
    return torch.randint(low, high, (count,), generator=generator).double()


# --------------------------------------------------------------------------- given scores
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_negatives", [1, 7, 999, 1000, 12345])
def test_tpr_at_fpr_matches_sort(seed, num_negatives):
    g = torch.Generator().manual_seed(seed)
    pos = integer_scores(g, 300, -5, 30)          # integer scores: many ties, with each other and
    neg = integer_scores(g, num_negatives, -30, 25)  # with the negatives
    result = tpr_at_fpr(pos, neg, FPRS)
    expected = numpy_tpr_at_fpr(pos.numpy(), neg.numpy(), FPRS)
    assert result.thresholds == tuple(t for t, _ in expected)
    assert result.tprs == tuple(r for _, r in expected)
    assert result.num_positive_pairs == 300 and result.num_negative_pairs == num_negatives


def test_tpr_at_fpr_float_scores_and_dtypes():
    g = torch.Generator().manual_seed(5)
    pos, neg = torch.randn(500, generator=g) + 2, torch.randn(20000, generator=g)
    for p, n in ((pos, neg), (pos.double(), neg.float()), (pos.half(), neg.half())):
        result = tpr_at_fpr(p, n, FPRS)
        dtype = torch.promote_types(p.dtype, n.dtype)
        expected = numpy_tpr_at_fpr(p.to(dtype).double().numpy(), n.to(dtype).double().numpy(), FPRS)
        assert result.thresholds == pytest.approx([t for t, _ in expected], abs=0)
        assert result.tprs == tuple(r for _, r in expected)


def test_realised_fpr_never_exceeds_target():
    g = torch.Generator().manual_seed(1)
    neg = integer_scores(g, 5000, -10, 10)
    result = tpr_at_fpr(integer_scores(g, 10), neg, FPRS)
    for f, t in zip(result.fprs, result.thresholds):
        assert int((neg > t).sum()) <= math.floor(f * len(neg)) + 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_correspondence_with_roc_curve(seed):
    """TPR@f = the largest tpr of the ROC points (score >= u) whose fpr does not exceed f."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = integer_scores(g, 400, -10, 40), integer_scores(g, 20000, -40, 20)
    result = tpr_at_fpr(pos, neg, FPRS)
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    false_pos, true_pos, thresholds = numpy_roc_curve(y, np.r_[pos.numpy(), neg.numpy()])
    for m, t, tpr in zip(result.threshold_indices, result.thresholds, result.tprs):
        allowed = false_pos <= m  # fpr_u * L <= floor(f * L)  <=>  fpr_u <= f
        best = int(np.argmax(np.where(allowed, true_pos, -1)))
        assert tpr == true_pos[best] / len(pos)
        # our threshold is the next ROC threshold below the chosen point's
        assert thresholds[best + 1] == t


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn is not installed; test_correspondence_with_roc_curve checks the same "
                           "property against a numpy re-derivation of roc_curve")
def test_correspondence_with_sklearn():
    from sklearn.metrics import roc_curve
    g = torch.Generator().manual_seed(11)
    pos, neg = integer_scores(g, 300, -10, 40), integer_scores(g, 10000, -40, 20)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    scores = np.r_[pos.numpy(), neg.numpy()]
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    ours_fp, ours_tp, _ = numpy_roc_curve(y, scores)
    np.testing.assert_allclose(fpr, ours_fp / len(neg))
    np.testing.assert_allclose(tpr, ours_tp / len(pos))
    result = tpr_at_fpr(pos, neg, FPRS)
    for f, ours in zip(result.fprs, result.tprs):
        assert ours == pytest.approx(tpr[fpr <= f + 1e-15].max(), abs=1e-12)


def test_tpr_at_fpr_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        tpr_at_fpr(torch.tensor([]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="non-finite"):
        tpr_at_fpr(torch.tensor([float("nan")]), torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        tpr_at_fpr(torch.tensor([1.0]), torch.tensor([0.1]), fprs=(1.0,))


def test_threshold_indices_use_exact_fractions():
    assert threshold_indices(1_000_000, (1e-6,)) == (1,)
    assert threshold_indices(3_000_000, (1e-6, 1e-4, 0.3)) == (3, 300, 900_000)
    assert threshold_indices(9, (1e-1,)) == (0,)


# --------------------------------------------------------------------------- keys
def test_order_keys_preserve_order():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1.0, -1.0, float("inf"), -float("inf"),
                            3.4e38, -3.4e38])
    x = torch.cat([special, torch.randn(5000, generator=g), torch.randn(1000, generator=g) * 1e-30])
    keys = order_keys(x).long()
    order = torch.argsort(x)
    sorted_x, sorted_keys = x[order], keys[order]
    assert bool((torch.diff(sorted_keys) >= 0).all())
    assert bool(((torch.diff(sorted_keys) == 0) == (torch.diff(sorted_x) == 0)).all())
    assert int(order_keys(torch.tensor([-0.0]))) == int(order_keys(torch.tensor([0.0]))) == 0
    for v in x[:200].tolist():
        if v != 0.0 or math.copysign(1, v) > 0:
            assert key_to_float(int(order_keys(torch.tensor([v])))) == v


# --------------------------------------------------------------------------- all pairs
def brute_force(embeddings, labels, fprs, normalize):
    e = embeddings.float()
    if normalize:
        e = torch.nn.functional.normalize(e, dim=1)
    rows, cols = torch.triu_indices(len(e), len(e), 1)
    scores = (e[rows] * e[cols]).sum(1) if not normalize else (e @ e.t())[rows, cols]
    positive = labels[rows] == labels[cols]
    return tpr_at_fpr(scores[positive], scores[~positive], fprs)


@pytest.mark.parametrize("batch,classes,tile", [(2, 1, None), (40, 6, (7, 13)), (97, 20, (16, 5)),
                                                (150, 30, None), (203, 4, (64, 64))])
def test_all_pairs_exact_on_integer_embeddings(batch, classes, tile):
    """Integer coordinates make every dot product exact in fp32, whatever the tiling: thresholds
    and TPRs must equal the sort of all pairs, ties and negative scores included."""
    g = torch.Generator().manual_seed(batch)
    if batch == 2:
        embeddings, labels = torch.tensor([[1.0, 2.0], [3.0, -1.0]]), torch.tensor([0, 1])
        with pytest.raises(ValueError, match="positive and negative"):
            verify_all_pairs(embeddings, labels, normalize=False)
        return
    labels = torch.randint(0, classes, (batch,), generator=g)
    centres = torch.randint(-3, 4, (classes, 6), generator=g)
    embeddings = (centres[labels] + torch.randint(-2, 3, (batch, 6), generator=g)).float()
    fprs = (0.9, 0.5, 0.1, 1e-2, 1e-3)  # 0.9 and 0.5 put thresholds at or below zero
    result = verify_all_pairs(embeddings, labels, fprs, normalize=False, tile=tile)
    expected = brute_force(embeddings, labels, fprs, normalize=False)
    assert result.thresholds == expected.thresholds
    assert result.tprs == expected.tprs
    assert result.threshold_indices == expected.threshold_indices
    assert (result.num_positive_pairs, result.num_negative_pairs) == (expected.num_positive_pairs,
                                                                     expected.num_negative_pairs)


@pytest.mark.parametrize("tile", [None, (33, 50)])
def test_all_pairs_cosine_matches_brute_force(tile):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 50, (400,), generator=g)
    embeddings = torch.randn(50, 32, generator=g)[labels] * 1.5 + torch.randn(400, 32, generator=g)
    result = verify_all_pairs(embeddings, labels, FPRS, tile=tile)
    expected = brute_force(embeddings, labels, FPRS, normalize=True)
    # The tile's matmul may round a score differently from the full matmul (last bit): the
    # thresholds agree to fp32 rounding, the TPRs up to the pairs within that rounding.
    np.testing.assert_allclose(result.thresholds, expected.thresholds, atol=1e-6)
    np.testing.assert_allclose(result.tprs, expected.tprs, atol=3 / expected.num_positive_pairs)


def test_all_pairs_label_order_and_dtype_do_not_matter():
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 10, (120,), generator=g)
    embeddings = torch.randint(-3, 4, (120, 5), generator=g).float()
    base = verify_all_pairs(embeddings, labels, normalize=False)
    perm = torch.randperm(120, generator=g)
    assert verify_all_pairs(embeddings[perm], labels[perm], normalize=False) == base
    assert verify_all_pairs(embeddings.double(), labels.int(), normalize=False) == base


def test_all_pairs_same_score_everywhere():
    """All scores equal: a single bucket holds every pair; the threshold is that score, TPR 0."""
    embeddings = torch.ones(64, 4)
    labels = torch.arange(64) // 4
    result = verify_all_pairs(embeddings, labels)
    assert result.thresholds == (1.0, 1.0, 1.0) and result.tprs == (0.0, 0.0, 0.0)


def test_all_pairs_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        verify_all_pairs(torch.zeros(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        verify_all_pairs(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        verify_all_pairs(torch.zeros(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        verify_all_pairs(torch.full((5, 3), float("nan")), torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="at least 2"):
        verify_all_pairs(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    # complex lost its imaginary part (a warning), bool read as 0 and 1: refused as the loss does
    labels = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="embeddings must be real numbers .float or integer., got torch.complex64"):
        verify_all_pairs(torch.randn(5, 3).to(torch.complex64), labels)
    with pytest.raises(ValueError, match="embeddings must be real numbers .float or integer., got torch.bool"):
        verify_all_pairs(torch.randn(5, 3) > 0, labels)
    with pytest.raises(ValueError, match="embeddings_b must be real numbers"):
        pair_scores(torch.randn(4, 3), torch.randn(4, 3) > 0)
    with pytest.raises(ValueError, match="expected two N x D tensors, got list and list"):
        pair_scores([[1.0, 0.0]], [[1.0, 0.0]])


def test_metrics_refuse_what_they_cannot_read_by_name():
    """Sparse and meta tensors (they failed inside torch: a reshape, an .item()), a string flag
    (normalize="False" is truthy: it normalised), embeddings on two devices, and fp64 embeddings
    past fp32's range (the fp32 cast made them inf: pair_scores gave NaN silently, and
    verify_all_pairs called them non-finite)."""
    embeddings, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.randn(5)
    with pytest.raises(ValueError, match="embeddings must be a dense .strided. tensor, got layout torch.sparse_coo"):
        verify_all_pairs(embeddings.to_sparse(), labels)
    with pytest.raises(ValueError, match="labels must be a dense .strided. tensor"):
        verify_all_pairs(embeddings, labels.to_sparse())
    with pytest.raises(ValueError, match="embeddings is on the meta device, which holds no values"):
        verify_all_pairs(embeddings.to("meta"), labels.to("meta"))
    with pytest.raises(ValueError, match="normalize must be True or False, got 'False'"):
        verify_all_pairs(embeddings, labels, normalize="False")
    with pytest.raises(ValueError, match="positive_scores must be a dense .strided. tensor"):
        tpr_at_fpr(scores.to_sparse(), scores)
    with pytest.raises(ValueError, match="negative_scores is on the meta device"):
        tpr_at_fpr(scores, scores.to("meta"))
    with pytest.raises(ValueError, match="embeddings_a is on the meta device"):
        pair_scores(embeddings.to("meta"), embeddings)
    with pytest.raises(ValueError, match="embeddings_b must be a dense"):
        pair_scores(embeddings, embeddings.to_sparse())
    with pytest.raises(ValueError, match="hold values past fp32's range .*with normalize=False"):
        verify_all_pairs(embeddings.double() * 1e300, labels, normalize=False)
    with pytest.raises(ValueError, match="embeddings_b hold a non-finite value"):
        pair_scores(embeddings, embeddings * float("nan"))
    # fp64 embeddings give the fp32 cosines
    other = torch.randn(6, 3)
    assert torch.equal(pair_scores(embeddings.double(), other.double()), pair_scores(embeddings, other))


def test_cosines_of_huge_rows_are_those_of_the_rows_scaled_down():
    """Cosines are scale-free: rows past fp32's squared-norm range (|x| from about 1.8e19, fp32
    or fp64) and fp64 rows past fp32's range give the cosines of the same rows scaled down by a
    power of two, bitwise (they normalised to rows of zeros: cosines of 0, silently; fp64 past
    fp32's range became inf)."""
    g = torch.Generator().manual_seed(3)
    embeddings, other = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    labels = torch.arange(64) // 4
    want_scores = pair_scores(embeddings, other)
    want = verify_all_pairs(embeddings, labels)
    for scale, dtype in ((2.0 ** 70, torch.float32), (2.0 ** 1000, torch.float64), (2.0 ** 50, torch.float32)):
        huge = embeddings.to(dtype) * scale
        assert torch.equal(pair_scores(huge, other.to(dtype) * scale), want_scores), (scale, dtype)
        got = verify_all_pairs(huge, labels)
        assert (got.thresholds, got.tprs) == (want.thresholds, want.tprs), (scale, dtype)
    # one huge row among ordinary ones: only it is scaled
    mixed = embeddings.clone()
    mixed[5] *= 2.0 ** 80
    assert torch.equal(pair_scores(mixed, other), want_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: two devices are needed")
def test_pair_scores_refuses_embeddings_on_two_devices():
    embeddings = torch.randn(6, 3)
    with pytest.raises(ValueError, match="embeddings_a and embeddings_b must be on the same device, got cpu and cuda"):
        pair_scores(embeddings, embeddings.cuda())


def test_tpr_reads_python_floats_in_fp64_and_refuses_what_is_not_numbers():
    """A list of Python floats is fp64 data: read in the default dtype (fp32) 1.0000000001 became
    1.0, a tie with the negative score 1.0, and the positive was not counted above it.  Scores
    that are not numbers are a ValueError naming them (a TypeError or RuntimeError from inside
    before)."""
    assert tpr_at_fpr([1.0000000001], [1.0], 0.1).tprs == (1.0,)
    assert tpr_at_fpr(np.array([1.0000000001]), np.array([1.0]), 0.1).tprs == (1.0,)
    assert tpr_at_fpr([3, 4], [1, 2, 5], 0.5) == tpr_at_fpr(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 5.0]), 0.5)
    assert tpr_at_fpr(torch.tensor([1.0000000001]), [1.0], 0.1).tprs == (0.0,)  # (an fp32 tensor: its own rounding)
    with pytest.raises(ValueError, match="positive_scores must be a tensor, an array or a sequence of numbers, got str"):
        tpr_at_fpr("abc", [1.0])
    with pytest.raises(ValueError, match="negative_scores must be a tensor, an array or a sequence of numbers, got "
                                         "NoneType"):
        tpr_at_fpr([1.0], None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the evaluator's CUDA path is not run"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_metrics_ignore_an_enclosing_autocast(device, dtype):
    """Evaluation inside a training step's torch.autocast: the tiles' matmuls ran in bf16/fp16, and
    the radix passes' int32 view of those scores crashed (or selected from 16-bit cosines).  Every
    entry point must give bitwise what it gives outside autocast, over several tiles."""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 60, (300,), generator=g).to(device)
    embeddings = (torch.randn(60, 32, generator=g)[labels.cpu()] + torch.randn(300, 32, generator=g)).to(device)
    calls = [lambda: verify_all_pairs(embeddings, labels, FPRS, tile=(64, 96)),
             lambda: verify_all_pairs(embeddings, labels, FPRS, normalize=False, tile=(100, 37)),
             lambda: verify_all_pairs(embeddings, labels, FPRS),
             lambda: tpr_at_fpr(embeddings[:, 0], embeddings[:, 1], FPRS),
             lambda: pair_scores(embeddings[:150], embeddings[150:])]
    outside = [call() for call in calls]
    with torch.autocast(device, dtype=dtype):
        inside = [call() for call in calls]
    for a, b in zip(outside[:-1], inside[:-1]):
        assert a == b
    assert inside[-1].dtype == torch.float32 and torch.equal(inside[-1], outside[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the evaluator's CUDA path is not run")
def test_all_pairs_cuda_matches_cpu():
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 40, (500,), generator=g)
    embeddings = torch.randint(-3, 4, (500, 8), generator=g).float()
    cpu = verify_all_pairs(embeddings, labels, normalize=False)
    assert verify_all_pairs(embeddings.cuda(), labels.cuda(), normalize=False) == cpu


def test_result_helpers():
    result = tpr_at_fpr(torch.tensor([0.9, 0.05]), torch.tensor([0.1, 0.3, 0.0]), fprs=(0.5,))
    assert isinstance(result, VerificationResult)
    assert result.tpr(0.5) == 0.5 and result.thresholds == pytest.approx((0.1,))
    assert result.as_dict()["tprs"] == (0.5,)
    with pytest.raises(KeyError):
        result.tpr(0.1)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(pair_scores(a, b), torch.nn.functional.cosine_similarity(a, b))


def test_all_pairs_rejects_zero_width_and_bad_tiles():
    embeddings, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="at least one column"):
        verify_all_pairs(embeddings[:, :0], labels)
    with pytest.raises(ValueError, match="D >= 1"):
        pair_scores(embeddings[:, :0], embeddings[:, :0])
    for tile in [(0, 0), (-1, 5), (4, 0), (4,), (4, 4, 4), (2.0, 3), (True, 4), 8]:
        with pytest.raises(ValueError, match="tile must be two positive integers"):
            verify_all_pairs(embeddings, labels, tile=tile)
    # an integer-like tile of another type is fine, and any positive tile gives the same result
    assert verify_all_pairs(embeddings, labels, tile=(np.int64(2), 3)) == verify_all_pairs(embeddings, labels)


def test_fprs_and_labels_are_checked_before_any_pass():
    """No FPR at all, or one outside (0, 1), is refused by name by both entry points (all-pairs
    verification refused an empty list with min()'s error, after a pass over the pairs); so are
    complex labels."""
    embeddings, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    for fprs in ((), [], torch.zeros(0)):
        with pytest.raises(ValueError, match="fprs must hold at least one false-positive rate"):
            verify_all_pairs(embeddings, labels, fprs=fprs)
        with pytest.raises(ValueError, match="fprs must hold at least one false-positive rate"):
            tpr_at_fpr(torch.rand(10), torch.rand(100), fprs=fprs)
    for fprs in ((0.1, 1.5), (0.0,), (-0.1,)):
        with pytest.raises(ValueError, match="every FPR must lie in \\(0, 1\\)"):
            verify_all_pairs(embeddings, labels, fprs=fprs)
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        verify_all_pairs(embeddings, labels.to(torch.complex64))


@pytest.mark.parametrize("fpr", [1 - 1e-13, 1 - 3e-13])
def test_fpr_that_rounds_to_one_is_refused(fpr):
    """0 < f < 1 but its fraction (denominator <= 10^12) is 1: index L, past the last negative.
    Refused as EKDConfig refuses it, by both entry points, before any selection."""
    with pytest.raises(ValueError, match="within 1e-12 of 1"):
        tpr_at_fpr(torch.rand(10), torch.rand(100), fprs=(0.5, fpr))
    with pytest.raises(ValueError, match="within 1e-12 of 1"):
        verify_all_pairs(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]), fprs=(fpr,))
    with pytest.raises(ValueError, match="within 1e-12 of 1"):
        threshold_indices(100, (fpr,))
    # the largest FPR still read below 1 keeps working (index L - 1: the smallest negative)
    assert tpr_at_fpr(torch.rand(10), torch.arange(100.0), fprs=(1 - 1e-11,)).thresholds == (0.0,)


def test_all_pairs_refuses_scores_that_overflow():
    """normalize=False: finite embeddings whose dot products overflow fp32 gave a wrong threshold
    silently (-0.0 for +-inf); the counted pairs' scores are checked."""
    embeddings = torch.tensor([[1e20], [1e20], [-1e20], [1e20]])
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="a pair score is not finite: with normalize=False"):
        verify_all_pairs(embeddings, labels, fprs=(0.5, 0.01), normalize=False)
    # the same rows normalised, and overflow only on the diagonal (not a counted pair): fine
    verify_all_pairs(embeddings, labels, fprs=(0.5,))
    diagonal_only = torch.tensor([[3e19, 0.0], [0.0, 3e19], [1.0, 1.0], [1.0, 2.0]])
    verify_all_pairs(diagonal_only, torch.tensor([0, 1, 0, 1]), fprs=(0.5,), normalize=False, tile=(4, 4))


def test_tpr_at_fpr_scores_of_mixed_dtypes_compare_exactly():
    """int64 16777217 against an fp32 16777216: torch's promotion (fp32) made them equal."""
    assert tpr_at_fpr(torch.tensor([16777217]), torch.tensor([16777216.0])).tprs == (1.0, 1.0, 1.0)
    for bad in (torch.rand(3) + 0j, torch.ones(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="positive_scores must be real scores"):
            tpr_at_fpr(bad, torch.rand(4))


def test_fprs_as_one_number_or_fp32():
    positive, negative = torch.rand(50, generator=torch.Generator().manual_seed(0)), torch.rand(400)
    assert tpr_at_fpr(positive, negative, fprs=0.1).fprs == (0.1,)
    r = tpr_at_fpr(positive, negative, fprs=torch.tensor([1e-1, 1e-2]))  # fp32 values
    assert r.tpr(1e-2) == r.tprs[1] and r.tpr(0.1) == r.tprs[0]
    with pytest.raises(KeyError):
        r.tpr(1e-3)
    # numpy arrays as torch tensors: 0-d is one FPR, n-d is flattened
    for fprs in (np.array(0.1), torch.tensor(0.1, dtype=torch.float64), np.array([[0.1]])):
        assert tpr_at_fpr(positive, negative, fprs=fprs).fprs == (0.1,)
    assert tpr_at_fpr(positive, negative, fprs=np.array([0.1, 0.01])).fprs == (0.1, 0.01)
    with pytest.raises(ValueError, match="fprs must be false-positive rates"):
        tpr_at_fpr(positive, negative, fprs="0.1")
