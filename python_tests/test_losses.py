"""The distillation losses of ekd_kernels.losses: each against a direct loop-based float64
computation on small inputs, gradcheck, student-only gradient, module == functional, bad input."""

import contextlib
import copy
import itertools
import math
from fractions import Fraction

import pytest
import torch

from ekd_kernels.losses import (CorrelationCongruenceLoss, CosineDistillLoss, FitNetLoss, HardDarkRankLoss,
                                HintonKDLoss, PWRLoss, SimilarityPreservingLoss, UnifiedKDLoss,
                                correlation_congruence_loss, cosine_distill_loss, fitnet_loss, hard_darkrank_loss,
                                hinton_kd_loss, pwr_loss, similarity_preserving_loss, unified_kd_loss,
                                unified_kd_terms)

from helpers import assert_grad_close, assert_loss_close

# ----------------------------------------------------------------------------- loop oracles (float64, lists)


def rows(x):
    return [[float(v) for v in r] for r in x.double()]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = max(math.sqrt(dot(a, a)), 1e-12)
    return [x / n for x in a]


def cos(a, b):
    return dot(unit(a), unit(b))


def oracle_sp(s, t, normalize="features"):
    s, t = rows(s), rows(t)
    b = len(s)
    if normalize == "features":
        gs = [[cos(s[i], s[j]) for j in range(b)] for i in range(b)]
        gt = [[cos(t[i], t[j]) for j in range(b)] for i in range(b)]
    else:
        gs = [unit([dot(s[i], s[j]) for j in range(b)]) for i in range(b)]
        gt = [unit([dot(t[i], t[j]) for j in range(b)]) for i in range(b)]
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def oracle_cc(s, t, gamma=0.4, order=2):
    s, t = rows(s), rows(t)
    b = len(s)

    def c(x, i, j):
        a = cos(x[i], x[j])
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * a**p for p in range(order + 1))

    return sum((c(s, i, j) - c(t, i, j)) ** 2 for i in range(b) for j in range(b)) / b**2


def oracle_darkrank(s, t, alpha=3.0, beta=3.0, length=3):
    s, t = [unit(r) for r in rows(s)], [unit(r) for r in rows(t)]
    b = len(s)

    def score(x, i, j):
        return -alpha * math.sqrt(max(sum((u - v) ** 2 for u, v in zip(x[i], x[j])), 1e-12)) ** beta

    total = 0.0
    for i in range(b):
        others = sorted((j for j in range(b) if j != i), key=lambda j: -score(t, i, j))[:length]
        listed = [score(s, i, j) for j in others]
        for r in range(length):
            total += listed[r] - math.log(sum(math.exp(v) for v in listed[r:]))
    return -total / b


def oracle_pwr(s, t, score="l2", loss_type="diff_exp", margin="teacher_diff", margin_value=0.0, power=1.0,
               beta=1.0):
    def scores(x):
        x = [unit(r) for r in rows(x)]
        out = []
        for i, j in itertools.combinations(range(len(x)), 2):
            c = dot(x[i], x[j])
            out.append(math.sqrt(max(2 - 2 * c, 1e-12)) if score == "l2" else 1 - c)
        return out

    ds, dt = scores(s), scores(t)
    mean = sum(dt) / len(dt)
    std = math.sqrt(sum((v - mean) ** 2 for v in dt) / len(dt))
    total, count = 0.0, 0
    for p in range(len(ds)):
        for q in range(len(ds)):
            if not dt[p] > dt[q]:
                continue
            delta_s, delta_t = ds[p] - ds[q], dt[p] - dt[q]
            m = {"teacher_diff": delta_t, "teacher_std": std, "const": margin_value}[margin]
            if loss_type == "ranknet":
                value = math.log(1 + math.exp(-beta * delta_s))
            elif loss_type == "diff_power":
                value = (max(m - delta_s, 0.0) + 1e-12) ** power
            else:
                value = max(math.exp(beta * (m - delta_s)) - 1, 0.0)
            total += value
            count += 1
    return total / count if count else 0.0


def oracle_unified(s, t, labels, bank, bank_labels, own, hard_fraction, num_mined, pair_filter, w_i, w_r):
    s, t, bank = rows(s), rows(t), rows(bank)
    b = len(s)
    gaps = sorted((1 - cos(s[i], t[i]) for i in range(b)), reverse=True)
    k = max(1, math.ceil(Fraction(repr(hard_fraction)) * b))  # the decimal written: 0.07 is 7/100
    iled = sum(gaps[:k]) / k
    diffs = []
    for i in range(b):
        for m in range(len(bank)):
            if m == own[i]:
                continue
            same = labels[i] == bank_labels[m]
            if (pair_filter == "positive" and not same) or (pair_filter == "negative" and same):
                continue
            diffs.append(cos(s[i], bank[m]) - cos(t[i], bank[m]))
    diffs.sort(key=abs, reverse=True)
    kept = diffs if num_mined is None else diffs[:num_mined]
    rpsd = sum(d * d for d in kept) / len(kept) if kept else 0.0
    return w_i * iled + w_r * rpsd


def make(batch=7, ds=5, dt=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, ds, generator=g, dtype=torch.float64) * 2
    t = torch.randn(batch, dt or ds, generator=g, dtype=torch.float64)
    t[:, :min(ds, dt or ds)] += s[:, :min(ds, dt or ds)]
    return s.to(dtype), t.to(dtype)


# ----------------------------------------------------------------------------- against the oracles

EMBEDDING_LOSSES = [
    ("sp", similarity_preserving_loss, {}, oracle_sp, False),
    ("sp_gram_rows", similarity_preserving_loss, {"normalize": "gram_rows"},
     lambda s, t: oracle_sp(s, t, "gram_rows"), False),
    ("cc", correlation_congruence_loss, {}, oracle_cc, False),
    ("cc_order1", correlation_congruence_loss, {"order": 1, "gamma": 0.7},
     lambda s, t: oracle_cc(s, t, 0.7, 1), False),
    ("darkrank", hard_darkrank_loss, {}, oracle_darkrank, False),
    ("darkrank_len2", hard_darkrank_loss, {"alpha": 2.0, "beta": 2.0, "list_length": 2},
     lambda s, t: oracle_darkrank(s, t, 2.0, 2.0, 2), False),
    ("fitnet", fitnet_loss, {}, lambda s, t: sum((a - b) ** 2 for ra, rb in zip(rows(s), rows(t))
                                                 for a, b in zip(ra, rb)) / s.numel(), True),
    ("cosine", cosine_distill_loss, {}, lambda s, t: 1 - sum(cos(a, b) for a, b in zip(rows(s), rows(t))) / len(s),
     True),
    ("pwr", pwr_loss, {}, oracle_pwr, False),
]

PWR_VARIANTS = [dict(score=sc, loss_type=lt, margin=m, margin_value=0.1, power=pw, beta=be)
                for sc, lt, m, pw, be in [("l2", "diff_exp", "teacher_diff", 1.0, 1.0),
                                          ("cosine", "diff_exp", "teacher_std", 1.0, 2.0),
                                          ("l2", "diff_power", "const", 2.0, 1.0),
                                          ("cosine", "diff_power", "teacher_diff", 1.5, 1.0),
                                          ("l2", "ranknet", "teacher_diff", 1.0, 3.0)]]


