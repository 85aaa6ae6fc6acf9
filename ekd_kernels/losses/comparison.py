"""The distillation losses the EKD paper compares with, as its authors compute them.

Source of every formula: Tencent/TFace, ``recognition/tasks/ekd/distillation/`` (the EKD
authors' repository: similarity_perserving.py, cc.py, darkrank.py, fitnet.py, simple_kd.py,
cosine_distance.py).  Each loss takes raw embeddings (logits for KD), returns a 0-d tensor and
sends gradient to the student only; fp16/bf16 inputs are computed in fp32, fp64 in fp64.  A
non-finite input (NaN or +-inf, student or teacher) gives a NaN loss and gradient.  Where
the authors' face-recognition version differs from the original paper or from other libraries,
the docstring says so and a parameter selects the other form.

=====================  ========================================================  ===========
loss                   what it distils                                           cost
=====================  ========================================================  ===========
similarity_preserving  the B x B cosine-similarity matrix                        B^2 D
correlation_congruence the B x B Gaussian-RBF (Taylor) correlation matrix        B^2 D
hard_darkrank          the order of each sample's top-3 teacher neighbours       B^2 D
fitnet                 the raw features (MSE)                                    B D
hinton_kd              softened class posteriors (logits)                        B C
cosine_distill         each sample's direction (1 - cos)                         B D
=====================  ========================================================  ===========
"""

from __future__ import annotations

import math
import numbers

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from ._common import (all_finite, check_embedding_pair, check_integer, check_number, compute_dtypes,
                      fp32_under_autocast, nan_unless_finite, normalize_rows)

# ----------------------------------------------------------------------------- SP


@fp32_under_autocast
def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor,
                               normalize: str = "features") -> torch.Tensor:
    """Similarity-preserving KD (Tung and Mori, ICCV 2019) on embeddings.

    ``normalize="features"`` (default, the EKD authors' version): with row-normalised
    embeddings s_hat, t_hat and G_s = s_hat s_hat^T, G_t = t_hat t_hat^T (cosine similarities),

        loss = ||G_s - G_t||_F^2 / B^2.

    ``normalize="gram_rows"`` is the original paper's form: G = x x^T of the raw features, each
    row of G then L2-normalised, same Frobenius loss.  (The authors note that they depart from
    the paper and normalise the embeddings instead; most KD libraries, e.g. RepDistiller,
    implement the paper's form on feature maps.)  Cost O(B^2 D), memory O(B^2).
    """
    check_embedding_pair(student, teacher, what="similarity_preserving_loss")
    if normalize not in ("features", "gram_rows"):
        raise ValueError(f"normalize must be 'features' or 'gram_rows', got {normalize!r}")
    student, teacher = compute_dtypes(student, teacher)
    if normalize == "features":
        s_hat, t_hat = normalize_rows(student), normalize_rows(teacher)
        gram_s, gram_t = s_hat @ s_hat.t(), t_hat @ t_hat.t()
    else:
        gram_s, gram_t = normalize_rows(student @ student.t()), normalize_rows(teacher @ teacher.t())
    batch = student.shape[0]
    return nan_unless_finite((gram_s - gram_t).pow(2).sum() / (batch * batch), all_finite(student, teacher))


class SimilarityPreservingLoss(nn.Module):
    """Module form of :func:`similarity_preserving_loss`."""

    def __init__(self, normalize: str = "features"):
        super().__init__()
        if normalize not in ("features", "gram_rows"):
            raise ValueError(f"normalize must be 'features' or 'gram_rows', got {normalize!r}")
        self.normalize = normalize

    def forward(self, student, teacher):
        return similarity_preserving_loss(student, teacher, self.normalize)

    def extra_repr(self):
        return f"normalize={self.normalize!r}"


# ----------------------------------------------------------------------------- CC


