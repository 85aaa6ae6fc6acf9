// Fast RKD (Relational KD, Park et al., CVPR 2019) on the CPU: the loss of
// ekd_kernels.rkd.rkd_loss, and its gradient, with O(B^2) memory and O(B^3) arithmetic.
//
// The reference builds B x B x D normalised differences and multiplies them (B^3 D work, B^2 D
// memory).  Both RKD terms need only the squared distances Q (rkd_math.h), so the stages are:
//   squared distances   Q_s, Q_t by direct differences, B^2 D (a zero difference gives an exact
//                       0, as the reference's differences do; a Gram expansion would leave
//                       rounding noise there and a garbage direction);
//   distance term       ATen on B x B: sqrt(max(Q, 1e-12)), mean over the nonzero entries,
//                       smooth-L1 (the reference's own code path);
//   angle term          a loop over triplets (i, j <= k): c_ijk = c_ikj, so each unordered
//                       {j, k} is visited once and counted twice; anchors are processed in tiles
//                       so that the rows j of Q_s, Q_t are reused from cache by every anchor of
//                       the tile;
//   d loss / d Q        accumulated in the same loop (when asked): row i of the gradient is
//                       written by the worker that claimed anchor i's tile, rows j go to a
//                       buffer of that worker (one per thread), summed at the end;
//   d loss / d x        one matmul: dL/dx_i = 2 sum_j S_ij (x_i - x_j), S = dL/dQ + (dL/dQ)^T,
//                       on centred features (RKD is translation invariant; centring keeps the
//                       two products of that formula small).
// The op returns the gradient together with the loss (as fused cross-entropy kernels do): the
// loss is a scalar, so the backward is a multiply and nothing is recomputed.
//
// Op (namespace ekd_kernels, a fragment: the EKD ops own the namespace's TORCH_LIBRARY):
//   rkd_forward(student, teacher, distance_weight, angle_weight, compute_grad)
//       -> (loss, d loss / d student, or an empty tensor when compute_grad is false)
// Inputs are float32 or float64 (the Python wrapper converts half types), any strides.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "../check.h"
#include "rkd_math.h"

#if defined(__GNUC__)
#define EKD_RKD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EKD_RKD_ALWAYS_INLINE inline
#endif

namespace ekd_rkd {
namespace {

//! Anchors per tile of the angle loop: their rows (5 arrays of B) stay in L2 while every j passes.
constexpr int64_t kAnchorTile = 8;

// ----------------------------------------------------------------------------- squared distances
template <typename scalar_t>
void squared_distances(const scalar_t* x, int64_t batch, int64_t dim, scalar_t* q) {
  // Row p and row B-1-p together: every work item then costs B-1 dot products.
  const int64_t half = (batch + 1) / 2;
  at::parallel_for(0, half, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t rows[2] = {p, batch - 1 - p};
      const int num_rows = rows[0] == rows[1] ? 1 : 2;  // the middle row of an odd batch once
      for (int r = 0; r < num_rows; ++r) {
        const int64_t i = rows[r];
        const scalar_t* xi = x + i * dim;
        q[i * batch + i] = scalar_t(0);
        for (int64_t j = i + 1; j < batch; ++j) {
          const scalar_t* xj = x + j * dim;
          scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < dim; ++d) {
            const scalar_t t = xi[d] - xj[d];
            acc += t * t;
          }
          q[i * batch + j] = acc;
          q[j * batch + i] = acc;
        }
      }
    }
  });
}

at::Tensor squared_distances(const at::Tensor& x) {
  const int64_t batch = x.size(0), dim = x.size(1);
  at::Tensor q = at::empty({batch, batch}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rkd_squared_distances", [&] {
    squared_distances<scalar_t>(x.data_ptr<scalar_t>(), batch, dim, q.data_ptr<scalar_t>());
  });
  return q;
}

// ----------------------------------------------------------------------------- distance term
struct DistanceTerm {
  at::Tensor loss;       // 0-d, mean smooth-L1 over the B x B entries
  at::Tensor grad_q;     // d loss / d Q_s (B x B), undefined unless asked
};