@pytest.mark.parametrize("name,fn,kwargs,oracle,same_dim", EMBEDDING_LOSSES, ids=[c[0] for c in EMBEDDING_LOSSES])
def test_against_loop_oracle(name, fn, kwargs, oracle, same_dim):
    s, t = make(batch=7, ds=5, dt=5 if same_dim else 6)
    assert fn(s, t, **kwargs).item() == pytest.approx(oracle(s, t), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("options", PWR_VARIANTS, ids=lambda o: f"{o['score']}-{o['loss_type']}-{o['margin']}")
def test_pwr_variants_against_loop_oracle(options):
    s, t = make(batch=6, ds=4, dt=5, seed=3)
    assert pwr_loss(s, t, **options).item() == pytest.approx(oracle_pwr(s, t, **options), rel=1e-10)


@pytest.mark.parametrize("options", [PWR_VARIANTS[0], dict(loss_type="diff_exp", beta=2.5)], ids=["default", "beta"])
def test_pwr_sorted_algorithm_matches_the_couples(options):
    """The default variant's O(M log^2 M) dominance-set algorithm against the blockwise couples,
    with tied teacher scores (integer embeddings) and without, fp64 and fp32."""
    g = torch.Generator().manual_seed(8)
    cases = [make(batch=23, ds=5, dt=6, seed=6),
             (torch.randn(17, 4, generator=g, dtype=torch.float64),
              torch.randint(0, 3, (17, 3), generator=g).double()),
             make(batch=40, ds=16, seed=7, dtype=torch.float32)]
    for s, t in cases:
        s = s.clone().requires_grad_(True)
        tight = s.dtype == torch.float64
        by_couples = pwr_loss(s, t, algorithm="couples", **options)
        (g_couples,) = torch.autograd.grad(by_couples, s)
        by_sorting = pwr_loss(s, t, algorithm="sorted", **options)
        (g_sorted,) = torch.autograd.grad(by_sorting, s)
        assert by_sorting.item() == pytest.approx(by_couples.item(), rel=1e-12 if tight else 1e-6)
        torch.testing.assert_close(g_sorted, g_couples, rtol=1e-9 if tight else 1e-5, atol=1e-12 if tight else 1e-7)


@pytest.mark.parametrize("beta, width", [(1e-10, 8), (1e-6, 8), (30.0, 3)])
def test_pwr_couples_match_the_sorted_algorithm_in_fp32_at_extreme_beta(beta, width):
    """fp32 scores: the couples' blocks computed in the input dtype lost every digit of
    e^(beta gap) - 1 at beta = 1e-10 (a loss of 0 and a wrong gradient), 0.2% of the loss and 5%
    of the gradient at 1e-6, and overflowed at beta = 30 (an inf loss, NaN gradients) where the
    sorted algorithm (fp64) gives finite values; now both compute in fp64 and agree."""
    torch.manual_seed(3)
    student, teacher = torch.randn(17, width), torch.randn(17, width)
    results = []
    for algorithm in ("sorted", "couples"):
        x = student.clone().requires_grad_(True)
        loss = pwr_loss(x, teacher, beta=beta, algorithm=algorithm)
        loss.backward()
        results.append((loss, x.grad))
    (sorted_loss, sorted_grad), (couples_loss, couples_grad) = results
    assert torch.isfinite(couples_loss) and torch.isfinite(couples_grad).all()
    assert couples_loss.dtype == couples_grad.dtype == torch.float32
    assert couples_loss.item() == pytest.approx(sorted_loss.item(), rel=1e-6)
    torch.testing.assert_close(couples_grad, sorted_grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [1000.0, 5000.0])
def test_pwr_sorted_algorithm_is_not_nan_at_large_beta_times_range(beta):
    """beta (a_p - a_q) small on every ordered couple but beta * the spread of a = d_t - d_s far
    past fp64's exponent range: the sorted algorithm's one shift (the mean) overflowed
    e^{beta a_p} to inf and its partner e^{-beta a_q} to 0, a NaN loss and gradient where the
    couples give finite ones.  And where a couple's own term overflows, both give +inf."""
    from ekd_kernels.losses import pwr

    teacher = torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64)
    # a = t - s = [1, 1 + 1e-3, -1, -1 + 1e-3]: the two ordered couples (0, 1) and (2, 3) with a_q < a_p
    a = torch.tensor([1.0, 1.001, -1.0, -0.999], dtype=torch.float64)
    results = []
    for algorithm in ("sorted", "couples"):
        student = (teacher - a).requires_grad_(True)
        if algorithm == "sorted":
            loss = pwr._SortedDiffExp.apply(student, teacher, beta)
        else:
            loss = pwr._RankingCouples.apply(student, teacher, "diff_exp", "teacher_diff", 0.0, 1.0, beta, 4)
        loss.backward()
        results.append((loss, student.grad))
    want = 2 * math.expm1(beta * 1e-3) / 6
    for loss, grad in results:
        assert loss.item() == pytest.approx(want, rel=1e-9) and torch.isfinite(grad).all()
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=0)
    g = torch.Generator().manual_seed(0)  # (random embeddings: some couple's term overflows)
    s, t = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    assert [pwr_loss(s, t, beta=beta, algorithm=algorithm).item() for algorithm in ("sorted", "couples")] == \
        [math.inf, math.inf]


def test_darkrank_scores_within_range_stay_finite():
    """The largest options the range check lets through give a finite loss (fp32 at beta = 100:
    scores down to -3 * 2^100), and the same options in fp64 where fp32 refuses them."""
    s, t = make(batch=8, ds=4, seed=2, dtype=torch.float32)
    assert torch.isfinite(hard_darkrank_loss(s, t, beta=100.0))
    assert torch.isfinite(hard_darkrank_loss(s.double(), t.double(), beta=200.0))


def test_integer_options_take_numpy_integers():
    """Integer options take numpy integers (as EKDConfig does: a value read from a config array)
    with the Python int's result, and still refuse numpy bools."""
    import numpy

    s, t = make(batch=8, ds=4, seed=1)
    labels = torch.arange(8) // 2
    pairs = [
        (lambda n: UnifiedKDLoss(n(4), bank_size=n(16), num_mined_pairs=n(8))(s, t, labels)),
        (lambda n: CorrelationCongruenceLoss(order=n(2))(s, t)),
        (lambda n: HardDarkRankLoss(list_length=n(2))(s, t)),
        (lambda n: PWRLoss(algorithm="couples", chunk=n(3))(s, t)),
        (lambda n: pwr_loss(s, t, algorithm="couples", chunk=n(5))),
    ]
    for call in pairs:
        assert torch.equal(call(numpy.int64), call(int))
    # the modules keep Python ints: they compile whole as with ints (a numpy integer reached the
    # forward's check under Dynamo, which takes it for a tensor: an error)
    from torch import _dynamo
    for module in (CorrelationCongruenceLoss(order=numpy.int64(2)), HardDarkRankLoss(list_length=numpy.int64(2)),
                   PWRLoss(algorithm="couples", chunk=numpy.int64(3))):
        _dynamo.reset()
        assert torch.equal(torch.compile(module, fullgraph=True, backend="eager")(s, t), module(s, t))
    assert "'num_mined_pairs': 8," in repr(UnifiedKDLoss(4, num_mined_pairs=numpy.int64(8)).options)
    with pytest.raises(ValueError, match="order must be an integer >= 1, got 0: the Taylor expansion"):
        CorrelationCongruenceLoss(order=numpy.int64(0))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        PWRLoss(chunk=numpy.bool_(True))
    with pytest.raises(ValueError, match="bank_size must be an integer >= 1"):
        UnifiedKDLoss(4, bank_size=numpy.bool_(True))


def test_pwr_blocks_do_not_change_the_result():
    s, t = make(batch=9, ds=4, seed=5)
    s.requires_grad_(True)
    whole = pwr_loss(s, t, algorithm="couples")
    g_whole, = torch.autograd.grad(whole, s)
    for chunk in (1, 7, 1000):
        part = pwr_loss(s, t, chunk=chunk, algorithm="couples")
        g_part, = torch.autograd.grad(part, s)
        assert part.item() == pytest.approx(whole.item(), rel=1e-12)
        torch.testing.assert_close(g_part, g_whole, rtol=1e-10, atol=1e-12)
    # the module passes its chunk on: the same value as the functional form's
    module = PWRLoss(algorithm="couples", chunk=7)
    assert module.chunk == 7 and torch.equal(module(s, t), pwr_loss(s, t, chunk=7, algorithm="couples"))


def test_pwr_without_ordered_couple_is_zero():
    """All teacher scores equal (an equilateral simplex): no ordered couple, loss 0, gradient 0."""
    teacher = torch.eye(4, dtype=torch.float64)
    for algorithm in ("sorted", "couples"):
        student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        loss = pwr_loss(student, teacher, algorithm=algorithm)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(student.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("algorithm", ["sorted", "couples"])
def test_pwr_second_derivative_is_refused(algorithm, dtype):
    """PWR's gradient is computed in its forward and saved: a gradient penalty through it must
    raise, by .backward() and by autograd.grad (which runs only the nodes on paths to its
    inputs), never treat the saved gradient as a constant (a silently wrong second derivative).
    fp32 too: the couples compute on an fp64 copy, and the refusal must hang on the input."""
    student, teacher = make(6, 4, dtype=dtype)
    x = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(pwr_loss(x, teacher, algorithm=algorithm) + x.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="pwr_loss has no second derivative"):
        (grad.pow(2).sum() + x.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="pwr_loss has no second derivative"):
        torch.autograd.grad(grad.pow(2).sum(), x)
    # under activation checkpointing (each saved tensor unpacked once) a first derivative with
    # create_graph=True is the plain one
    checkpointed = torch.utils.checkpoint.checkpoint(lambda a: pwr_loss(a * 1, teacher, algorithm=algorithm), x,
                                                     use_reentrant=False)
    (grad_checkpointed,) = torch.autograd.grad(checkpointed, x, create_graph=True)
    (plain,) = torch.autograd.grad(pwr_loss(x * 1, teacher, algorithm=algorithm), x)
    assert torch.equal(grad_checkpointed.detach(), plain)


@pytest.mark.parametrize("algorithm", ["sorted", "couples"])
def test_pwr_refuses_forward_mode_and_torch_func(algorithm):
    """PWR's gradient is computed in its forward (autograd.Functions in the forward(ctx) style):
    forward mode and torch.func's transforms have no rule.  Refused naming pwr_loss, where torch's
    own messages named no loss."""
    import torch.autograd.forward_ad as forward_ad

    student, teacher = make(6, 4)
    tangent = torch.ones_like(student)

    def loss(a):
        return pwr_loss(a, teacher, algorithm=algorithm)

    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="pwr_loss has no forward-mode"):
        loss(forward_ad.make_dual(student, tangent))
    for call in (lambda: torch.func.grad(loss)(student), lambda: torch.func.jvp(loss, (student,), (tangent,)),
                 lambda: torch.func.vmap(loss)(torch.stack([student, student]))):
        with pytest.raises(NotImplementedError, match="pwr_loss (does not run under torch.func|has no forward-mode)"):
            call()


