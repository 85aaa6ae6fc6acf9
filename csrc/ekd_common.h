// What the CPU and CUDA implementations of the EKD ops share above the per-pair math
// (ekd_math.h): argument checks, the options, the output layout, the EMA update, and ATen-level
// versions of the small stages (normalisation, label grouping, CSR of the selected negatives)
// that the CUDA side uses as they are.  The CPU side does those small stages in plain loops
// instead (ekd_cpu.cpp says why); both give the same LabelGroups and normalised rows.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "check.h"
#include "ekd_math.h"

namespace ekd {

//! The outputs of ekd_kernels::ekd_forward, in schema order.
using ForwardOutputs = std::tuple<at::Tensor,   // loss (0-d, compute dtype)
                                  at::Tensor,   // new_student_thresholds (K, state dtype)
                                  at::Tensor,   // new_teacher_thresholds
                                  at::Tensor,   // batch_student_thresholds (K, state dtype; NaN if no negative)
                                  at::Tensor,   // batch_teacher_thresholds
                                  at::Tensor,   // counts (5, int64), see CountIndex
                                  at::Tensor,   // terms (2, compute dtype): positive, negative term
                                  at::Tensor,   // selected_pairs (n_max x 2, int64, -1 padded)
                                  at::Tensor,   // selected_grads (n_max, compute dtype): d loss / d a
                                  at::Tensor>;  // positive_scale (0-d): d loss / d (positive pair loss);
                                                // NaN for a non-finite batch (row_gradient: NaN throughout)

enum CountIndex : int64_t {
  kNumPositive = 0,
  kNumNegative = 1,
  kNumSelected = 2,
  kNumCriticalSelected = 3,
  kNumCriticalPairs = 4,  // among all pairs; only with compute_critical_ratio (else 0)
  kNumCounts = 5,
};

//! The op's scalar options (EKDConfig, with the FPRs as exact fractions).
struct ForwardOptions {
  std::vector<int64_t> fpr_numerators;
  std::vector<int64_t> fpr_denominators;
  double temperature;
  int64_t num_hard_negatives;
  double momentum;
  double positive_weight;
  double negative_weight;
  bool critical_only;
  int64_t rank_loss;
  bool update_thresholds;
  bool compute_critical_ratio;

  int64_t num_thresholds() const { return int64_t(fpr_numerators.size()); }
};

//! Normalised rows and label groups: stage 1 of the pipeline.
struct PreparedInputs {
  at::Tensor student_hat;  // B x Ds, contiguous, compute dtype
  at::Tensor student_norms;  // B, raw row norms
  at::Tensor teacher_hat;  // B x Dt
  at::Tensor labels;       // B, int64 contiguous
  at::Tensor order;        // LabelGroups arrays, each B int64
  at::Tensor position;
  at::Tensor group_start;
  at::Tensor group_end;
  at::Tensor num_positive;  // 0-d int64

  int64_t batch() const { return student_hat.size(0); }
  LabelGroups groups() const {
    return LabelGroups{order.data_ptr<int64_t>(), position.data_ptr<int64_t>(), group_start.data_ptr<int64_t>(),
                       group_end.data_ptr<int64_t>()};
  }
};

//! The options from the op's arguments (schema order).
ForwardOptions make_options(at::IntArrayRef fpr_numerators, at::IntArrayRef fpr_denominators, double temperature,
                            int64_t num_hard_negatives, double momentum, double positive_weight,
                            double negative_weight, bool critical_only, int64_t rank_loss, bool update_thresholds,
                            bool compute_critical_ratio);

void check_forward_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                          const at::Tensor& student_thresholds, const at::Tensor& teacher_thresholds,
                          const c10::optional<at::Tensor>& random_negative_ranks, const ForwardOptions& options);

//! The shapes, dtypes and devices of ekd_backward's arguments (metadata only: no device read, so
//! no host sync on CUDA), with B, K and the n slots of selected_pairs consistent:
//!   grad_loss, positive_scale: one floating value each; student: B x Ds float32/float64, B >= 2;
//!   teacher: B x Dt floating; labels: B integers; student_thresholds, teacher_thresholds: K >= 1
//!   floating values each; selected_pairs: n x 2 int64 with n <= B(B-1)/2; selected_grads: n
//!   floating values; temperature > 0; rank_loss a RankLoss.  The VALUES of selected_pairs (in
//!   [0, B), or -1 -1 for an unfilled slot) are checked by the CPU op; the CUDA op skips a pair
//!   with an index outside [0, B) instead (negatives_by_row), since reading them would sync.
void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                           const at::Tensor& labels, const at::Tensor& student_thresholds,
                           const at::Tensor& teacher_thresholds, const at::Tensor& selected_pairs,
                           const at::Tensor& selected_grads, const at::Tensor& positive_scale, double temperature,
                           int64_t rank_loss);

//! Stage 1 with ATen ops (device-generic, used on CUDA).
PreparedInputs prepare_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels);

//! n_max: rows of selected_pairs, known from the shapes alone (static for torch.compile).
int64_t max_selected(int64_t batch, int64_t num_hard_negatives);

//! Stage 3b, on device: t <- momentum * e + (1 - momentum) * t where `valid`, else t.
at::Tensor ema_update(const at::Tensor& previous, const at::Tensor& batch, double momentum, const at::Tensor& valid);

//! 0-d bool on the embeddings' device: every embedding is finite.
at::Tensor all_finite(const at::Tensor& student, const at::Tensor& teacher);

//! Sorted CSR of the selected negatives by row (both directions of each pair), in pair order
//! within a row so that the backward sums in a fixed order: (offsets B+1, other, grads).  A pair
//! with an index outside [0, B) (the -1 padding, or a malformed pair) is left out, on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> negatives_by_row(const at::Tensor& selected_pairs,
                                                                 const at::Tensor& selected_grads, int64_t batch);

}  // namespace ekd
