// Op schemas (TORCH_LIBRARY) and the ATen-level stages both devices share.
#include "ekd_common.h"

#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <utility>

// Importing ekd_kernels._C loads this library, which registers the ops; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ekd {

void check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                          const at::Tensor& student_thresholds, const at::Tensor& teacher_thresholds,
                          const c10::optional<at::Tensor>& random_negative_ranks, const ForwardOptions& options) {
  EKD_CHECK(student.dim() == 2 && teacher.dim() == 2, "ekd_forward: student and teacher must be 2-D, got ",
            student.sizes(), " and ", teacher.sizes());
  EKD_CHECK(student.size(0) == teacher.size(0) && student.size(0) >= 2,
            "ekd_forward: student and teacher need the same number (>= 2) of rows, got ", student.size(0), " and ",
            teacher.size(0));
  EKD_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble,
            "ekd_forward: student must be float32 or float64 (the Python wrapper converts), got ",
            student.scalar_type());
  EKD_CHECK(teacher.scalar_type() == student.scalar_type(), "ekd_forward: teacher dtype ", teacher.scalar_type(),
            " differs from student dtype ", student.scalar_type());
  EKD_CHECK(student.size(1) >= 1 && teacher.size(1) >= 1,
            "ekd_forward: student and teacher need at least one column, got ", student.sizes(), " and ",
            teacher.sizes());
  EKD_CHECK(labels.dim() == 1 && labels.size(0) == student.size(0) &&
                at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
            "ekd_forward: labels must be 1-D integers of length B = ", student.size(0), ", got ", labels.sizes(),
            " ", labels.scalar_type());
  const int64_t k = options.num_thresholds();
  EKD_CHECK(int64_t(options.fpr_denominators.size()) == k, "ekd_forward: fpr_numerators and fpr_denominators must "
            "have one entry per FPR, got ", k, " and ", options.fpr_denominators.size());
  EKD_CHECK(k >= 1, "ekd_forward: need K >= 1 FPR fractions");
  for (int64_t i = 0; i < k; ++i) {
    EKD_CHECK(options.fpr_numerators[i] >= 0 && options.fpr_denominators[i] > options.fpr_numerators[i],
              "ekd_forward: FPR fraction ", options.fpr_numerators[i], "/", options.fpr_denominators[i],
              " is not in [0, 1)");
  }
  EKD_CHECK(student_thresholds.dim() == 1 && student_thresholds.size(0) == k && teacher_thresholds.dim() == 1 &&
                teacher_thresholds.size(0) == k && student_thresholds.is_floating_point() &&
                teacher_thresholds.scalar_type() == student_thresholds.scalar_type(),
            "ekd_forward: thresholds must be two floating tensors of K = ", k, " values of one dtype");
  EKD_CHECK(options.rank_loss >= kSoftRank && options.rank_loss <= kEq8, "ekd_forward: unknown rank_loss ",
            options.rank_loss);
  EKD_CHECK(options.num_hard_negatives >= 0, "ekd_forward: num_hard_negatives must be >= 0");
  // As EKDConfig: the kernels divide by the temperature in the compute dtype (fp32 for fp32
  // inputs, where a smaller value is 0 or subnormal: a NaN loss or an infinite gradient), and
  // a momentum outside [0, 1] or a non-finite weight would store a state or loss no call means.
  EKD_CHECK_VALUE(std::isfinite(options.temperature) && options.temperature >= double(FLT_MIN),
                  "ekd_forward: temperature must be a finite number >= ", double(FLT_MIN),
                  " (the smallest normal float32: the loss divides by it in fp32), got ", options.temperature);
  EKD_CHECK_VALUE(std::isfinite(options.momentum) && options.momentum >= 0 && options.momentum <= 1,
                  "ekd_forward: momentum must be a finite number in [0, 1], got ", options.momentum);
  EKD_CHECK_VALUE(std::isfinite(options.positive_weight) && std::isfinite(options.negative_weight),
                  "ekd_forward: positive_weight and negative_weight must be finite, got ", options.positive_weight,
                  " and ", options.negative_weight);
  if (random_negative_ranks.has_value()) {
    const auto& ranks = *random_negative_ranks;
    EKD_CHECK(ranks.dim() == 1 && ranks.scalar_type() == at::kLong &&
                  ranks.size(0) <= max_selected(student.size(0), options.num_hard_negatives),
              "ekd_forward: random_negative_ranks must be 1-D int64 with at most n_max entries");
  }
  for (const at::Tensor* t : {&teacher, &labels, &student_thresholds, &teacher_thresholds}) {
    EKD_CHECK(t->device() == student.device(), "ekd_forward: every tensor must be on ", student.device());
  }
  EKD_CHECK(!random_negative_ranks.has_value() || random_negative_ranks->device() == student.device(),
            "ekd_forward: random_negative_ranks must be on ", student.device(), ", got ",
            random_negative_ranks.has_value() ? random_negative_ranks->device() : student.device());
}