#: The losses that torch.compile(fullgraph=True) takes whole (README; HintonKD's inputs read as
#: logits); Unified KD selects with data-dependent sizes, graph breaks.  (PWR's default variant
#: counted its teacher ties with unique_consecutive, a data-dependent size, until it counted them
#: in fixed shapes: fullgraph then failed with Dynamo's internal PendingUnbackedSymbolNotFound.)
FULLGRAPH_LOSSES = [SimilarityPreservingLoss, CorrelationCongruenceLoss, HardDarkRankLoss, FitNetLoss, HintonKDLoss,
                    CosineDistillLoss, lambda: PWRLoss(loss_type="ranknet"), PWRLoss]


@pytest.mark.parametrize("loss", FULLGRAPH_LOSSES, ids=["sp", "cc", "darkrank", "fitnet", "hinton", "cosine",
                                                        "pwr_ranknet", "pwr"])
def test_compiles_whole_with_fullgraph(loss):
    student, teacher = make(8, 6, dtype=torch.float32)
    module = loss()
    x, x_compiled = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    eager = module(x, teacher)
    eager.backward()
    compiled = torch.compile(module, fullgraph=True)(x_compiled, teacher)
    compiled.backward()
    assert_loss_close(compiled, eager, rtol=1e-5)
    assert_grad_close(x_compiled.grad, x.grad)


@pytest.mark.parametrize("name", ["sp", "cc", "darkrank", "hinton", "pwr", "rkd", "fast_rkd", "fast_rkd_torch",
                                  "cc_function", "pwr_function", "darkrank_function", "rkd_function", "hinton_function"])
