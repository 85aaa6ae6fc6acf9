// The per-pair math of EKD, written once for the CPU kernels and the CUDA kernels.
//
// Everything here is an inline __host__ __device__ function on scalars or short arrays, so
// that the CPU build (which runs in CI) executes the very code the GPU runs: clamped sigmoid,
// soft rank, critical test, per-pair loss and its derivative, the dot product used for pairs
// that are visited one by one (positives), the order-preserving keys of the threshold
// selection and the per-row gradient of the sparse backward.  SPEC.md states the math;
// ekd_kernels/reference.py is the yardstick.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EKD_HD __host__ __device__ __forceinline__
#else
#define EKD_HD inline
#endif

namespace ekd {

//! Row-norm floor of the normalisation (F.normalize's default): a zero row stays finite.
constexpr double kNormEps = 1e-12;
//! The sigmoid's argument is clamped to [-kSigmoidClamp, kSigmoidClamp] (the authors' guard).
constexpr double kSigmoidClamp = 50.0;
//! Radix of the threshold selection: the first round histograms the top 16 bits of a key.
constexpr int kRadixBits = 16;
constexpr int64_t kRadixBins = int64_t(1) << kRadixBits;

//! EKDConfig.rank_loss, as passed to the ops.
enum RankLoss : int64_t { kSoftRank = 0, kEq7 = 1, kEq8 = 2 };

// ----------------------------------------------------------------------------- soft rank
//! 1 / (1 + exp(clamp(-x / tau, -50, 50))), the authors' form.
template <typename T>
EKD_HD T clamped_sigmoid(T x, T temperature) {
  T z = -x / temperature;
  z = z < T(-kSigmoidClamp) ? T(-kSigmoidClamp) : (z > T(kSigmoidClamp) ? T(kSigmoidClamp) : z);
  return T(1) / (T(1) + exp(z));
}

//! d clamped_sigmoid / dx; zero where the clamp is active (as autograd gives it).
template <typename T>
EKD_HD T clamped_sigmoid_grad(T x, T temperature) {
  const T z = -x / temperature;
  if (z < T(-kSigmoidClamp) || z > T(kSigmoidClamp)) return T(0);
  const T e = exp(z);
  const T s = T(1) / (T(1) + e);
  return e * s * s / temperature;
}

//! R(x) = sum_k sigmoid((x - t_k) / tau), summed in threshold order.
template <typename T>
EKD_HD T soft_rank(T x, const T* thresholds, int64_t num_thresholds, T temperature) {
  T sum = T(0);
  for (int64_t k = 0; k < num_thresholds; ++k) sum += clamped_sigmoid(x - thresholds[k], temperature);
  return sum;
}

template <typename T>
EKD_HD T soft_rank_grad(T x, const T* thresholds, int64_t num_thresholds, T temperature) {
  T sum = T(0);
  for (int64_t k = 0; k < num_thresholds; ++k) sum += clamped_sigmoid_grad(x - thresholds[k], temperature);
  return sum;
}

// ----------------------------------------------------------------------------- one pair
//! The thresholds and options every per-pair function needs (device or host pointers).
template <typename T>
struct PairMath {
  const T* student_thresholds;  // K EMA thresholds after this call's update
  const T* teacher_thresholds;
  int64_t num_thresholds;
  T temperature;
  int64_t rank_loss;  // RankLoss
};

//! Eq. 5: critical when 1(b > t_k(T)) != 1(a > t_k(S)) for some k.  Compared threshold by
//! threshold (not by counts) because a caller's FPR list need not be sorted.
template <typename T>
EKD_HD bool is_critical(T a, T b, const PairMath<T>& m) {
  for (int64_t k = 0; k < m.num_thresholds; ++k) {
    if ((a > m.student_thresholds[k]) != (b > m.teacher_thresholds[k])) return true;
  }
  return false;
}

template <typename T>
EKD_HD T sign_of(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
}

//! Per-pair loss of the chosen variant (a: student similarity, b: teacher similarity).
template <typename T>
EKD_HD T pair_loss(T a, T b, const PairMath<T>& m) {
  if (m.rank_loss == kSoftRank) {
    const T d = soft_rank(a, m.student_thresholds, m.num_thresholds, m.temperature) -
                soft_rank(b, m.teacher_thresholds, m.num_thresholds, m.temperature);
    return d * d;
  }
  if (m.rank_loss == kEq7) {
    T sum = T(0);
    for (int64_t k = 0; k < m.num_thresholds; ++k) {
      sum += fabs((b - m.teacher_thresholds[k]) - (a - m.student_thresholds[k]));
    }
    return sum;
  }
  const T d = b - a;
  return d * d;
}

//! d pair_loss / da (abs' = sign with sign(0) = 0, as autograd).
template <typename T>
EKD_HD T pair_loss_grad(T a, T b, const PairMath<T>& m) {
  if (m.rank_loss == kSoftRank) {
    const T d = soft_rank(a, m.student_thresholds, m.num_thresholds, m.temperature) -
                soft_rank(b, m.teacher_thresholds, m.num_thresholds, m.temperature);
    return T(2) * d * soft_rank_grad(a, m.student_thresholds, m.num_thresholds, m.temperature);
  }
  if (m.rank_loss == kEq7) {
    T sum = T(0);
    for (int64_t k = 0; k < m.num_thresholds; ++k) {
      sum -= sign_of((b - m.teacher_thresholds[k]) - (a - m.student_thresholds[k]));
    }
    return sum;
  }
  return T(-2) * (b - a);
}

//! pair_loss and pair_loss_grad of one pair together, bitwise the same values: the soft rank's
//! gradient reuses the exponentials of the student's sigmoids (the same z wherever the clamp
//! is not active, and the gradient is 0 where it is), so a pair costs 2K exponentials instead
//! of 5K.  For the forwards, which need both for every selected negative.  Each expression is
//! the one clamped_sigmoid and clamped_sigmoid_grad evaluate, in the same types: `exp` of a
//! float is the C library's double exp on the host (float on CUDA), which the sigmoid divides
//! by before rounding to T, while the gradient rounds it to T first.
template <typename T>
struct PairLossAndGrad {
  T loss, grad;
};

template <typename T>
EKD_HD PairLossAndGrad<T> pair_loss_and_grad(T a, T b, const PairMath<T>& m) {
  if (m.rank_loss != kSoftRank) return {pair_loss(a, b, m), pair_loss_grad(a, b, m)};
  T rank_a = T(0), rank_grad_a = T(0);
  for (int64_t k = 0; k < m.num_thresholds; ++k) {
    const T z = -(a - m.student_thresholds[k]) / m.temperature;
    const bool clamped = z < T(-kSigmoidClamp) || z > T(kSigmoidClamp);
    const auto e = exp(clamped ? (z < T(0) ? T(-kSigmoidClamp) : T(kSigmoidClamp)) : z);
    rank_a += T(T(1) / (T(1) + e));  // clamped_sigmoid
    if (!clamped) {                   // clamped_sigmoid_grad
      const T e_t = e;
      const T s = T(1) / (T(1) + e_t);
      rank_grad_a += e_t * s * s / m.temperature;
    } else {
      rank_grad_a += T(0);
    }
  }
  const T d = rank_a - soft_rank(b, m.teacher_thresholds, m.num_thresholds, m.temperature);
  return {d * d, T(2) * d * rank_grad_a};
}

//! <x, y> with four partial sums in a fixed order: deterministic, and symmetric in (x, y)
//! bitwise, so a pair visited from either of its rows gets the same similarity.
template <typename T>
EKD_HD T dot_product(const T* x, const T* y, int64_t n) {
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    s0 += x[d] * y[d];
    s1 += x[d + 1] * y[d + 1];
    s2 += x[d + 2] * y[d + 2];
    s3 += x[d + 3] * y[d + 3];
  }
  for (; d < n; ++d) s0 += x[d] * y[d];
  return (s0 + s1) + (s2 + s3);
}