//! The reference's distance term from squared distances: d = sqrt(max(Q, 1e-12)) off the
//! diagonal, 0 on it, divided by its mean over the entries > 0; smooth-L1 averaged over B^2.
DistanceTerm distance_term(const at::Tensor& q_s, const at::Tensor& q_t, bool compute_grad) {
  auto normalised = [](const at::Tensor& q, at::Tensor* d_out, at::Tensor* mask_out, at::Tensor* mean_out) {
    at::Tensor d = q.clamp_min(kSquaredDistanceEps).sqrt();
    d.fill_diagonal_(0);
    at::Tensor mask = d > 0;
    at::Tensor mean = at::where(mask, d, at::zeros({}, d.options())).sum() / mask.sum();
    if (d_out) *d_out = d;
    if (mask_out) *mask_out = mask;
    if (mean_out) *mean_out = mean;
    return d / mean;
  };
  at::Tensor d_s, mask_s, mean_s;
  at::Tensor student = normalised(q_s, &d_s, &mask_s, &mean_s);
  at::Tensor teacher = normalised(q_t, nullptr, nullptr, nullptr);
  DistanceTerm out;
  out.loss = at::smooth_l1_loss(student, teacher, at::Reduction::Mean, 1.0);
  if (!compute_grad) return out;
  const double entries = double(q_s.size(0)) * double(q_s.size(0));
  at::Tensor slope = (student - teacher).clamp(-1, 1) / entries;  // d loss / d (d / mean)
  // d / mean: d(d_kl / mean)/d d_ij = delta / mean - d_kl mask_ij / (mean^2 count)
  at::Tensor through_mean = (slope * d_s).sum() / (mean_s * mean_s * mask_s.sum());
  at::Tensor grad_d = slope / mean_s - mask_s * through_mean;
  // d = sqrt(max(Q, eps)): slope 1 / (2 d) where the floor is inactive; the diagonal is constant.
  at::Tensor active = (q_s >= kSquaredDistanceEps) & mask_s;
  out.grad_q = at::where(active, grad_d / (2 * d_s), at::zeros({}, d_s.options()));
  return out;
}

// ----------------------------------------------------------------------------- angle term
template <typename scalar_t>
struct AngleRows {
  // Per pair (B x B, row-major): squared distance, reciprocal length, and (student, with the
  // gradient) the slope factor r of the reciprocal length.
  const scalar_t* q_s;
  const scalar_t* inv_s;
  const scalar_t* slope_s;
  const scalar_t* q_t;
  const scalar_t* inv_t;
};

//! Sum over k in [k_begin, k_end) of smooth-L1(c_s - c_t) for the triplet (i, j, k), and when
//! kWithGrad the gradient w.r.t. Q_s of the doubled ({j, k} and {k, j}) term: added to row i
//! (positions k, and returned for position j) and subtracted from row j.
template <typename scalar_t, bool kWithGrad>
EKD_RKD_ALWAYS_INLINE void triplet_row(const AngleRows<scalar_t>& rows, int64_t batch, int64_t i, int64_t j,
                                       int64_t k_begin, int64_t k_end, scalar_t* grad_row_i, scalar_t* grad_row_j,
                                       scalar_t& loss_sum, scalar_t& grad_ij) {
  const scalar_t* __restrict__ q_s_i = rows.q_s + i * batch;
  const scalar_t* __restrict__ inv_s_i = rows.inv_s + i * batch;
  const scalar_t* __restrict__ q_t_i = rows.q_t + i * batch;
  const scalar_t* __restrict__ inv_t_i = rows.inv_t + i * batch;
  const scalar_t* __restrict__ q_s_j = rows.q_s + j * batch;
  const scalar_t* __restrict__ q_t_j = rows.q_t + j * batch;
  scalar_t* __restrict__ out_i = grad_row_i;
  scalar_t* __restrict__ out_j = grad_row_j;
  const scalar_t q_s_ij = q_s_i[j], inv_s_ij = inv_s_i[j];
  const scalar_t q_t_ij = q_t_i[j], inv_t_ij = inv_t_i[j];
  // c_ijk = (Q_ij + Q_ik - Q_jk) inv_ij inv_ik / 2 (rkd_math.h), the (i, j) factors out of the loop
  const scalar_t half_inv_s_ij = scalar_t(0.5) * inv_s_ij, half_inv_t_ij = scalar_t(0.5) * inv_t_ij;
  scalar_t loss_acc = 0, grad_acc = 0;
  if (kWithGrad) {
    const scalar_t* __restrict__ slope_s_i = rows.slope_s + i * batch;
    const scalar_t slope_s_ij = slope_s_i[j];
#pragma omp simd reduction(+ : loss_acc, grad_acc)
    for (int64_t k = k_begin; k < k_end; ++k) {
      const scalar_t pair_s = inv_s_ij * inv_s_i[k];
      const scalar_t c_s = (q_s_ij + q_s_i[k] - q_s_j[k]) * half_inv_s_ij * inv_s_i[k];
      const scalar_t c_t = (q_t_ij + q_t_i[k] - q_t_j[k]) * half_inv_t_ij * inv_t_i[k];
      const scalar_t z = c_s - c_t;
      loss_acc += smooth_l1(z);
      const scalar_t g = smooth_l1_grad(z);   // x 2 (both orders) x 1/2 (dc/dQ) = x 1
      const scalar_t cross = g * pair_s;
      const scalar_t self = g * c_s;
      grad_acc += cross - self * slope_s_ij;
      out_i[k] += cross - self * slope_s_i[k];
      out_j[k] -= cross;
    }
  } else {
#pragma omp simd reduction(+ : loss_acc)
    for (int64_t k = k_begin; k < k_end; ++k) {
      const scalar_t c_s = (q_s_ij + q_s_i[k] - q_s_j[k]) * half_inv_s_ij * inv_s_i[k];
      const scalar_t c_t = (q_t_ij + q_t_i[k] - q_t_j[k]) * half_inv_t_ij * inv_t_i[k];
      loss_acc += smooth_l1(c_s - c_t);
    }
  }
  loss_sum += loss_acc;
  grad_ij += grad_acc;
}