void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                           const at::Tensor& labels, const at::Tensor& student_thresholds,
                           const at::Tensor& teacher_thresholds, const at::Tensor& selected_pairs,
                           const at::Tensor& selected_grads, const at::Tensor& positive_scale, double temperature,
                           int64_t rank_loss) {
  EKD_CHECK(student.dim() == 2, "ekd_backward: student must be 2-D (B x Ds), got shape ", student.sizes());
  EKD_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble,
            "ekd_backward: student must be float32 or float64, got ", student.scalar_type());
  const int64_t batch = student.size(0);
  EKD_CHECK(batch >= 2, "ekd_backward: student needs B >= 2 rows, got shape ", student.sizes());
  EKD_CHECK(teacher.dim() == 2 && teacher.size(0) == batch, "ekd_backward: teacher must be 2-D with B = ", batch,
            " rows (as student), got shape ", teacher.sizes());
  EKD_CHECK(teacher.is_floating_point(), "ekd_backward: teacher must be a floating tensor, got ",
            teacher.scalar_type());
  EKD_CHECK(labels.dim() == 1 && labels.size(0) == batch, "ekd_backward: labels must be 1-D of length B = ", batch,
            ", got shape ", labels.sizes());
  EKD_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
            "ekd_backward: labels must be integers, got ", labels.scalar_type());
  EKD_CHECK(teacher.size(1) >= 1, "ekd_backward: teacher needs at least one column, got shape ", teacher.sizes());
  EKD_CHECK(student_thresholds.dim() == 1 && student_thresholds.size(0) >= 1,
            "ekd_backward: student_thresholds must be 1-D with K >= 1 values, got shape ",
            student_thresholds.sizes());
  EKD_CHECK(teacher_thresholds.dim() == 1 && teacher_thresholds.size(0) == student_thresholds.size(0),
            "ekd_backward: student_thresholds and teacher_thresholds must be 1-D with the same K values (one per "
            "FPR), got shapes ", student_thresholds.sizes(), " and ", teacher_thresholds.sizes());
  EKD_CHECK(student_thresholds.is_floating_point() && teacher_thresholds.is_floating_point(),
            "ekd_backward: student_thresholds and teacher_thresholds must be floating, got ",
            student_thresholds.scalar_type(), " and ", teacher_thresholds.scalar_type());
  const int64_t max_pairs = batch * (batch - 1) / 2;
  EKD_CHECK(selected_pairs.dim() == 2 && selected_pairs.size(1) == 2 && selected_pairs.size(0) <= max_pairs,
            "ekd_backward: selected_pairs must be n x 2 with n <= B(B-1)/2 = ", max_pairs, ", got shape ",
            selected_pairs.sizes());
  EKD_CHECK(selected_pairs.scalar_type() == at::kLong, "ekd_backward: selected_pairs must be int64, got ",
            selected_pairs.scalar_type());
  EKD_CHECK(selected_grads.dim() == 1 && selected_grads.size(0) == selected_pairs.size(0),
            "ekd_backward: selected_grads must be 1-D with one value per row of selected_pairs (",
            selected_pairs.size(0), "), got shape ", selected_grads.sizes());
  EKD_CHECK(selected_grads.is_floating_point(), "ekd_backward: selected_grads must be floating, got ",
            selected_grads.scalar_type());
  EKD_CHECK(grad_loss.numel() == 1 && grad_loss.is_floating_point(),
            "ekd_backward: grad_loss must be one floating value (the gradient of the 0-d loss), got shape ",
            grad_loss.sizes(), " and dtype ", grad_loss.scalar_type());
  EKD_CHECK(positive_scale.numel() == 1 && positive_scale.is_floating_point(),
            "ekd_backward: positive_scale must be one floating value (the forward's 0-d output), got shape ",
            positive_scale.sizes(), " and dtype ", positive_scale.scalar_type());
  EKD_CHECK_VALUE(rank_loss >= kSoftRank && rank_loss <= kEq8, "ekd_backward: unknown rank_loss ", rank_loss,
                  " (expected 0, 1 or 2)");
  EKD_CHECK_VALUE(std::isfinite(temperature) && temperature >= double(FLT_MIN),
                  "ekd_backward: temperature must be a finite number >= ", double(FLT_MIN),
                  " (the smallest normal float32: the gradient divides by it in fp32), got ", temperature);
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"grad_loss", &grad_loss},          {"teacher", &teacher},
      {"labels", &labels},                {"student_thresholds", &student_thresholds},
      {"teacher_thresholds", &teacher_thresholds}, {"selected_pairs", &selected_pairs},
      {"selected_grads", &selected_grads}, {"positive_scale", &positive_scale}};
  for (const auto& [name, t] : named) {
    EKD_CHECK(t->device() == student.device(), "ekd_backward: ", name, " must be on the student's device ",
              student.device(), ", got ", t->device());
  }
}