@fp32_under_autocast
def correlation_congruence_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4,
                                order: int = 2) -> torch.Tensor:
    """Correlation congruence (Peng et al., ICCV 2019), the EKD authors' version.

    For unit vectors the Gaussian RBF kernel is exp(-gamma ||a - b||^2) = exp(-2 gamma)
    exp(2 gamma a.b); its Taylor expansion to ``order`` P gives the correlation matrix

        C_ij = sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! * (s_hat_i . s_hat_j)^p,

    and loss = mean over the B x B entries of (C_s - C_t)^2 (MSE).  Defaults gamma = 0.4 and
    P = 2 (terms p = 0, 1, 2) are the authors'; ``order=1`` is the first-order expansion.  The
    original paper sums the squared differences divided by B^2 as well; some libraries use the
    bilinear or MMD kernel instead.  Cost O(B^2 D), memory O(B^2).

    Any order >= 1 and gamma (order 0, the constant term alone, would make the loss 0 whatever the
    embeddings: refused): a coefficient exp(-2 gamma) (2 gamma)^p / p! is a Poisson probability
    (at most 1); where its direct form overflows (p > 170, or (2 gamma)^p past the largest
    double) it is computed in logs (``_taylor_coefficient``).
    """
    check_embedding_pair(student, teacher, what="correlation_congruence_loss")
    order = _check_cc_options(gamma, order)
    student, teacher = compute_dtypes(student, teacher)

    def correlation(x):
        x_hat = normalize_rows(x)
        similarity = x_hat @ x_hat.t()
        out = torch.zeros_like(similarity)
        for p in range(order + 1):
            out = out + _taylor_coefficient(gamma, p) * similarity.pow(p)
        return out

    return nan_unless_finite((correlation(student) - correlation(teacher)).pow(2).mean(), all_finite(student, teacher))


def _taylor_coefficient(gamma: float, p: int) -> float:
    """exp(-2 gamma) (2 gamma)^p / p!, the authors' expression wherever it is a float (so the loss
    is bitwise theirs).  Past that, p! (p > 170) or (2 gamma)^p does not fit a double, though the
    coefficient, a Poisson probability of mean 2 gamma, is at most 1: in logs nothing overflows
    (exp may underflow to 0, the term's true size)."""
    if not 2 * gamma < math.inf:  # (gamma near the float maximum: every coefficient underflows)
        return 0.0
    try:
        return math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p)
    except OverflowError:
        return math.exp(-2 * gamma + p * math.log(2 * gamma) - math.lgamma(p + 1))


def _check_cc_options(gamma, order) -> int:
    """The checked order, as a Python int."""
    check_number("gamma", gamma, positive=True)
    if isinstance(order, numbers.Integral) and not isinstance(order, (bool, numpy.bool_)) and order == 0:
        # (the expansion's constant term alone: both correlations equal exp(-2 gamma) everywhere,
        # a loss of 0 with no gradient, whatever the embeddings: a silent no-op, surely not meant)
        raise ValueError("order must be an integer >= 1, got 0: the Taylor expansion to order 0 is the constant "
                         "exp(-2 gamma), the same for both models, so the loss would be 0 whatever the embeddings")
    return check_integer("order", order, 1)


class CorrelationCongruenceLoss(nn.Module):
    """Module form of :func:`correlation_congruence_loss` (gamma 0.4, order 2)."""

    def __init__(self, gamma: float = 0.4, order: int = 2):
        super().__init__()
        self.gamma, self.order = gamma, _check_cc_options(gamma, order)  # (a numpy integer stored as an int)

    def forward(self, student, teacher):
        return correlation_congruence_loss(student, teacher, self.gamma, self.order)

    def extra_repr(self):
        return f"gamma={self.gamma}, order={self.order}"


# ----------------------------------------------------------------------------- DarkRank


def _euclidean_distances(x: torch.Tensor) -> torch.Tensor:
    """sqrt(max(||x_i||^2 + ||x_j||^2 - 2 x_i.x_j, 1e-12)), the authors' form (diagonal included)."""
    squared = x.pow(2).sum(1)
    return (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * (x @ x.t())).clamp_min(1e-12).sqrt()