//! The anchors of tiles [tile_begin, tile_end): their part of the triplet sum, and (kWithGrad)
//! their gradient rows i in grad_q and rows j in this thread's buffer `shared`.
template <typename scalar_t, bool kWithGrad>
EKD_RKD_ALWAYS_INLINE double angle_tiles(const AngleRows<scalar_t>& rows, int64_t batch, int64_t tile_begin,
                                         int64_t tile_end, scalar_t* grad_q, scalar_t* shared) {
  double loss = 0.0;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t i_begin = tile * kAnchorTile, i_end = std::min(batch, i_begin + kAnchorTile);
    for (int64_t j = 0; j < batch; ++j) {
      for (int64_t i = i_begin; i < i_end; ++i) {
        if (i == j) continue;
        scalar_t* grad_row_i = kWithGrad ? grad_q + i * batch : nullptr;
        scalar_t* grad_row_j = kWithGrad ? shared + j * batch : nullptr;
        scalar_t off_diagonal = 0, grad_ij = 0;
        // k in (j, B) without i; the pair {j, k} stands for both orders
        if (i > j) {
          triplet_row<scalar_t, kWithGrad>(rows, batch, i, j, j + 1, i, grad_row_i, grad_row_j, off_diagonal,
                                           grad_ij);
          triplet_row<scalar_t, kWithGrad>(rows, batch, i, j, i + 1, batch, grad_row_i, grad_row_j,
                                           off_diagonal, grad_ij);
        } else {
          triplet_row<scalar_t, kWithGrad>(rows, batch, i, j, j + 1, batch, grad_row_i, grad_row_j,
                                           off_diagonal, grad_ij);
        }
        // k == j: c = Q_ij inv_ij^2 (1 unless the floor holds); Q_jj = 0 is a constant.
        const int64_t ij = i * batch + j;
        const scalar_t c_s = rows.q_s[ij] * rows.inv_s[ij] * rows.inv_s[ij];
        const scalar_t c_t = rows.q_t[ij] * rows.inv_t[ij] * rows.inv_t[ij];
        loss += 2.0 * double(off_diagonal) + double(smooth_l1(c_s - c_t));
        if (kWithGrad) {
          const scalar_t g = smooth_l1_grad(c_s - c_t);
          grad_row_i[j] += grad_ij + g * (rows.inv_s[ij] * rows.inv_s[ij] - c_s * rows.slope_s[ij]);
        }
      }
    }
  }
  return loss;
}

// The same code compiled for AVX2 and for AVX-512 (chosen at run time), since a package build
// targets the baseline x86-64 (SSE2) and the triplet loop is throughput-bound.  Floating-point
// contraction stays off (ISO C++ mode), so every path rounds alike: per element the same
// operations; only the order of the k-sums differs with the vector width.
// EKD_RKD_ISA=baseline|avx2|avx512 forces a path (tests, benchmarks); unsupported ones fall back.
enum class Isa { kBaseline, kAvx2, kAvx512 };