def test_compiles_whole_with_dynamic_shapes(name):
    """torch.compile(fullgraph=True, dynamic=True), modules and functions compiled directly: a
    float option is then a SymFloat, and the options' finiteness check (math.isfinite) stopped
    Dynamo ("torch.* op returned non-Tensor") for 7 losses; now comparisons, which it guards on.
    Two batch sizes, each the eager loss and gradient."""
    import torch._dynamo

    losses = {
        "sp": SimilarityPreservingLoss(), "cc": CorrelationCongruenceLoss(gamma=2.0, order=3),
        "darkrank": HardDarkRankLoss(), "hinton": HintonKDLoss(), "pwr": PWRLoss(), "rkd": RKDLoss(),
        "fast_rkd": FastRKDLoss(), "fast_rkd_torch": FastRKDLoss(backend="torch"),
        "cc_function": correlation_congruence_loss, "pwr_function": pwr_loss,
        "darkrank_function": hard_darkrank_loss, "rkd_function": rkd_loss, "hinton_function": hinton_kd_loss,
    }
    loss = losses[name]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    # (RKD's mean over the d > 0 entries, the authors' expression, is a data-dependent size: torch
    # 2.6 traces it only with capture_dynamic_output_shape_ops, which later releases do not need)
    capture = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True) if name.startswith("rkd") else \
        contextlib.nullcontext()
    for batch in (16, 12):
        student, teacher = make(batch, 6, seed=batch, dtype=torch.float32)
        x, x_compiled = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        eager = loss(x, teacher)
        eager.backward()
        with capture:
            got = compiled(x_compiled, teacher)
        got.backward()
        assert torch.equal(got, eager), (got, eager)
        torch.testing.assert_close(x_compiled.grad, x.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sp", "cc", "darkrank", "pwr", "rkd"])
def test_compiled_inside_autocast_with_the_documented_setting_gives_the_eager_gradient(name):
    """A compiled loss called inside torch.autocast, its backward outside: with
    torch._functorch.config.backward_pass_autocast = "off" (README: PyTorch's default traces the
    backward under the forward's autocast, a bf16-rounded gradient) the loss and gradient are
    bitwise the eager ones."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    loss = {"sp": SimilarityPreservingLoss, "cc": CorrelationCongruenceLoss, "darkrank": HardDarkRankLoss,
            "pwr": PWRLoss, "rkd": RKDLoss}[name]()
    student, teacher = make(16, 8, dt=10, seed=4, dtype=torch.float32)
    x, x_compiled = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    eager = loss(x, teacher)
    eager.backward()
    if not hasattr(functorch_config, "backward_pass_autocast"):
        pytest.skip(f"torch {torch.__version__} has no backward_pass_autocast setting: the README's limit stands "
                    "there without this way round it")
    torch._dynamo.reset()
    with functorch_config.patch(backward_pass_autocast="off"):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = compiled(x_compiled, teacher)
        got.backward()
    assert torch.equal(got, eager) and torch.equal(x_compiled.grad, x.grad)


def test_hinton_kd_against_loop_oracle():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    temp = 4.0
    total = 0.0
    for rs, rt in zip(rows(s), rows(t)):
        zs = sum(math.exp(v / temp) for v in rs)
        zt = sum(math.exp(v / temp) for v in rt)
        for a, b in zip(rs, rt):
            pt, ps = math.exp(b / temp) / zt, math.exp(a / temp) / zs
            total += pt * (math.log(pt) - math.log(ps))
    assert hinton_kd_loss(s, t).item() == pytest.approx(total * temp**2 / 5, rel=1e-10)
    assert hinton_kd_loss(s, s).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(hard_fraction=1.0, num_mined_pairs=None),
                                     dict(hard_fraction=0.3, num_mined_pairs=5, pair_filter="negative",
                                          iled_weight=0.5, rpsd_weight=2.0),
                                     dict(pair_filter="positive", num_mined_pairs=3)])
def test_unified_against_loop_oracle(options):
    s, t = make(batch=8, ds=6, seed=4)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2])
    bank, bank_labels = make(batch=5, ds=6, seed=9)[1], torch.tensor([0, 1, 2, 9, 1])
    own = torch.tensor([-1, 3, -1, -1, 0, -1, -1, 4])
    full = dict(hard_fraction=0.5, num_mined_pairs=4096, pair_filter="all", iled_weight=1.0, rpsd_weight=1.0)
    full.update(options)
    expected = oracle_unified(s, t, labels.tolist(), bank, bank_labels.tolist(), own.tolist(), full["hard_fraction"],
                              full["num_mined_pairs"], full["pair_filter"], full["iled_weight"], full["rpsd_weight"])
    got = unified_kd_loss(s, t, labels, bank, bank_labels, own, **options)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # no bank: the batch's own teacher embeddings, own entries excluded
    expected_in_batch = oracle_unified(s, t, labels.tolist(), t, labels.tolist(), list(range(8)), full["hard_fraction"],
                                       full["num_mined_pairs"], full["pair_filter"], full["iled_weight"],
                                       full["rpsd_weight"])
    assert unified_kd_loss(s, t, labels, **options).item() == pytest.approx(expected_in_batch, rel=1e-10)


# every (hard_fraction with two decimals, B <= 256) whose float product hard_fraction * B lies just
# above an integer, so that its ceiling is one more than that of the decimal written (0.07 * 100)
_FLOAT_CEILING_OFF = [(k / 100, b) for k in range(1, 101) for b in range(2, 257)
                      if math.ceil(k / 100 * b) != math.ceil(Fraction(k, 100) * b)]


def test_unified_hard_sample_count_reads_the_decimal_written():
    """k = ceil(hard_fraction * B) from the decimal the option was written as (as the FPRs are
    read as exact fractions), not from the float product: 0.07 at B = 100 keeps 7 samples, not 8."""
    assert len(_FLOAT_CEILING_OFF) == 30
    for hard_fraction, batch in _FLOAT_CEILING_OFF:
        s, t = torch.randn(batch, 3), torch.randn(batch, 3)
        got = unified_kd_terms(s, t, torch.arange(batch), hard_fraction=hard_fraction).num_hard_samples
        assert got == math.ceil(Fraction(repr(hard_fraction)) * batch) == math.ceil(hard_fraction * batch) - 1
    s, t = make(batch=25, ds=6, seed=5)
    labels = torch.arange(25) % 4
    options = dict(hard_fraction=0.28, num_mined_pairs=None, pair_filter="all", iled_weight=1.0, rpsd_weight=0.0)
    expected = oracle_unified(s, t, labels.tolist(), t, labels.tolist(), list(range(25)), 0.28, None, "all", 1.0, 0.0)
    assert unified_kd_loss(s, t, labels, **options).item() == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------- gradients


# the losses at their defaults (PWR's default algorithm named), shared by the case lists below
LOSS_CASES = [
    ("sp", lambda s, t: similarity_preserving_loss(s, t)),
    ("sp_gram_rows", lambda s, t: similarity_preserving_loss(s, t, "gram_rows")),
    ("cc", lambda s, t: correlation_congruence_loss(s, t)),
    ("darkrank", lambda s, t: hard_darkrank_loss(s, t)),
    ("fitnet", lambda s, t: fitnet_loss(s, t)),
    ("cosine", lambda s, t: cosine_distill_loss(s, t)),
    ("kd", lambda s, t: hinton_kd_loss(s, t)),
    ("pwr_sorted", lambda s, t: pwr_loss(s, t, algorithm="sorted")),
]

GRADCHECK_CASES = LOSS_CASES + [
    ("pwr_couples", lambda s, t: pwr_loss(s, t, chunk=4, algorithm="couples")),
    ("pwr_ranknet", lambda s, t: pwr_loss(s, t, loss_type="ranknet", score="cosine")),
    ("pwr_diff_power", lambda s, t: pwr_loss(s, t, loss_type="diff_power", margin="teacher_std", power=2.0)),
    ("unified", lambda s, t: unified_kd_loss(s, t, torch.tensor([0, 1, 0, 1, 2, 2]), num_mined_pairs=7)),
]


@pytest.mark.parametrize("name,fn", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(name, fn):
    s, t = make(batch=6, ds=4, seed=11)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,), eps=1e-6, atol=1e-6, rtol=1e-4)


MODULES = [
    (SimilarityPreservingLoss(), similarity_preserving_loss),
    (CorrelationCongruenceLoss(), correlation_congruence_loss),
    (HardDarkRankLoss(), hard_darkrank_loss),
    (FitNetLoss(), fitnet_loss),
    (CosineDistillLoss(), cosine_distill_loss),
    (HintonKDLoss(), hinton_kd_loss),
    (PWRLoss(), pwr_loss),
]


@pytest.mark.parametrize("module,fn", MODULES, ids=[type(m).__name__ for m, _ in MODULES])
def test_module_matches_function_and_teacher_gets_no_gradient(module, fn):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(10, 6, generator=g, requires_grad=True)
    teacher = torch.randn(10, 6, generator=g, requires_grad=True)
    loss = module(student, teacher)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and torch.isfinite(student.grad).all()
    assert loss.item() == fn(student, teacher).item()
    assert loss.dtype == torch.float32 and loss.dim() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("module,fn", MODULES, ids=[type(m).__name__ for m, _ in MODULES])
def test_half_inputs_compute_in_fp32(module, fn, dtype):
    s, t = make(batch=8, ds=6, seed=1, dtype=torch.float32)
    half = s.to(dtype).requires_grad_(True)
    loss = fn(half, t.to(dtype))
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == dtype
    assert loss.item() == pytest.approx(fn(s.to(dtype).float(), t.to(dtype).float()).item(), rel=1e-6)


# ----------------------------------------------------------------------------- unified: the memory bank


def test_unified_bank_is_a_fifo_buffer():
    crit = UnifiedKDLoss(dim=4, bank_size=5, num_mined_pairs=None)
    s, t = make(batch=3, ds=4, seed=0, dtype=torch.float32)
    labels = torch.tensor([7, 8, 9])
    crit(s, t, labels)
    assert int(crit.bank_count) == 3 and int(crit.bank_pointer) == 3
    assert crit.bank_labels.tolist() == [7, 8, 9, -1, -1]
    torch.testing.assert_close(crit.bank_embeddings[:3], torch.nn.functional.normalize(t))
    # the first call (bank = this batch, own entries excluded) equals the in-batch functional form
    assert crit.last_terms.loss.item() == pytest.approx(unified_kd_loss(s, t, labels, num_mined_pairs=None).item(),
                                                        rel=1e-6)
    crit(s, t, torch.tensor([1, 2, 3]))
    assert int(crit.bank_count) == 5 and int(crit.bank_pointer) == 1
    assert crit.bank_labels.tolist() == [3, 8, 9, 1, 2]
    state = {k: v.clone() for k, v in crit.state_dict().items()}
    assert set(state) == {"bank_embeddings", "bank_labels", "bank_count", "bank_pointer"}
    crit.eval()
    crit(s, t, labels)                 # eval: read, not written
    for k, v in crit.state_dict().items():
        assert torch.equal(v, state[k])
    fresh = UnifiedKDLoss(dim=4, bank_size=5)
    fresh.load_state_dict(state)
    assert fresh.bank_labels.tolist() == [3, 8, 9, 1, 2]


def test_unified_reset_parameters_empties_the_bank_in_place():
    """reset_parameters (what FSDP calls after to_empty materialises a meta-built module) gives a
    new module's empty bank, in place, from uninitialised buffers or a filled bank alike."""
    with torch.device("meta"):
        crit = UnifiedKDLoss(dim=4, bank_size=5, num_mined_pairs=None)
    crit = crit.to_empty(device="cpu")
    for buffer in crit.buffers():
        buffer.fill_(3)  # what to_empty may leave (its memory is not zeroed)
    pointers = [buffer.data_ptr() for buffer in crit.buffers()]
    crit.reset_parameters()
    assert [buffer.data_ptr() for buffer in crit.buffers()] == pointers
    fresh = UnifiedKDLoss(dim=4, bank_size=5, num_mined_pairs=None)
    for name, value in fresh.state_dict().items():
        assert torch.equal(crit.state_dict()[name], value), name
    s, t = make(batch=3, ds=4, seed=0, dtype=torch.float32)
    labels = torch.tensor([7, 8, 9])
    assert torch.equal(crit(s, t, labels), fresh(s, t, labels))
    crit.reset_parameters()  # a filled bank too
    assert crit.last_terms is None
    for name, value in UnifiedKDLoss(dim=4, bank_size=5).state_dict().items():
        assert torch.equal(crit.state_dict()[name], value), name


def test_unified_enqueue_after_uses_older_entries_only():
    crit = UnifiedKDLoss(dim=4, bank_size=8, enqueue="after", num_mined_pairs=None)
    s, t = make(batch=3, ds=4, seed=0, dtype=torch.float32)
    labels = torch.tensor([0, 1, 2])
    first = crit(s, t, labels)         # empty bank: RPSD is 0, ILED only
    assert crit.last_terms.rpsd.item() == 0.0 and crit.last_terms.num_mined_pairs == 0
    assert first.item() == pytest.approx(crit.last_terms.iled.item())
    crit(s, t, labels)
    assert crit.last_terms.num_mined_pairs == 9   # 3 samples x 3 older entries, none excluded


def test_unified_terms_are_reported():
    s, t = make(batch=6, ds=4, seed=2)
    res = unified_kd_terms(s, t, torch.arange(6), hard_fraction=0.5, num_mined_pairs=4)
    assert res.num_hard_samples == 3 and res.num_mined_pairs == 4
    assert res.loss.item() == pytest.approx(res.iled.item() + res.rpsd.item())


def test_unified_last_terms_are_detached_and_a_model_holding_it_deep_copies():
    """last_terms held the loss with its graph (only the terms were detached, as documented for
    all of it): a model holding the loss failed copy.deepcopy after a training step (an
    EMA-of-weights copy), with torch's "graph leaves" error that named no loss."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(dict(backbone=torch.nn.Linear(12, 8), kd=UnifiedKDLoss(8, bank_size=40)))
    x, t, y = torch.randn(24, 12), torch.randn(24, 8), torch.randint(0, 6, (24,))
    loss = model["kd"](model["backbone"](x), t, y)
    loss.backward()
    assert model["kd"].last_terms.loss.grad_fn is None and model["kd"].last_terms.loss == loss.detach()
    copied = copy.deepcopy(model)
    assert torch.equal(copied["kd"].bank_embeddings, model["kd"].bank_embeddings)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_unified_own_index_of_any_integer_dtype(dtype):
    """own_index rows of any integer dtype give the int64 result (uint8 and int8 index as values,
    never as a mask; uint8's range check must not read -1 as 255)."""
    s, t = make(batch=6, ds=4, seed=3)
    bank, bank_labels = make(batch=8, ds=4, seed=4)[1], torch.arange(8) + 10
    own = torch.tensor([0, 1, 2, 3, 4, 5])
    want = unified_kd_terms(s, t, torch.arange(6), bank, bank_labels, own, num_mined_pairs=None).loss
    got = unified_kd_terms(s, t, torch.arange(6), bank, bank_labels, own.to(dtype), num_mined_pairs=None).loss
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("pair_filter", ["all", "positive", "negative"])
def test_unified_unsigned_labels_are_their_values(dtype, pair_filter):
    """uint16/32/64 labels (accepted as integers) give the int64 labels' loss and bank, with a
    filter that compares them to the bank's labels too: that comparison raised torch's "Promotion
    for uint16, uint32, uint64 types is not supported" after the batch was already in the bank.
    Values past int32 stay values (the bank keeps labels across batches: they compare by value)."""
    s, t = make(batch=8, ds=4, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3_000_000_000 if dtype != torch.uint16 else 60_000, 5])
    results = []
    for given in (labels, labels.to(dtype)):
        crit = UnifiedKDLoss(4, bank_size=16, pair_filter=pair_filter, num_mined_pairs=None)
        losses = [crit(s, t, given), crit(t, s, given)]
        results.append((losses, crit.bank_labels.clone(), int(crit.bank_count)))
        functional = unified_kd_terms(s, t, given, crit.bank_embeddings, crit.bank_labels.to(given.dtype),
                                      num_mined_pairs=None, pair_filter=pair_filter).loss
        results[-1] += (functional,)
    (want, want_bank, want_count, want_f), (got, got_bank, got_count, got_f) = results
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(got_bank, want_bank) and got_count == want_count == 16
    assert torch.equal(got_f, want_f)


# ----------------------------------------------------------------------------- bad input


TWO_EMBEDDING_FUNCTIONS = [similarity_preserving_loss, correlation_congruence_loss, hard_darkrank_loss, fitnet_loss,
                           cosine_distill_loss, pwr_loss]


@pytest.mark.parametrize("fn", TWO_EMBEDDING_FUNCTIONS, ids=lambda f: f.__name__)
def test_bad_embeddings(fn):
    with pytest.raises(ValueError, match="same number of rows"):
        fn(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(5), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="float"):
        fn(torch.ones(5, 3, dtype=torch.int64), torch.randn(5, 3))
    with pytest.raises(ValueError, match="torch.Tensor"):
        fn([[1.0, 2.0]], torch.randn(1, 2))


@pytest.mark.parametrize("fn", [fitnet_loss, cosine_distill_loss], ids=lambda f: f.__name__)
def test_coordinate_losses_need_equal_widths(fn):
    with pytest.raises(ValueError, match="widths must match"):
        fn(torch.randn(5, 3), torch.randn(5, 4))


def test_hinton_kd_takes_its_own_keyword_names():
    """hinton_kd_loss(student_logits=..., teacher_logits=...), its signature's names: the autocast
    wrapper took (student, teacher, ...) and refused them (a TypeError)."""
    s, t = make(batch=4, ds=10, seed=1, dtype=torch.float32)
    want = hinton_kd_loss(s, t, 2.0)
    assert torch.equal(hinton_kd_loss(student_logits=s, teacher_logits=t, temperature=2.0), want)
    assert torch.equal(hinton_kd_loss(s, teacher_logits=t, temperature=2.0), want)


@pytest.mark.parametrize("make_loss", [lambda t: HintonKDLoss(temperature=t),
                                       lambda t: hinton_kd_loss(torch.randn(3, 5), torch.randn(3, 5), temperature=t)],
                         ids=["module", "function"])
@pytest.mark.parametrize("temperature", [1e200, 1e-200, 1e19, 1e-19])
def test_hinton_kd_temperature_range(make_loss, temperature):
    """Temperatures whose square or reciprocal leave fp32's normal range are refused by name:
    1e200 raised an OverflowError from T ** 2, 1e-200 gave a NaN loss for finite logits."""
    with pytest.raises(ValueError, match=r"temperature must lie in \[1e-18, 1e\+18\]"):
        make_loss(temperature)
    for edge in (1e-18, 1e18):  # the range's ends work
        assert torch.isfinite(hinton_kd_loss(torch.randn(3, 5), torch.randn(3, 5), temperature=edge))


def test_bad_options():
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="normalize"):
        similarity_preserving_loss(s, t, normalize="rows")
    with pytest.raises(ValueError, match="order"):
        correlation_congruence_loss(s, t, order=-1)
    with pytest.raises(ValueError, match="order must be an integer >= 1, got 0: .* the loss would be 0"):
        correlation_congruence_loss(s, t, order=0)  # (a constant correlation: a silent no-op)
    with pytest.raises(ValueError, match="order must be an integer >= 1, got 0"):
        CorrelationCongruenceLoss(order=0)
    with pytest.raises(ValueError, match="gamma"):
        correlation_congruence_loss(s, t, gamma=0.0)
    with pytest.raises(ValueError, match="more than list_length"):
        hard_darkrank_loss(s[:3], t[:3])
    with pytest.raises(ValueError, match="score"):
        pwr_loss(s, t, score="dot")
    with pytest.raises(ValueError, match="loss_type"):
        PWRLoss(loss_type="hinge")
    with pytest.raises(ValueError, match="margin"):
        pwr_loss(s, t, margin="mean")
    with pytest.raises(ValueError, match="beta"):
        pwr_loss(s, t, beta=0)
    with pytest.raises(ValueError, match="algorithm"):
        pwr_loss(s, t, algorithm="fast")
    with pytest.raises(ValueError, match="teacher_diff"):
        pwr_loss(s, t, loss_type="ranknet", algorithm="sorted")
    for chunk in (0, True, 2.0):  # (True passed as 1)
        with pytest.raises(ValueError, match="chunk must be a positive integer"):
            pwr_loss(s, t, chunk=chunk, algorithm="couples")
    with pytest.raises(ValueError, match="temperature"):
        hinton_kd_loss(s, t, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        hinton_kd_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="2-D"):
        hinton_kd_loss(torch.randn(4), torch.randn(4))
    labels = torch.arange(6)
    with pytest.raises(ValueError, match="hard_fraction"):
        unified_kd_loss(s, t, labels, hard_fraction=0)
    with pytest.raises(ValueError, match="num_mined_pairs"):
        unified_kd_loss(s, t, labels, num_mined_pairs=0)
    with pytest.raises(ValueError, match="pair_filter"):
        unified_kd_loss(s, t, labels, pair_filter="hard")
    with pytest.raises(ValueError, match="labels"):
        unified_kd_loss(s, t, labels.float())
    with pytest.raises(ValueError, match="widths must match"):
        unified_kd_loss(s, torch.randn(6, 5), labels)
    with pytest.raises(ValueError, match="bank_embeddings"):
        unified_kd_loss(s, t, labels, torch.randn(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match="bank_labels"):
        unified_kd_loss(s, t, labels, torch.randn(3, 4), torch.arange(2))
    with pytest.raises(ValueError, match="own_index"):
        unified_kd_loss(s, t, labels, torch.randn(3, 4), torch.arange(3), torch.tensor([0, 1, 2, 3, -1, -1]))
    with pytest.raises(ValueError, match="built for width"):
        UnifiedKDLoss(dim=8)(s, t, labels)
    with pytest.raises(ValueError, match="bank_size"):
        UnifiedKDLoss(dim=4, bank_size=0)
    with pytest.raises(ValueError, match="enqueue"):
        UnifiedKDLoss(dim=4, enqueue="never")


def oracle_cc_recurrence(s, t, gamma, order):
    """oracle_cc with the coefficients by c_p = c_{p-1} 2 gamma / p (no p! or (2 gamma)^p to overflow)."""
    coefficients = [math.exp(-2 * gamma)]
    for p in range(1, order + 1):
        coefficients.append(coefficients[-1] * 2 * gamma / p)
    s, t = rows(s), rows(t)
    b = len(s)

    def c(x, i, j):
        a = cos(x[i], x[j])
        return sum(w * a**p for p, w in enumerate(coefficients))

    return sum((c(s, i, j) - c(t, i, j)) ** 2 for i in range(b) for j in range(b)) / b**2


def test_cc_takes_any_order_and_gamma():
    """The Taylor coefficient exp(-2 gamma) (2 gamma)^p / p! is at most 1, though p! passes the
    largest double at p = 171 and (2 gamma)^p sooner for a large gamma (an OverflowError before):
    any order from 1 and any gamma give the loss, and every order that computed before gives the
    same bits (order 0 is refused: test_bad_options)."""
    s, t = make(batch=5, ds=4, seed=3)
    assert torch.equal(correlation_congruence_loss(s, t, order=171), correlation_congruence_loss(s, t, order=170))
    assert torch.isfinite(CorrelationCongruenceLoss(order=400)(s, t))
    assert correlation_congruence_loss(s, t, gamma=1e200, order=2).item() == 0.0  # exp(-2 gamma) = 0
    assert correlation_congruence_loss(s, t, gamma=1e308, order=2).item() == 0.0  # (2 gamma is inf there)
    # a large gamma puts the weight near p = 2 gamma: close rows keep cos^p far from 0 there
    base = torch.randn(1, 4, dtype=torch.float64)
    s, t = base + 0.05 * make(batch=5, ds=4, seed=6)[0], base + 0.05 * make(batch=5, ds=4, seed=7)[1]
    expected = oracle_cc_recurrence(s, t, 50.0, 400)
    assert expected > 1e-6
    assert correlation_congruence_loss(s, t, gamma=50.0, order=400).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("fn", TWO_EMBEDDING_FUNCTIONS + [unified_kd_loss], ids=lambda f: f.__name__)
def test_batch_of_one_names_the_loss(fn):
    """B = 1 is refused naming the loss that refused it, not EKD."""
    args = (torch.randn(1, 3), torch.randn(1, 3)) + ((torch.zeros(1, dtype=torch.long),) if fn is unified_kd_loss
                                                     else ())
    with pytest.raises(ValueError, match="at least 2") as info:
        fn(*args)
    assert fn.__name__ in str(info.value) and "EKD" not in str(info.value)
    with pytest.raises(ValueError, match="UnifiedKDLoss needs a batch of at least 2"):
        UnifiedKDLoss(dim=3)(*args[:2], torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------- non-finite input

_LABELS8 = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2])

