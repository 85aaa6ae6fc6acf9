// The per-triplet math of the fast RKD, written once for the CPU kernel (and any GPU kernel).
//
// Both RKD terms see the features only through the squared pairwise distances
// Q_ij = ||x_i - x_j||^2.  The reference normalises every difference x_j - x_i by
// n_ij = max(||x_j - x_i||, 1e-12) (F.normalize) and takes dot products; the dot product of two
// differences from the same anchor i is, by the law of cosines (the Gram form
// G_jk - G_ij - G_ik + G_ii written with distances),
//     (x_j - x_i) . (x_k - x_i) = (Q_ij + Q_ik - Q_jk) / 2,
// so the cosine is c_ijk = (Q_ij + Q_ik - Q_jk) / 2 * inv_ij * inv_ik with inv = 1 / n.
// Its partial derivatives (r_ij = inv_ij^2 where the 1e-12 floor is inactive, 0 where it is):
//     dc/dQ_ij = inv_ij inv_ik / 2 - c r_ij / 2,   dc/dQ_ik = inv_ij inv_ik / 2 - c r_ik / 2,
//     dc/dQ_jk = -inv_ij inv_ik / 2.
// The loss per triplet is smooth-L1 with beta 1 (PyTorch's default), as in the reference.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define EKD_RKD_HD __host__ __device__ __forceinline__
#else
#define EKD_RKD_HD inline
#endif

namespace ekd_rkd {

//! F.normalize's floor on the norm of a difference vector.
constexpr double kNormEps = 1e-12;
//! The reference's floor on the squared distance before the root (distance term).
constexpr double kSquaredDistanceEps = 1e-12;

//! smooth-L1 with beta 1: z^2 / 2 inside |z| < 1, |z| - 1/2 outside.
template <typename T>
EKD_RKD_HD T smooth_l1(T z) {
  T a = z < T(0) ? -z : z;
  return a < T(1) ? T(0.5) * z * z : a - T(0.5);
}

//! Its derivative: z clamped to [-1, 1].
template <typename T>
EKD_RKD_HD T smooth_l1_grad(T z) {
  return z < T(-1) ? T(-1) : (z > T(1) ? T(1) : z);
}

//! 1 / max(sqrt(q), 1e-12): the reciprocal length of a difference vector (q = its squared length).
template <typename T>
EKD_RKD_HD T inverse_length(T q) {
  T n = std::sqrt(q);
  return T(1) / (n < T(kNormEps) ? T(kNormEps) : n);
}

//! d inv / d q = -r inv / 2 with r = inv^2 where the floor is inactive and 0 where it holds n.
template <typename T>
EKD_RKD_HD T inverse_length_slope(T q) {
  T n = std::sqrt(q);
  return n >= T(kNormEps) ? T(1) / q : T(0);
}

}  // namespace ekd_rkd