@fp32_under_autocast
def hard_darkrank_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 3.0, beta: float = 3.0,
                       list_length: int = 3) -> torch.Tensor:
    """Hard DarkRank (Chen, Wang and Zhang, AAAI 2018), the EKD authors' version.

    On row-normalised embeddings, score(i, j) = -alpha * ||x_i - x_j||^beta.  For every anchor i,
    the teacher's ``list_length`` highest-scoring other samples (its nearest neighbours, in the
    teacher's order) form a list pi; the loss is the negative Plackett-Luce log-likelihood of
    that order under the student's scores s:

        loss = -mean_i sum_{r=1}^{L} [ s_{i, pi_r} - logsumexp_{u >= r} s_{i, pi_u} ],

    the list-wise probability over the L listed samples only (the "hard" variant).  Defaults
    alpha = beta = 3, L = 3 are the authors'.  One difference from their code, only visible with
    duplicate rows: they drop the first entry of each sorted row, assuming it is the sample
    itself; here the sample itself is excluded explicitly.  Ties in the teacher's order are
    broken by ``torch.sort`` (unspecified).  Needs B > list_length.  Cost O(B^2 D + B^2 log B).
    """
    check_embedding_pair(student, teacher, what="hard_darkrank_loss")
    list_length = _check_darkrank_options(alpha, beta, list_length)
    if student.shape[0] <= list_length:
        raise ValueError(f"hard_darkrank_loss needs more than list_length={list_length} rows (each anchor ranks "
                         f"{list_length} others), got B={student.shape[0]}")
    student, teacher = compute_dtypes(student, teacher)
    # The scores reach -alpha * 2^beta, through d^beta up to 2^beta (distances of unit rows reach
    # 2): past the compute dtype's range they are -inf, and the list's logsumexp of -inf's is NaN,
    # for finite embeddings
    largest = torch.finfo(student.dtype).max
    if max(0.0, math.log(alpha)) + beta * math.log(2.0) > math.log(largest):
        raise ValueError(f"hard_darkrank_loss: beta={beta} and alpha={alpha} take the scores -alpha * d^beta past "
                         f"{student.dtype}'s range ({largest:.3g}): distances of normalised rows reach 2, so d^beta "
                         "reaches 2^beta and the scores -alpha * 2^beta; lower beta or alpha")
    batch = student.shape[0]
    self_mask = torch.eye(batch, dtype=torch.bool, device=student.device)
    with torch.no_grad():
        teacher_scores = -alpha * _euclidean_distances(normalize_rows(teacher)).pow(beta)
        order = teacher_scores.masked_fill(self_mask, float("-inf")).sort(dim=1, descending=True).indices
        order = order[:, :list_length]
    student_scores = -alpha * _euclidean_distances(normalize_rows(student)).pow(beta)
    listed = student_scores.gather(1, order)                        # B x L, teacher's order
    # logsumexp over the suffix u >= r of each list: a reversed cumulative logsumexp
    suffix = torch.logcumsumexp(listed.flip(1), dim=1).flip(1)
    # a NaN teacher row sorts somewhere and leaves finite lists: the batch must still read NaN
    return nan_unless_finite(-(listed - suffix).sum(1).mean(), all_finite(student, teacher))


def _check_darkrank_options(alpha, beta, list_length) -> int:
    """The checked list length, as a Python int."""
    # alpha <= 0 would reverse (or flatten) the ranking the scores encode
    check_number("alpha", alpha, positive=True)
    check_number("beta", beta, positive=True)
    return check_integer("list_length", list_length, 1)


class HardDarkRankLoss(nn.Module):
    """Module form of :func:`hard_darkrank_loss` (alpha 3, beta 3, lists of 3)."""

    def __init__(self, alpha: float = 3.0, beta: float = 3.0, list_length: int = 3):
        super().__init__()
        list_length = _check_darkrank_options(alpha, beta, list_length)  # (a numpy integer stored as an int)
        self.alpha, self.beta, self.list_length = alpha, beta, list_length

    def forward(self, student, teacher):
        return hard_darkrank_loss(student, teacher, self.alpha, self.beta, self.list_length)

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta}, list_length={self.list_length}"