# every loss of ekd_kernels.losses (each PWR variant, both algorithms of the default one), and
# the module forms with state
NON_FINITE_CASES = LOSS_CASES + [
    ("pwr_couples", lambda s, t: pwr_loss(s, t, algorithm="couples")),
    ("pwr_cosine_std", lambda s, t: pwr_loss(s, t, score="cosine", margin="teacher_std")),
    ("pwr_ranknet", lambda s, t: pwr_loss(s, t, loss_type="ranknet")),
    ("pwr_diff_power_const", lambda s, t: pwr_loss(s, t, loss_type="diff_power", margin="const", margin_value=0.1)),
    ("unified", lambda s, t: unified_kd_loss(s, t, _LABELS8)),
    ("unified_mined", lambda s, t: unified_kd_loss(s, t, _LABELS8, hard_fraction=0.2, num_mined_pairs=2,
                                                   pair_filter="negative")),
    ("unified_bank", lambda s, t: unified_kd_loss(s, t, _LABELS8, torch.randn(5, 5, dtype=s.dtype),
                                                  torch.arange(5))),
    ("UnifiedKDLoss", lambda s, t: UnifiedKDLoss(dim=5, bank_size=16).to(s.dtype)(s, t, _LABELS8)),
    ("UnifiedKDLoss_after", lambda s, t: UnifiedKDLoss(dim=5, bank_size=16, enqueue="after")(s, t, _LABELS8)),
] + [(type(m).__name__, m) for m, _ in MODULES]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("name,fn", NON_FINITE_CASES, ids=[c[0] for c in NON_FINITE_CASES])
def test_non_finite_input_gives_nan(name, fn, where, value):
    """A NaN or infinite student or teacher value gives a NaN loss (no variant drops it through a
    mask, a sort or a clamp: PWR's two algorithms agree) and a NaN in the student's gradient, so
    that a gradient scaler skips the step."""
    for dtype, row in ((torch.float64, 0), (torch.float32, 5)):
        s, t = make(batch=8, ds=5, seed=12, dtype=dtype)
        (s if where == "student" else t)[row, 2] = value
        s.requires_grad_(True)
        loss = fn(s, t)
        assert torch.isnan(loss), (name, where, value, loss)
        loss.backward()
        assert torch.isnan(s.grad).any()