//! How the per-row functions below (positive_row_sums, row_gradient) share out a row's
//! features: `stride()` workers, this one taking features first(), first() + stride(), ...;
//! `dot` hands every worker the whole <x, y>.  On the CPU one worker does a row (SerialLanes,
//! the serial dot_product); on CUDA a warp does (WarpLanes in ekd_cuda.cu: lane l takes features
//! l, l + 32, ..., so the warp's reads of a row coalesce, and the dot ends in a shuffle
//! butterfly).  The control flow, the pair order and every per-feature sum are the same code.
template <typename T>
struct SerialLanes {
  EKD_HD int64_t first() const { return 0; }
  EKD_HD int64_t stride() const { return 1; }
  EKD_HD T dot(const T* x, const T* y, int64_t n) const { return dot_product(x, y, n); }
};

// ----------------------------------------------------------------------------- thresholds
//! floor(num_negatives * numerator / denominator) without overflow (EKDConfig.threshold_indices).
EKD_HD int64_t threshold_index(int64_t num_negatives, int64_t numerator, int64_t denominator) {
  const unsigned __int128 product = (unsigned __int128)num_negatives * (unsigned __int128)numerator;
  return (int64_t)(product / (unsigned __int128)denominator);
}

//! Order-preserving unsigned keys of floats: key(x) < key(y) iff x < y (with -0 < +0).
//! Values >= 0 get their sign bit flipped, negative values get all bits flipped.
template <typename T>
struct KeyOf;

