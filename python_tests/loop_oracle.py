"""An independent, plain-Python float64 implementation of SPEC.md for small hand-checkable cases.

It shares no code with ekd_kernels: lists, loops and math.exp only, so that a mistake in the
reference's tensor code cannot hide behind the same mistake here.
"""

import math
from fractions import Fraction


def _normalise(row):
    norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
    return [v / norm for v in row]


def _dot(x, y):
    return sum(p * q for p, q in zip(x, y))


def _sigmoid(x, tau):
    return 1.0 / (1.0 + math.exp(min(max(-x / tau, -50.0), 50.0)))


def oracle(student, teacher, labels, student_thresholds, teacher_thresholds, *, fprs, temperature=0.01,
           num_hard_negatives=2000, momentum=0.01, positive_weight=0.02, negative_weight=0.01,
           critical_only=False, rank_loss="soft_rank", update=True, selected_negatives=None):
    """Returns dict(loss, student_thresholds, teacher_thresholds, num_critical_selected, ...).

    student/teacher: lists of rows; labels: list of ints; thresholds: lists of floats.
    selected_negatives: optional explicit indices (into the row-major negative list) to distil
    instead of the hardest N (the random-selection variant).
    """
    s = [_normalise(r) for r in student]
    t = [_normalise(r) for r in teacher]
    pos, neg = [], []
    for i in range(len(s)):
        for j in range(i + 1, len(s)):
            pair = (_dot(s[i], s[j]), _dot(t[i], t[j]))
            (pos if labels[i] == labels[j] else neg).append(pair)
    st, tt = list(student_thresholds), list(teacher_thresholds)
    batch_s = batch_t = None
    if neg:
        sorted_a = sorted((p[0] for p in neg), reverse=True)
        sorted_b = sorted((p[1] for p in neg), reverse=True)
        index = [int(Fraction(f).limit_denominator(10**12) * len(neg)) for f in fprs]
        batch_s = [sorted_a[m] for m in index]
        batch_t = [sorted_b[m] for m in index]
        if update:
            st = [momentum * e + (1 - momentum) * old for e, old in zip(batch_s, st)]
            tt = [momentum * e + (1 - momentum) * old for e, old in zip(batch_t, tt)]

    if selected_negatives is None:
        order = sorted(range(len(neg)), key=lambda k: -neg[k][0])
        selected_negatives = order[:num_hard_negatives]
    chosen = [neg[k] for k in selected_negatives]

    def critical(a, b):
        return any((b > tk) != (a > sk) for sk, tk in zip(st, tt))

    def per_pair(a, b):
        if rank_loss == "soft_rank":
            rs = sum(_sigmoid(a - sk, temperature) for sk in st)
            rt = sum(_sigmoid(b - tk, temperature) for tk in tt)
            return (rs - rt) ** 2
        if rank_loss == "eq7":
            return sum(abs((b - tk) - (a - sk)) for sk, tk in zip(st, tt))
        return (b - a) ** 2

    def term(pairs):
        if critical_only:
            pairs = [p for p in pairs if critical(*p)]
        return sum(per_pair(*p) for p in pairs) / len(pairs) if pairs else 0.0

    positive_term, negative_term = term(pos), term(chosen)
    return dict(
        loss=positive_weight * positive_term + negative_weight * negative_term,
        positive_term=positive_term, negative_term=negative_term,
        student_thresholds=st, teacher_thresholds=tt, batch_student=batch_s, batch_teacher=batch_t,
        num_positive_pairs=len(pos), num_negative_pairs=len(neg), num_selected_negatives=len(chosen),
        num_critical_selected=sum(critical(*p) for p in pos + chosen),
        num_critical_pairs=sum(critical(*p) for p in pos + neg),
    )