def test_finite_input_is_unchanged_by_the_non_finite_rule():
    """The rule multiplies a finite batch's loss by exactly 1: same value and gradient bits as
    the plain formula (FitNet: the mean squared difference)."""
    s, t = make(batch=8, ds=5, seed=13)
    s.requires_grad_(True)
    loss = fitnet_loss(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    x = s.detach().clone().requires_grad_(True)
    plain = (x - t).pow(2).mean()
    plain.backward()
    assert loss.item() == plain.item() and torch.equal(grad, x.grad)


@pytest.mark.parametrize("enqueue", ["before", "after"])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_unified_non_finite_batch_does_not_poison_the_bank(enqueue, where, value):
    """A non-finite batch returns NaN (loss and terms) and is not written into the bank: pointer,
    count and rows stay, and the next clean batches give what they give without it."""
    g = torch.Generator().manual_seed(14)

    def batch():
        return (torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g),
                torch.randint(0, 4, (8,), generator=g))

    clean = [batch() for _ in range(5)]
    bad_s, bad_t, bad_labels = batch()
    (bad_s if where == "student" else bad_t)[3, 1] = value
    hit = UnifiedKDLoss(dim=5, bank_size=20, enqueue=enqueue)
    spared = UnifiedKDLoss(dim=5, bank_size=20, enqueue=enqueue)
    for b in clean[:2]:
        hit(*b), spared(*b)
    state = {k: v.clone() for k, v in hit.state_dict().items()}
    loss = hit(bad_s, bad_t, bad_labels)
    assert torch.isnan(loss)
    assert torch.isnan(hit.last_terms.iled) and torch.isnan(hit.last_terms.rpsd)
    for k, v in hit.state_dict().items():
        assert torch.equal(v, state[k]), k
    for b in clean[2:]:
        got, expected = hit(*b), spared(*b)
        assert torch.isfinite(got) and got.item() == expected.item()
    for k, v in hit.state_dict().items():
        assert torch.equal(v, spared.state_dict()[k]), k


# ----------------------------------------------------------------------------- autocast, option types, state checks
from ekd_kernels.rkd import RKDLoss, rkd_loss  # noqa: E402
from ekd_kernels.rkd_fast import FastRKDLoss, fast_rkd_loss  # noqa: E402

AUTOCAST_CASES = [
    ("sp", similarity_preserving_loss), ("cc", correlation_congruence_loss), ("darkrank", hard_darkrank_loss),
    ("fitnet", fitnet_loss), ("cosine", cosine_distill_loss), ("pwr", pwr_loss), ("hinton", hinton_kd_loss),
    ("unified", lambda s, t: unified_kd_loss(s, t, torch.arange(s.shape[0], device=s.device) % 7)),
    ("rkd", rkd_loss), ("fast_rkd_op", fast_rkd_loss),
    ("fast_rkd_torch", lambda s, t: fast_rkd_loss(s, t, backend="torch")),
]


@pytest.mark.parametrize("name,fn", AUTOCAST_CASES, ids=[c[0] for c in AUTOCAST_CASES])
def test_autocast_changes_nothing(name, fn):
    """Called inside torch.autocast (an AMP training step), every loss computes as outside it:
    fp32 loss and gradient, bitwise (before: the Gram matrices ran in bf16, the gradient off by
    up to 1.6e-1 relative; the fast RKD op's own matmul too)."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g)
    results = []
    for enabled in (False, True):
        x = student.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = fn(x, teacher)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert results[1][0].dtype == torch.float32
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


CUDA_REASON = None if torch.cuda.is_available() else "no CUDA device: the losses' CUDA path is not run"
OTHER_DEVICE = "cuda"  # (pointed at "cpu" by hand, the CUDA tests below run their own logic here)


def _step(fn, student, teacher, device, autocast=False):
    """fn on copies of the inputs on `device` (inside torch.autocast there, bf16, when asked):
    the loss and the student's gradient, back on the CPU."""
    x = student.to(device).clone().requires_grad_(True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, teacher.to(device))
    loss.backward()
    return loss.detach().cpu(), x.grad.cpu()