#if defined(__GNUC__) && defined(__x86_64__)
#define EKD_RKD_HAVE_X86_PATHS 1
template <typename scalar_t, bool kWithGrad>
__attribute__((target("avx2,fma"))) double angle_tiles_avx2(const AngleRows<scalar_t>& rows, int64_t batch,
                                                           int64_t tile_begin, int64_t tile_end, scalar_t* grad_q,
                                                           scalar_t* shared) {
  return angle_tiles<scalar_t, kWithGrad>(rows, batch, tile_begin, tile_end, grad_q, shared);
}

template <typename scalar_t, bool kWithGrad>
__attribute__((target("avx512f,avx512vl,avx2,fma"))) double angle_tiles_avx512(
    const AngleRows<scalar_t>& rows, int64_t batch, int64_t tile_begin, int64_t tile_end, scalar_t* grad_q,
    scalar_t* shared) {
  return angle_tiles<scalar_t, kWithGrad>(rows, batch, tile_begin, tile_end, grad_q, shared);
}
#endif

Isa select_isa() {
  static const Isa isa = [] {
#ifdef EKD_RKD_HAVE_X86_PATHS
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    const char* forced = std::getenv("EKD_RKD_ISA");
    const std::string want = forced ? forced : "";
    if (want == "baseline") return Isa::kBaseline;
    if (want == "avx2") return avx2 ? Isa::kAvx2 : Isa::kBaseline;
    return avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kBaseline);
#else
    return Isa::kBaseline;
#endif
  }();
  return isa;
}

template <typename scalar_t, bool kWithGrad>
double angle_tiles_dispatch(const AngleRows<scalar_t>& rows, int64_t batch, int64_t tile_begin, int64_t tile_end,
                            scalar_t* grad_q, scalar_t* shared) {
#ifdef EKD_RKD_HAVE_X86_PATHS
  switch (select_isa()) {
    case Isa::kAvx512:
      return angle_tiles_avx512<scalar_t, kWithGrad>(rows, batch, tile_begin, tile_end, grad_q, shared);
    case Isa::kAvx2:
      return angle_tiles_avx2<scalar_t, kWithGrad>(rows, batch, tile_begin, tile_end, grad_q, shared);
    default:
      break;
  }
#endif
  return angle_tiles<scalar_t, kWithGrad>(rows, batch, tile_begin, tile_end, grad_q, shared);
}

//! Sum over all triplets of smooth-L1(c_s - c_t) (c = 0 where j == i or k == i, both models,
//! so those terms are 0); with kWithGrad, grad_q (B x B, zeroed) receives d sum / d Q_s in a
//! non-symmetric layout whose symmetrisation is the true gradient.
template <typename scalar_t, bool kWithGrad>
double angle_sum(const AngleRows<scalar_t>& rows, int64_t batch, scalar_t* grad_q) {
  const int64_t num_tiles = (batch + kAnchorTile - 1) / kAnchorTile;
  // One worker per thread, each with its own buffer for the rows j, which every anchor writes
  // (rows i belong to the tile).  Tiles are dealt to workers round-robin, a fixed schedule: the
  // gradient's rows j are then summed over the same partition on every run, so the result is
  // bitwise reproducible for a given thread count (a shared tile counter, tried first, made the
  // rounding depend on which thread came first).  Tiles cost the same (B^2 triplets per anchor),
  // so the static deal loses little.  The loss is kept per tile and summed in tile order.
  const int64_t num_workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tiles));
  std::vector<double> tile_loss(num_tiles, 0.0);
  std::vector<at::Tensor> worker_grad;
  if (kWithGrad) {
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
    for (int64_t w = 0; w < num_workers; ++w) worker_grad.push_back(at::zeros({batch, batch}, options));
  }
  at::parallel_for(0, num_workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    for (int64_t worker = worker_begin; worker < worker_end; ++worker) {
      scalar_t* shared = kWithGrad ? worker_grad[worker].data_ptr<scalar_t>() : nullptr;
      for (int64_t tile = worker; tile < num_tiles; tile += num_workers)
        tile_loss[tile] = angle_tiles_dispatch<scalar_t, kWithGrad>(rows, batch, tile, tile + 1, grad_q, shared);
    }
  });
  if (kWithGrad) {
    at::Tensor own = at::from_blob(grad_q, {batch, batch}, worker_grad[0].options());
    for (const at::Tensor& t : worker_grad) own.add_(t);
  }
  double total = 0.0;
  for (double l : tile_loss) total += l;
  return total;
}