template <>
struct KeyOf<float> {
  using type = uint32_t;
  static constexpr int bits = 32;
};

template <>
struct KeyOf<double> {
  using type = uint64_t;
  static constexpr int bits = 64;
};

template <typename T>
using key_t = typename KeyOf<T>::type;

EKD_HD uint32_t bits_of(float x) {
  union { float f; uint32_t u; } v;
  v.f = x;
  return v.u;
}
EKD_HD uint64_t bits_of(double x) {
  union { double f; uint64_t u; } v;
  v.f = x;
  return v.u;
}

template <typename T>
EKD_HD key_t<T> order_key(T x) {
  using K = key_t<T>;
  const K u = bits_of(x);
  const K sign = K(1) << (KeyOf<T>::bits - 1);
  return (u & sign) ? ~u : (u | sign);
}

template <typename T>
EKD_HD T value_of_key(key_t<T> key) {
  using K = key_t<T>;
  const K sign = K(1) << (KeyOf<T>::bits - 1);
  const K u = (key & sign) ? (key & ~sign) : ~key;
  union { T f; K u; } v;
  v.u = u;
  return v.f;
}

//! The first-round bucket of a key: its top kRadixBits bits.
template <typename T>
EKD_HD int64_t radix_bucket(key_t<T> key) {
  return int64_t(key >> (KeyOf<T>::bits - kRadixBits));
}

//! Where the element of descending rank `rank` sits in a histogram of first-round buckets:
//! its bucket, and its descending rank inside that bucket.  Scans from the top bucket down.
EKD_HD void locate_rank(const int64_t* histogram, int64_t rank, int64_t* bucket, int64_t* rank_in_bucket) {
  int64_t above = 0;
  for (int64_t b = kRadixBins - 1; b >= 0; --b) {
    const int64_t count = histogram[b];
    if (rank < above + count) {
      *bucket = b;
      *rank_in_bucket = rank - above;
      return;
    }
    above += count;
  }
  *bucket = -1;  // rank out of range: only when there is no element at all
  *rank_in_bucket = 0;
}

//! The negative pair of row-major rank `rank` among all negatives (i, j), i < j: the random
//! selection's draw.  `row_start` (B + 1 values) holds the rank of each row's first negative.
EKD_HD void negative_at_rank(int64_t rank, const int64_t* row_start, const int64_t* labels, int64_t batch,
                             int64_t* row_out, int64_t* col_out) {
  // Last row whose first rank is <= rank (rows without negatives share their successor's start).
  int64_t lo = 0, hi = batch;  // invariant: row_start[lo] <= rank < row_start[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (row_start[mid] <= rank) lo = mid; else hi = mid;
  }
  int64_t remaining = rank - row_start[lo];
  *row_out = lo;
  *col_out = -1;
  for (int64_t col = lo + 1; col < batch; ++col) {
    if (labels[col] == labels[lo]) continue;
    if (remaining-- == 0) {
      *col_out = col;
      return;
    }
  }
}

// ----------------------------------------------------------------------------- label groups
//! Positives without scanning all pairs: rows sorted (stably) by label, so that the pairs of
//! one identity are the pairs inside one contiguous group of the sorted order.
struct LabelGroups {
  const int64_t* order;        // sorted position -> row (ascending rows inside a group)
  const int64_t* position;     // row -> sorted position
  const int64_t* group_start;  // sorted position -> first position of its group
  const int64_t* group_end;    // sorted position -> one past the last position of its group
};

//! Sums over the positive pairs (i, j), j > i, that row i opens.
template <typename T>
struct PositiveRowSums {
  double loss_sum;           // every positive pair of the row
  double critical_loss_sum;  // its critical pairs only
  int64_t num_critical;
};

//! Every worker of `lanes` gets the same sums (the dots are whole on each).
template <typename T, typename Lanes = SerialLanes<T>>
EKD_HD PositiveRowSums<T> positive_row_sums(int64_t row, const T* student_hat, int64_t student_dim,
                                            const T* teacher_hat, int64_t teacher_dim, const LabelGroups& groups,
                                            const PairMath<T>& m, const Lanes& lanes = Lanes()) {
  PositiveRowSums<T> out{0.0, 0.0, 0};
  const int64_t p = groups.position[row];
  for (int64_t q = p + 1; q < groups.group_end[p]; ++q) {
    const int64_t other = groups.order[q];
    const T a = lanes.dot(student_hat + row * student_dim, student_hat + other * student_dim, student_dim);
    const T b = lanes.dot(teacher_hat + row * teacher_dim, teacher_hat + other * teacher_dim, teacher_dim);
    const T loss = pair_loss(a, b, m);
    out.loss_sum += double(loss);
    if (is_critical(a, b, m)) {
      out.critical_loss_sum += double(loss);
      out.num_critical += 1;
    }
  }
  return out;
}