@contextlib.contextmanager
def _full_fp32_matmuls():
    """fp32 products without TF32 on CUDA while comparing with the CPU (the user's setting restored)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
@pytest.mark.parametrize("name,fn", AUTOCAST_CASES, ids=[c[0] for c in AUTOCAST_CASES])
def test_cuda_matches_cpu_and_ignores_autocast(name, fn):
    """Every loss on CUDA tensors gives the CPU's loss and gradient (fp32 both; other kernels, so
    close rather than bitwise), and inside torch.autocast("cuda", bf16), as an AMP step calls
    it, bitwise what it gives outside."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g)
    with _full_fp32_matmuls():
        cpu_loss, cpu_grad = _step(fn, student, teacher, "cpu")
        loss, grad = _step(fn, student, teacher, OTHER_DEVICE)
        amp_loss, amp_grad = _step(fn, student, teacher, OTHER_DEVICE, autocast=True)
    assert_loss_close(loss, cpu_loss, 1e-5)
    assert_grad_close(grad, cpu_grad)
    assert amp_loss.dtype == torch.float32
    assert torch.equal(amp_loss, loss) and torch.equal(amp_grad, grad)


@pytest.mark.skipif(CUDA_REASON is not None, reason=str(CUDA_REASON))
def test_unified_module_on_cuda_matches_cpu():
    """UnifiedKDLoss moved to CUDA with its bank: the CPU module's losses, gradients and bank over
    consecutive calls that fill and wrap the bank, then a round trip of its state_dict."""
    g = torch.Generator().manual_seed(5)
    on_cpu, moved = UnifiedKDLoss(dim=8, bank_size=20), UnifiedKDLoss(dim=8, bank_size=20).to(OTHER_DEVICE)
    with _full_fp32_matmuls():
        for step in range(4):
            student, teacher = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
            labels = torch.randint(0, 5, (8,), generator=g)
            cpu_loss, cpu_grad = _step(lambda s, t: on_cpu(s, t, labels), student, teacher, "cpu")
            loss, grad = _step(lambda s, t: moved(s, t, labels.to(OTHER_DEVICE)), student, teacher, OTHER_DEVICE)
            assert_loss_close(loss, cpu_loss, 1e-5)
            assert_grad_close(grad, cpu_grad)
    state = moved.state_dict()
    assert all(v.device.type == torch.device(OTHER_DEVICE).type for v in state.values())
    for key, value in on_cpu.state_dict().items():
        torch.testing.assert_close(state[key].cpu(), value, rtol=1e-5, atol=1e-6, msg=key)
    reloaded = UnifiedKDLoss(dim=8, bank_size=20)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded.bank_labels, on_cpu.bank_labels)


@pytest.mark.parametrize("make, match", [
    (lambda: RKDLoss(distance_weight="25"), "distance_weight must be a real number"),
    (lambda: RKDLoss(angle_weight=float("nan")), "angle_weight must be finite"),
    (lambda: RKDLoss(distance_weight=-1), "distance_weight must be a non-negative number"),
    (lambda: FastRKDLoss(distance_weight=None), "distance_weight must be a real number"),
    (lambda: rkd_loss(torch.randn(4, 3), torch.randn(4, 3), angle_weight=True), "angle_weight must be a real"),
    (lambda: fast_rkd_loss(torch.randn(4, 3), torch.randn(4, 3), distance_weight=-2), "non-negative"),
    (lambda: HintonKDLoss(temperature=0), "temperature must be positive"),
    (lambda: HintonKDLoss(temperature="4"), "temperature must be a real number"),
    (lambda: hinton_kd_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=float("inf")), "temperature must be finite"),
    (lambda: CorrelationCongruenceLoss(gamma="a"), "gamma must be a real number"),
    (lambda: CorrelationCongruenceLoss(order=-1), "order must be an integer >= 1"),
    (lambda: CorrelationCongruenceLoss(order=True), "order must be an integer >= 1"),
    (lambda: HardDarkRankLoss(alpha=-3), "alpha must be positive"),
    (lambda: HardDarkRankLoss(beta=0), "beta must be positive"),
    (lambda: HardDarkRankLoss(list_length=0), "list_length must be an integer >= 1"),
    (lambda: hard_darkrank_loss(torch.randn(6, 3), torch.randn(6, 3), alpha=float("nan")), "alpha must be finite"),
    # scores past the compute dtype's range (-inf; a NaN loss for finite embeddings before)
    (lambda: hard_darkrank_loss(torch.randn(6, 3), torch.randn(6, 3), beta=200.0),
     r"beta=200.0 and alpha=3.0 take the scores -alpha \* d\^beta past torch.float32's range .*d\^beta "
     r"reaches 2\^beta"),
    (lambda: hard_darkrank_loss(torch.randn(6, 3), torch.randn(6, 3), alpha=1e39), "past torch.float32's range"),
    (lambda: hard_darkrank_loss(torch.randn(6, 3), torch.randn(6, 3), alpha=1e-10, beta=130.0),
     "past torch.float32's range"),
    (lambda: hard_darkrank_loss(torch.randn(6, 3).double(), torch.randn(6, 3).double(), beta=1100.0),
     "past torch.float64's range"),
    (lambda: PWRLoss(power=True), "power must be a real number"),
    (lambda: PWRLoss(beta=float("inf")), "beta must be finite"),
    (lambda: PWRLoss(margin_value=True), "margin_value must be a real number"),
    (lambda: PWRLoss(chunk=0), "chunk must be a positive integer"),
    (lambda: PWRLoss(chunk=True), "chunk must be a positive integer"),
    (lambda: UnifiedKDLoss(4, hard_fraction=True), "hard_fraction must be a real number"),
    (lambda: UnifiedKDLoss(4, num_mined_pairs=True), "num_mined_pairs .* must be an integer >= 1"),
    (lambda: UnifiedKDLoss(4, iled_weight=-1), "iled_weight must be a non-negative number"),
    (lambda: UnifiedKDLoss(True), "dim .* must be an integer >= 1"),
    (lambda: unified_kd_loss(torch.randn(6, 4), torch.randn(6, 4), torch.arange(6), torch.randn(3, 4), [0, 1, 2]),
     "bank_labels must be a tensor of 3 integer labels"),
    (lambda: unified_kd_loss(torch.randn(6, 4), torch.randn(6, 4), torch.arange(6), torch.randn(3, 4),
                             torch.ones(3, dtype=torch.bool)), "bank_labels must be a tensor of 3 integer labels"),
    (lambda: unified_kd_loss(torch.randn(6, 4), torch.randn(6, 4), torch.arange(6), torch.randn(3, 4),
                             torch.arange(3), [0] * 6), "own_index must be 6 bank rows"),
    # (a bool tensor would index as a mask: an IndexError from deep inside before)
    (lambda: unified_kd_loss(torch.randn(6, 4), torch.randn(6, 4), torch.arange(6), torch.randn(5, 4),
                             torch.arange(5), torch.zeros(6, dtype=torch.bool)),
     r"own_index must be 6 bank rows .*\(torch.bool\)"),
])
def test_option_types_and_values_are_checked(make, match):
    """Options are checked by type and value, naming the option, when the module is built (or the
    function called): no TypeError from deep inside, no silent NaN or reversed ranking."""
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("fn", [rkd_loss, fast_rkd_loss, pwr_loss], ids=lambda f: f.__name__)
def test_meta_inputs_are_refused_by_name(fn):
    with pytest.raises(ValueError, match=f"{fn.__name__} selects by the values .* meta tensors hold none"):
        fn(torch.randn(6, 4, device="meta"), torch.randn(6, 4, device="meta"))


def test_unified_meta_inputs_are_refused_by_name():
    """(before: torch's NotImplementedError from nonzero, deep inside)"""
    s, t, labels = torch.randn(6, 4, device="meta"), torch.randn(6, 4, device="meta"), torch.arange(6, device="meta")
    with pytest.raises(ValueError, match="unified_kd_loss selects by the values .* meta tensors hold none"):
        unified_kd_loss(s, t, labels)
    with pytest.raises(ValueError, match="UnifiedKDLoss selects by the values .* meta tensors hold none"):
        UnifiedKDLoss(4).to("meta")(s, t, labels)


def test_hinton_refuses_sparse_logits():
    with pytest.raises(ValueError, match="student_logits must be a dense .strided. tensor"):
        hinton_kd_loss(torch.randn(4, 5).to_sparse(), torch.randn(4, 5))