std::tuple<double, at::Tensor> angle_term(const at::Tensor& q_s, const at::Tensor& q_t, bool compute_grad) {
  const int64_t batch = q_s.size(0);
  double sum = 0.0;
  at::Tensor grad_q;
  AT_DISPATCH_FLOATING_TYPES(q_s.scalar_type(), "rkd_angle_term", [&] {
    at::Tensor inv_s = at::empty_like(q_s), inv_t = at::empty_like(q_t), slope_s;
    {
      const scalar_t* qs = q_s.data_ptr<scalar_t>();
      const scalar_t* qt = q_t.data_ptr<scalar_t>();
      scalar_t* is = inv_s.data_ptr<scalar_t>();
      scalar_t* it = inv_t.data_ptr<scalar_t>();
      at::parallel_for(0, batch * batch, 4096, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          is[n] = inverse_length(qs[n]);
          it[n] = inverse_length(qt[n]);
        }
      });
    }
    if (compute_grad) {
      slope_s = at::empty_like(q_s);
      const scalar_t* qs = q_s.data_ptr<scalar_t>();
      scalar_t* ss = slope_s.data_ptr<scalar_t>();
      at::parallel_for(0, batch * batch, 4096, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) ss[n] = inverse_length_slope(qs[n]);
      });
    }
    AngleRows<scalar_t> rows{q_s.data_ptr<scalar_t>(), inv_s.data_ptr<scalar_t>(),
                             compute_grad ? slope_s.data_ptr<scalar_t>() : nullptr, q_t.data_ptr<scalar_t>(),
                             inv_t.data_ptr<scalar_t>()};
    if (compute_grad) {
      grad_q = at::zeros_like(q_s);
      sum = angle_sum<scalar_t, true>(rows, batch, grad_q.data_ptr<scalar_t>());
    } else {
      sum = angle_sum<scalar_t, false>(rows, batch, nullptr);
    }
  });
  return {sum, grad_q};
}

// ----------------------------------------------------------------------------- the op
std::tuple<at::Tensor, at::Tensor> rkd_forward_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                  double distance_weight, double angle_weight, bool compute_grad) {
  EKD_CHECK(student_in.dim() == 2 && teacher_in.dim() == 2, "rkd_forward: student and teacher must be 2-D, got ",
            student_in.sizes(), " and ", teacher_in.sizes());
  EKD_CHECK(student_in.size(0) == teacher_in.size(0), "rkd_forward: student and teacher row counts differ (",
            student_in.size(0), " vs ", teacher_in.size(0), ")");
  EKD_CHECK(student_in.size(0) >= 2, "rkd_forward: needs at least 2 rows, got ", student_in.size(0));
  EKD_CHECK(student_in.scalar_type() == at::kFloat || student_in.scalar_type() == at::kDouble,
            "rkd_forward: float32 or float64 embeddings expected, got ", student_in.scalar_type());
  EKD_CHECK(teacher_in.scalar_type() == student_in.scalar_type(),
            "rkd_forward: teacher dtype must equal the student's, got ", teacher_in.scalar_type());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const int64_t batch = student.size(0);

  const at::Tensor q_s = squared_distances(student);
  const at::Tensor q_t = squared_distances(teacher);
  DistanceTerm distance = distance_term(q_s, q_t, compute_grad);
  auto [angle_total, angle_grad_q] = angle_term(q_s, q_t, compute_grad);
  const double triplets = double(batch) * double(batch) * double(batch);

  at::Tensor loss = (distance.loss.to(at::kDouble) * distance_weight + angle_weight * (angle_total / triplets))
                        .to(student.scalar_type());
  if (!compute_grad) return {loss, at::empty({0}, student.options())};

  at::Tensor grad_q = distance.grad_q * distance_weight + angle_grad_q * (angle_weight / triplets);
  at::Tensor symmetric = grad_q + grad_q.t();
  at::Tensor centred = student - student.mean(0, /*keepdim=*/true);
  at::Tensor grad_student = 2 * (symmetric.sum(1, /*keepdim=*/true) * centred - symmetric.mm(centred));
  return {loss, grad_student};
}

}  // namespace
}  // namespace ekd_rkd

TORCH_LIBRARY_FRAGMENT(ekd_kernels, m) {
  m.def(
      "rkd_forward(Tensor student, Tensor teacher, float distance_weight, float angle_weight, bool compute_grad)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ekd_kernels, CPU, m) { m.impl("rkd_forward", &ekd_rkd::rkd_forward_cpu); }