// ----------------------------------------------------------------------------- backward
//! Everything the sparse backward of one row reads.
template <typename T>
struct RowGradientInputs {
  const T* student_hat;       // B x Ds normalised student rows
  const T* student_norms;     // B raw row norms
  const T* teacher_hat;       // B x Dt
  int64_t student_dim;
  int64_t teacher_dim;
  LabelGroups groups;
  PairMath<T> math;
  const T* positive_scale;    // d loss / d (positive pair loss) of an included pair (one value)
  bool critical_only;
  const int64_t* negative_offsets;  // CSR over rows of the selected negatives (B + 1)
  const int64_t* negative_other;    // the pair's other row
  const T* negative_grads;          // d loss / d a of the pair
  const T* grad_loss;               // the incoming gradient of the loss (one value)
  // Rows of identity groups of at least `precomputed_min_group` members take their positive
  // part from here (B x Ds) instead of the pair loop: the CPU does large groups by matmuls.
  // nullptr: every row uses the pair loop.
  const T* precomputed_positive_grad;
  int64_t precomputed_min_group;
};

//! y += alpha x over this worker's features.
template <typename T, typename Lanes>
EKD_HD void axpy(T alpha, const T* x, T* y, int64_t n, const Lanes& lanes) {
  for (int64_t d = lanes.first(); d < n; d += lanes.stride()) y[d] += alpha * x[d];
}

//! d loss / d student[row]: sum_j g_ij * s_hat_j over the row's positives (recomputed here with
//! the forward's dot, so the same pairs are critical) and its selected negatives (g from the
//! forward, in pair order), then through x / max(||x||, eps).  `out` holds Ds values and is used
//! as the accumulator; each worker of `lanes` writes and reads back only its own features of it,
//! so the workers need no synchronisation beyond their dots.
template <typename T, typename Lanes = SerialLanes<T>>
EKD_HD void row_gradient(int64_t row, const RowGradientInputs<T>& in, T* out, const Lanes& lanes = Lanes()) {
  const int64_t ds = in.student_dim;
  const int64_t dt = in.teacher_dim;
  const T* s_row = in.student_hat + row * ds;
  const T* t_row = in.teacher_hat + row * dt;
  const int64_t first = lanes.first(), stride = lanes.stride();
  const T positive_scale = *in.positive_scale;
  if (positive_scale != positive_scale) {
    // A non-finite batch (the forward's positive scale is NaN): every element NaN, as on every
    // backend, so that a gradient scaler skips the step even when the bad row takes part in no
    // distilled pair.  (The same for every row and lane: the warp returns together.)
    for (int64_t d = first; d < ds; d += stride) out[d] = positive_scale;
    return;
  }
  for (int64_t d = first; d < ds; d += stride) out[d] = T(0);

  const int64_t p = in.groups.position[row];
  const bool precomputed = in.precomputed_positive_grad != nullptr &&
                           in.groups.group_end[p] - in.groups.group_start[p] >= in.precomputed_min_group;
  if (precomputed) {
    for (int64_t d = first; d < ds; d += stride) out[d] = in.precomputed_positive_grad[row * ds + d];
  } else if (positive_scale != T(0)) {
    for (int64_t q = in.groups.group_start[p]; q < in.groups.group_end[p]; ++q) {
      if (q == p) continue;
      const int64_t other = in.groups.order[q];
      const T* s_other = in.student_hat + other * ds;
      const T a = lanes.dot(s_row, s_other, ds);
      const T b = lanes.dot(t_row, in.teacher_hat + other * dt, dt);
      if (in.critical_only && !is_critical(a, b, in.math)) continue;
      axpy(positive_scale * pair_loss_grad(a, b, in.math), s_other, out, ds, lanes);
    }
  }
  for (int64_t e = in.negative_offsets[row]; e < in.negative_offsets[row + 1]; ++e) {
    axpy(in.negative_grads[e], in.student_hat + in.negative_other[e] * ds, out, ds, lanes);
  }

  const T grad_loss = *in.grad_loss;
  const T norm = in.student_norms[row];
  if (norm > T(kNormEps)) {
    const T radial = lanes.dot(s_row, out, ds);
    for (int64_t d = first; d < ds; d += stride) out[d] = grad_loss * (out[d] - s_row[d] * radial) / norm;
  } else {
    // Clamped norm: the row is divided by the constant eps, whose gradient is g / eps.
    for (int64_t d = first; d < ds; d += stride) out[d] = grad_loss * out[d] / T(kNormEps);
  }
}

}  // namespace ekd