def test_unified_refuses_activation_checkpointing():
    """Recomputed under checkpoint, a training-mode call would write its batch into the bank twice
    (and read another bank): refused, as EKDLoss refuses it."""
    from torch.utils.checkpoint import checkpoint

    crit, layer = UnifiedKDLoss(8, bank_size=40), torch.nn.Linear(8, 8)
    x, teacher, labels = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3
    loss = checkpoint(lambda a: crit(layer(a), teacher, labels), x, use_reentrant=False)
    with pytest.raises(RuntimeError, match="UnifiedKDLoss ran in training mode inside a backward pass"):
        loss.backward()
    crit.eval()  # eval mode writes nothing: checkpointing is fine there
    checkpoint(lambda a: crit(layer(a), teacher, labels), x, use_reentrant=False).backward()


@pytest.mark.parametrize("enqueue", ["before", "after"])
def test_unified_compiled_refuses_activation_checkpointing(enqueue):
    """The same under torch.compile, both checkpoint kinds.  Before, the refusal was a Python test
    that ran only while tracing: the recomputation wrote the batch into the bank a second time
    and the backward took its gradient.  The forward now reads the ring's pointer and count
    through an op that checks at run time, and every write depends on what it read."""
    from torch.utils.checkpoint import checkpoint

    x, teacher, labels = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3
    first = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3  # (a bank to read)
    eager = UnifiedKDLoss(8, bank_size=40, enqueue=enqueue)
    eager(*first)
    want = eager(x, teacher, labels)
    for reentrant in (False, True):
        crit = UnifiedKDLoss(8, bank_size=40, enqueue=enqueue)
        crit(*first)
        compiled = torch.compile(crit, backend="aot_eager")
        leaf = x.clone().requires_grad_()
        loss = checkpoint(compiled, leaf, teacher, labels, use_reentrant=reentrant)
        assert torch.equal(loss, want)
        with pytest.raises(RuntimeError, match="UnifiedKDLoss ran in training mode inside a backward pass"):
            loss.backward()
        for name, buffer in eager.named_buffers():  # one write of the batch, not two
            assert torch.equal(getattr(crit, name), buffer), name
    # outside a checkpoint the compiled module trains as the eager one
    crit, eager = UnifiedKDLoss(8, bank_size=10, enqueue=enqueue), UnifiedKDLoss(8, bank_size=10, enqueue=enqueue)
    compiled = torch.compile(crit, backend="aot_eager")
    for step in range(3):  # (the third call wraps the ring)
        s, t, y = torch.randn(4, 8), torch.randn(4, 8), torch.arange(4) % 2
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        compiled(a, t, y).backward()
        eager(b, t, y).backward()
        assert torch.equal(a.grad, b.grad), step
        for name, buffer in eager.named_buffers():
            assert torch.equal(getattr(crit, name), buffer), (step, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unified_16_bit_cast_keeps_an_fp32_bank(dtype):
    crit = UnifiedKDLoss(8, bank_size=40).to(dtype)
    assert crit.bank_embeddings.dtype == torch.float32
    s, t = torch.randn(6, 8).to(dtype), torch.randn(6, 8).to(dtype)
    loss = crit(s.requires_grad_(True), t, torch.arange(6) % 3)
    loss.backward()
    assert int(crit.bank_count) == 6 and torch.isfinite(loss)
    assert crit.double().bank_embeddings.dtype == torch.float64  # other casts apply as usual


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unified_assigned_16_bit_bank_stays_in_fp32(dtype):
    """load_state_dict(assign=True) of a bank saved in 16 bits keeps the module's fp32 bank (the
    rows widen exactly), as a copying load does."""
    saved = UnifiedKDLoss(8, bank_size=40)
    saved(torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3)
    state = {k: v.to(dtype) if k == "bank_embeddings" else v for k, v in saved.state_dict().items()}
    assigned, copied = UnifiedKDLoss(8, bank_size=40), UnifiedKDLoss(8, bank_size=40)
    assigned.load_state_dict(state, assign=True)
    copied.load_state_dict(state)
    assert assigned.bank_embeddings.dtype == torch.float32
    assert torch.equal(assigned.bank_embeddings, copied.bank_embeddings)


@pytest.mark.parametrize("change, match", [
    (dict(bank_count=torch.tensor(999)), "bank_count in the checkpoint is 999, outside"),
    (dict(bank_count=torch.tensor(-3)), "bank_count in the checkpoint is -3, outside"),
    (dict(bank_pointer=torch.tensor(-5)), "bank_pointer in the checkpoint is -5, outside"),
    (dict(bank_pointer=torch.tensor(40)), "bank_pointer in the checkpoint is 40, outside"),
    ("nan_row", "bank_embeddings in the checkpoint are not finite"),
    (dict(bank_labels=torch.full((20,), -1)), r"bank_labels in the checkpoint has shape \(20,\), but this "
                                              r"UnifiedKDLoss's has shape \(40,\)"),
    (dict(bank_embeddings=torch.zeros(40, 4)), r"bank_embeddings in the checkpoint has shape \(40, 4\)"),
    (dict(bank_count=torch.tensor([1, 2])), r"bank_count in the checkpoint has shape \(2,\)"),
    (dict(bank_embeddings=torch.zeros(40, 8, dtype=torch.int64)),
     "bank_embeddings in the checkpoint is torch.int64, but this UnifiedKDLoss holds floating values"),
    (dict(bank_labels=torch.zeros(40)), "bank_labels in the checkpoint is torch.float32, but this UnifiedKDLoss "
                                        "holds integer values"),
    (dict(bank_pointer=torch.tensor(True)), "bank_pointer in the checkpoint is torch.bool"),
    # while the bank fills the pointer equals the count (here 6): past it a later call's own_index
    # left the bank, before it never-written zero rows were read
    (dict(bank_pointer=torch.tensor(9)), "bank_count 6 and bank_pointer 9 in the checkpoint: while the bank fills"),
    (dict(bank_pointer=torch.tensor(1)), "bank_count 6 and bank_pointer 1 in the checkpoint: while the bank fills"),
    (dict(bank_count=torch.tensor(3)), "bank_count 3 and bank_pointer 6 in the checkpoint: while the bank fills"),
])
def test_unified_refuses_a_ring_state_it_cannot_hold(change, match):
    source = UnifiedKDLoss(8, bank_size=40)
    source(torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if change == "nan_row":
        state["bank_embeddings"][2, 0] = float("nan")
    else:
        state.update(change)
    target = UnifiedKDLoss(8, bank_size=40)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing copied
    target.load_state_dict({k: v.clone() for k, v in source.state_dict().items()})  # a good one loads


def test_unified_loads_every_ring_state_it_reaches():
    """A full bank takes any pointer; a filling one the pointer equal to its count (also when a
    non-strict load brings only the count, against the module's own pointer)."""
    for count, pointer in [(40, 0), (40, 17), (40, 39), (0, 0), (39, 39)]:
        target = UnifiedKDLoss(8, bank_size=40)
        state = dict(target.state_dict(), bank_count=torch.tensor(count), bank_pointer=torch.tensor(pointer))
        target.load_state_dict(state)
        target(torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3)
        assert int(target.bank_pointer) == (pointer + 6) % 40 and int(target.bank_count) == min(count + 6, 40)
    target = UnifiedKDLoss(8, bank_size=40)
    with pytest.raises(RuntimeError, match="bank_count 5 and bank_pointer 0 in the checkpoint"):
        target.load_state_dict({"bank_count": torch.tensor(5)}, strict=False)
    target.load_state_dict({"bank_count": torch.tensor(40)}, strict=False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_unified_assigned_narrow_integer_ring_state_is_int64(dtype):
    """load_state_dict(assign=True) of count, pointer and labels saved as narrower integers gives
    them back as int64 (exact), as a copying load does: the next training step writes int64 labels
    into the bank (before: "Index put requires the source and destination dtypes match")."""
    saved = UnifiedKDLoss(8, bank_size=40)
    saved(torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3)
    state = {k: v if v.is_floating_point() else v.to(dtype) for k, v in saved.state_dict().items()}
    assigned, copied = UnifiedKDLoss(8, bank_size=40), UnifiedKDLoss(8, bank_size=40)
    assigned.load_state_dict(state, assign=True)
    copied.load_state_dict(state)
    for name in ("bank_labels", "bank_count", "bank_pointer"):
        assert getattr(assigned, name).dtype == torch.int64
    batch = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6) % 3
    assert torch.equal(assigned(*batch), copied(*batch))
    assert all(torch.equal(v, copied.state_dict()[k]) for k, v in assigned.state_dict().items())