ForwardOptions make_options(at::IntArrayRef fpr_numerators, at::IntArrayRef fpr_denominators, double temperature,
                            int64_t num_hard_negatives, double momentum, double positive_weight,
                            double negative_weight, bool critical_only, int64_t rank_loss, bool update_thresholds,
                            bool compute_critical_ratio) {
  return ForwardOptions{fpr_numerators.vec(), fpr_denominators.vec(), temperature,     num_hard_negatives,
                        momentum,             positive_weight,        negative_weight, critical_only,
                        rank_loss,            update_thresholds,      compute_critical_ratio};
}

int64_t max_selected(int64_t batch, int64_t num_hard_negatives) {
  return std::min(num_hard_negatives, batch * (batch - 1) / 2);
}

PreparedInputs prepare_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels) {
  PreparedInputs p;
  // Contiguous first: expanded / strided views then give bitwise the same result as copies.
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  // The reference's normalisation, op for op: x / x.norm(dim=1, keepdim=True).clamp_min(eps),
  // whose norm is linalg_vector_norm.  In fp32 a row of magnitude ~1e20 has norm inf, hence a
  // zero row, as in the reference (F.normalize's overflow).
  const at::Tensor s_norm = at::linalg_vector_norm(s, 2, {1}, /*keepdim=*/true);
  p.student_hat = s / s_norm.clamp_min(kNormEps);
  p.student_norms = s_norm.reshape({-1}).contiguous();
  p.teacher_hat = (t / at::linalg_vector_norm(t, 2, {1}, /*keepdim=*/true).clamp_min(kNormEps)).contiguous();
  p.student_hat = p.student_hat.contiguous();

  // Label groups: a stable sort keeps ascending rows inside a group, so pairs (q > p) are i < j.
  p.labels = labels.to(at::kLong).contiguous();
  const auto sorted = at::sort(p.labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_labels = std::get<0>(sorted).contiguous();
  p.order = std::get<1>(sorted).contiguous();
  p.group_start = at::searchsorted(sorted_labels, sorted_labels, /*out_int32=*/false, /*right=*/false).contiguous();
  p.group_end = at::searchsorted(sorted_labels, sorted_labels, /*out_int32=*/false, /*right=*/true).contiguous();
  const int64_t batch = s.size(0);
  const at::Tensor positions = at::arange(batch, p.labels.options());
  p.position = at::empty_like(p.order).scatter_(0, p.order, positions);
  // Each sorted position p opens (group_end[p] - p - 1) positive pairs.
  p.num_positive = (p.group_end - positions - 1).sum();
  return p;
}

at::Tensor ema_update(const at::Tensor& previous, const at::Tensor& batch, double momentum, const at::Tensor& valid) {
  // Same operations as reference.ema_update, so the state matches it bitwise.
  const at::Tensor updated = batch.to(previous.scalar_type()).mul(momentum).add(previous.mul(1.0 - momentum));
  return at::where(valid, updated, previous);
}

at::Tensor all_finite(const at::Tensor& student, const at::Tensor& teacher) {
  return at::logical_and(at::isfinite(student).all(), at::isfinite(teacher).all());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> negatives_by_row(const at::Tensor& selected_pairs,
                                                                 const at::Tensor& selected_grads, int64_t batch) {
  const at::Tensor first = selected_pairs.select(1, 0);
  const at::Tensor second = selected_pairs.select(1, 1);
  at::Tensor rows = at::cat({first, second});
  const at::Tensor other = at::cat({second, first});
  const at::Tensor grads = at::cat({selected_grads, selected_grads});
  // Padding (-1 -1) sorts after every real row, so shapes stay fixed without a host sync.  So does
  // a pair with any index outside [0, B) (a malformed argument: checked on the CPU, but reading
  // the values here would sync): neither direction is then read, nor its `other` index.
  const at::Tensor in_range =
      first.ge(0).logical_and_(first.lt(batch)).logical_and_(second.ge(0)).logical_and_(second.lt(batch));
  rows = at::where(at::cat({in_range, in_range}), rows, at::full_like(rows, batch));
  const auto sorted = at::sort(rows, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_rows = std::get<0>(sorted).contiguous();
  const at::Tensor permutation = std::get<1>(sorted);
  const at::Tensor offsets =
      at::searchsorted(sorted_rows, at::arange(batch + 1, rows.options()), /*out_int32=*/false, /*right=*/false);
  return {offsets.contiguous(), other.index_select(0, permutation).contiguous(),
          grads.index_select(0, permutation).contiguous()};
}

}  // namespace ekd

TORCH_LIBRARY(ekd_kernels, m) {
  m.def(
      "ekd_forward(Tensor student, Tensor teacher, Tensor labels, Tensor student_thresholds, "
      "Tensor teacher_thresholds, Tensor? random_negative_ranks, int[] fpr_numerators, int[] fpr_denominators, "
      "float temperature, int num_hard_negatives, float momentum, float positive_weight, float negative_weight, "
      "bool critical_only, int rank_loss, bool update_thresholds, bool compute_critical_ratio) -> "
      "(Tensor loss, Tensor new_student_thresholds, Tensor new_teacher_thresholds, Tensor batch_student_thresholds, "
      "Tensor batch_teacher_thresholds, Tensor counts, Tensor terms, Tensor selected_pairs, Tensor selected_grads, "
      "Tensor positive_scale)");
  m.def(
      "ekd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor labels, Tensor student_thresholds, "
      "Tensor teacher_thresholds, Tensor selected_pairs, Tensor selected_grads, Tensor positive_scale, "
      "float temperature, bool critical_only, int rank_loss) -> Tensor");
}