# ----------------------------------------------------------------------------- FitNet


@fp32_under_autocast
def fitnet_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss (Romero et al., ICLR 2015) on embeddings: mean over B x D of
    (s - t)^2 on the raw features, as the EKD authors use it (no regressor: the widths must
    match; the paper's hint regressor is the caller's layer).  Cost O(B D)."""
    check_embedding_pair(student, teacher, same_dim=True, what="fitnet_loss")
    student, teacher = compute_dtypes(student, teacher)
    return nan_unless_finite((student - teacher).pow(2).mean(), all_finite(student, teacher))


class FitNetLoss(nn.Module):
    """Module form of :func:`fitnet_loss`."""

    def forward(self, student, teacher):
        return fitnet_loss(student, teacher)


# ----------------------------------------------------------------------------- Hinton KD


@fp32_under_autocast
def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float = 4.0) -> torch.Tensor:
    """Classic KD (Hinton, Vinyals and Dean, 2015) on logits, the EKD authors' version:

        loss = T^2 / B * sum_i KL( softmax(t_i / T) || softmax(s_i / T) ),  T = 4.

    Inputs are B x C logits (not embeddings); B >= 1; a non-finite logit (-inf included) gives
    NaN.  Cost O(B C)."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: call .to_dense() first")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B x C), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if student_logits.shape[0] < 1 or student_logits.shape[1] < 1:
        raise ValueError(f"logits must be non-empty, got shape {tuple(student_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student and teacher logits are on {student_logits.device} and {teacher_logits.device}")
    _check_kd_temperature(temperature)
    student_logits, teacher_logits = compute_dtypes(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    # non-finite logits (-inf included) give NaN, as a non-finite embedding does in the other losses
    return nan_unless_finite(kl * temperature ** 2 / student_logits.shape[0],
                             all_finite(student_logits, teacher_logits))


def _check_kd_temperature(temperature) -> None:
    """A positive temperature whose square and reciprocal stay finite, normal fp32 values (the
    loss divides the logits by T and multiplies by T^2): 1e200 raised an OverflowError from T ** 2
    and 1e-200 gave a NaN loss for finite logits."""
    value = check_number("temperature", temperature, positive=True)
    if not KD_TEMPERATURE_RANGE[0] <= value <= KD_TEMPERATURE_RANGE[1]:
        raise ValueError(f"temperature must lie in [{KD_TEMPERATURE_RANGE[0]:g}, {KD_TEMPERATURE_RANGE[1]:g}] (its "
                         f"square and reciprocal must stay within fp32's normal range), got {temperature!r}")


#: The temperatures hinton_kd_loss takes: T^2 and 1 / T within fp32's normal range.
KD_TEMPERATURE_RANGE = (1e-18, 1e18)


class HintonKDLoss(nn.Module):
    """Module form of :func:`hinton_kd_loss` (temperature 4)."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        _check_kd_temperature(temperature)
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits):
        return hinton_kd_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self):
        return f"temperature={self.temperature}"


# ----------------------------------------------------------------------------- cosine


@fp32_under_autocast
def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Feature-to-feature cosine distance, the EKD authors' "cosine" baseline:
    loss = 1 - mean_i cos(s_i, t_i) (a zero row has cosine 0).  Widths must match.  Cost O(B D)."""
    check_embedding_pair(student, teacher, same_dim=True, what="cosine_distill_loss")
    student, teacher = compute_dtypes(student, teacher)
    return nan_unless_finite(1 - (normalize_rows(student) * normalize_rows(teacher)).sum(1).mean(),
                             all_finite(student, teacher))


class CosineDistillLoss(nn.Module):
    """Module form of :func:`cosine_distill_loss`."""

    def forward(self, student, teacher):
        return cosine_distill_loss(student, teacher)
