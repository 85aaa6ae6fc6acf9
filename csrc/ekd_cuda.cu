// EKD on CUDA: the stages of reference.py without any B x B allocation.
//
//   similarity tiles   : one tiled kernel computes 64 x 64 tiles of a Gram (IEEE fp32 / fp64 FMA,
//                        no TF32: tau = 0.01 amplifies a similarity error 100-fold) over the upper
//                        triangle only, and hands every pair to a pass-specific epilogue.  The
//                        tiles are recomputed by each pass instead of being stored.
//   threshold selection: radix selection over order-preserving keys, 16 bits a pass: the first
//                        pass histograms the top 16 bits of all negatives, each next pass the next
//                        16 bits of the elements that share a wanted rank's known prefix (2 passes
//                        in fp32, 4 in fp64).  Integer atomics only: exact and deterministic.
//                        Which bucket holds a rank is decided on the device (no host sync).
//   pair selection     : the N-th largest student key is one more request of the same selection;
//                        one pass counts the ties at it per row and the elements above it, a last
//                        pass collects the elements above it and the ties of the first rows (the
//                        row-major tie order of the CPU kernel), sorted by pair index afterwards so
//                        that the result does not depend on the atomics' order.  With
//                        EKD_CUDA_CANDIDATES=1 (off by default) the second histogram pass collects
//                        every negative of the N-th largest's top bucket or above instead, and
//                        those two passes return at once when they all fit (Candidates).
//   rank loss          : positives from the label groups and the selected negatives, one warp a
//                        row or a pair (WarpLanes: the lanes split the features, so a row's reads
//                        coalesce), with the per-pair math of ekd_math.h shared with the CPU; the
//                        sums run in a fixed order (fixed strides, then a fixed tree) in one block.
//   backward           : one warp per row, ekd_math.h's row_gradient (the CPU's code) over the
//                        warp's lanes.
//
// Limits as B grows: pair counts, ranks, histogram bins (unsigned 64-bit atomics), pair offsets
// i * B + j, tie counts and their prefix sums are 64-bit, so the results are exact at any B the
// launch allows; tile-local indices stay 32-bit.  The tile passes launch one block per tile of
// the upper triangle on the grid's x dimension, T(T+1)/2 blocks for T = cdiv(B, 64), which may
// not pass 2^31 - 1: B <= kMaxBatch = 65535 * 64 = 4194240 (a ValueError names the B given).
// Shared memory is fixed (2 x 16 x 68 values a block on the FMA tiles), whatever B.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "ekd_common.h"

namespace ekd {
namespace {

constexpr int kTile = 64;        // output tile: kTile x kTile pairs per block
constexpr int kTileDepth = 16;   // feature chunk staged in shared memory
constexpr int kTileThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
//! The FMA tiles' layout (gram_tile): in fp32 a thread's outputs are tile rows 4 ty + u and
//! columns 4 tx + v, (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16), so that its 4 values of a
//! staged row are consecutive and come in one 16-byte shared load (rows kTile + 4 wide: 16-byte
//! row starts; the transposed stores are then 2-way bank conflicted, as with kTile + 1); in fp64,
//! rows ty + 16 u and columns tx + 16 v (a thread's 32 bytes at a 32-byte stride would put 4 lanes
//! on a bank: more shared-memory passes than the scalar loads), rows kTile + 1 wide (conflict-free
//! stores).  The tensor-core tiles use the strided layout too (read_tc_tile: at their 128
//! registers the consecutive one put spill loads in their K loops).  Either way each pair of a
//! tile is one thread's, and its value the same bits.
template <typename T>
constexpr bool kConsecutiveTiles = std::is_same<T, float>::value;
template <typename T>
constexpr int kTileLd = kConsecutiveTiles<T> ? kTile + 4 : kTile + 1;
constexpr int kRowThreads = 128;
constexpr int kWarpSize = 32;
//! Rows (or pairs) of a kRowThreads block in the warp-per-row kernels.
constexpr int kRowWarps = kRowThreads / kWarpSize;

using ull = unsigned long long;

inline int64_t blocks_for(int64_t n, int64_t threads) { return (n + threads - 1) / threads; }

//! Largest batch: T = 65535 tiles a side gives T(T+1)/2 = 2147450880 <= 2^31 - 1 tile blocks.
constexpr int64_t kMaxBatch = int64_t(65535) * kTile;
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;

//! Blocks of a tile pass: one per tile of the upper triangle (diagonal included).
inline int64_t tile_blocks(int64_t batch) {
  const int64_t tiles = (batch + kTile - 1) / kTile;
  return tiles * (tiles + 1) / 2;
}

// ----------------------------------------------------------------------------- tile epilogues
enum TilePass : int {
  kHistogram = 0,    // negatives: count the next 16 bits of keys under each request's prefix
  kBoundaryTies = 1, // student negatives: ties at the N-th key per row, and elements above it
  kCollect = 2,      // student negatives: collect the elements above the N-th key and the first ties
  kCritical = 3,     // all pairs: count critical ones (both models in the same tile)
};

template <typename T>
struct TileParams {
  int pass;
  int64_t batch;
  const int64_t* labels;
  // kHistogram: request r owns histogram[r * kRadixBins ...] (one shared histogram when
  // prefix_bits == 0), matching keys whose top prefix_bits bits equal prefix[r].
  ull* histogram;
  int64_t num_requests;
  const uint64_t* prefix;
  const int64_t* residual;  // < 0: the request is void (no negative)
  int prefix_bits;
  // kBoundaryTies / kCollect
  const uint64_t* boundary_key;     // the N-th largest key (a finished request's prefix)
  const int64_t* boundary_residual; // < 0: no top-N selection
  ull* row_ties;
  ull* above_count;
  const int64_t* cut_row;           // ties are taken from rows < cut_row, and from cut_row itself
  ull* collect_count;
  int64_t* collect_pair;            // i * B + j
  T* collect_value;
  int64_t* collect_at_cut;          // 1 for a tie of the cut row (trimmed afterwards)
  int64_t collect_capacity;
  // kCritical
  const T* student_thresholds;
  const T* teacher_thresholds;
  int64_t num_thresholds;
  ull* critical_count;
  // The top-N candidates (EKD_CUDA_CANDIDATES=1, see Candidates): in the student's second
  // histogram pass, a non-null flag at 1 has every negative whose top kRadixBits key bits are at
  // or above the boundary's (candidate_bin, known after the first pass) collected; in the
  // kBoundaryTies and kCollect passes the same flag at 1 makes them return at once.
  const int64_t* candidate_flag;
  const uint64_t* candidate_bin;
  ull* candidate_count;
  int64_t* candidate_pair;   // i * B + j
  T* candidate_value;
  int64_t* candidate_key;    // order_key's bits
  int64_t candidate_capacity;
};

//! kHistogram: the bin of a key, i.e. its bits above the next digit (the known prefix, then the
//! digit): pairs with the same bin add to the same histogram counters.
template <typename T>
__device__ __forceinline__ uint64_t histogram_bin(const TileParams<T>& p, T value) {
  return uint64_t(order_key(value)) >> (KeyOf<T>::bits - p.prefix_bits - kRadixBits);
}

//! Adds `count` pairs of one bin to the histogram (to each request whose prefix it matches).
template <typename T>
__device__ __forceinline__ void histogram_add(const TileParams<T>& p, uint64_t bin, ull count) {
  const int64_t digit = int64_t(bin & uint64_t(kRadixBins - 1));
  if (p.prefix_bits == 0) {
    atomicAdd(p.histogram + digit, count);
    return;
  }
  const uint64_t known = bin >> kRadixBits;
  for (int64_t r = 0; r < p.num_requests; ++r) {
    if (p.residual[r] >= 0 && p.prefix[r] == known) atomicAdd(p.histogram + r * kRadixBins + digit, count);
  }
}

//! A thread's run of pairs in one histogram bin: pairs are counted here and added in one atomic
//! when the bin changes.  Why: atomics to one address serialise (about one per clock), and
//! collapsed similarities (a dead student, zero rows) put every pair in one bin, B^2 atomics a
//! pass; runs, then one atomic per warp when its runs share a bin (histogram_flush_warp), make a
//! collapsed tile cost 8.  Counts are integers: the histogram is the same in any order.
struct HistogramRun {
  uint64_t bin = 0;
  unsigned count = 0;
};

template <typename T>
__device__ __forceinline__ void histogram_count(const TileParams<T>& p, HistogramRun& run, T value) {
  const uint64_t bin = histogram_bin(p, value);
  if (run.count > 0 && bin != run.bin) {
    histogram_add(p, run.bin, ull(run.count));
    run.count = 0;
  }
  run.bin = bin;
  ++run.count;
}

//! The last run of every thread of the warp (all 32 lanes call this together): one atomic for the
//! warp when every lane's run is in the same bin, else one per lane with a run.
template <typename T>
__device__ __forceinline__ void histogram_flush_warp(const TileParams<T>& p, const HistogramRun& run) {
  constexpr unsigned kFullWarp = 0xffffffffu;
  // A lane without a run shows the bin ~0 (a real bin too, for fp64 keys at 48 known bits: then
  // its count of 0 changes nothing); the first lane with a run adds the warp's total.
  const uint64_t bin = run.count > 0 ? run.bin : ~uint64_t(0);
  int same = 0;
  __match_all_sync(kFullWarp, bin, &same);
#if __CUDA_ARCH__ >= 800
  const unsigned total = __reduce_add_sync(kFullWarp, run.count);  // <= 32 x 16
#else  // (no redux.sync before sm_80, e.g. a TORCH_CUDA_ARCH_LIST naming 7.5: an exact integer butterfly)
  unsigned total = run.count;
  for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(kFullWarp, total, offset);
#endif
  const unsigned with_run = __ballot_sync(kFullWarp, run.count > 0);
  if (same) {
    if (with_run != 0 && int(threadIdx.x % 32) == __ffs(with_run) - 1) histogram_add(p, bin, ull(total));
  } else if (run.count > 0) {
    histogram_add(p, run.bin, ull(run.count));
  }
}

template <typename T>
__device__ __forceinline__ void boundary_epilogue(const TileParams<T>& p, int64_t i, int64_t j, T value) {
  const uint64_t key = uint64_t(order_key(value));
  const uint64_t boundary = *p.boundary_key;
  if (p.pass == kBoundaryTies) {
    if (key == boundary) atomicAdd(p.row_ties + i, ull(1));
    else if (key > boundary) atomicAdd(p.above_count, ull(1));
    return;
  }
  const int64_t cut = *p.cut_row;
  const bool take = key > boundary || (key == boundary && i <= cut);
  if (!take) return;
  const ull slot = atomicAdd(p.collect_count, ull(1));
  if (int64_t(slot) >= p.collect_capacity) return;  // cannot happen: above < n, ties before the cut < n, cut row < B
  p.collect_pair[slot] = i * p.batch + j;
  p.collect_value[slot] = value;
  p.collect_at_cut[slot] = (key == boundary && i == cut) ? 1 : 0;
}

//! kHistogram with candidates: keeps the pair when its key's top kRadixBits bits are at or above
//! the boundary's (*candidate_bin), i.e. it may be among the N largest.  Every such pair fits:
//! the flag that enables this says that pass 1 counted at most candidate_capacity of them.
//! (*candidate_bin is read here, an L1 hit, rather than held through the epilogue's loop: the
//! tensor-core tiles' kernels are at their 128 registers there.)
template <typename T>
__device__ __forceinline__ void collect_candidate(const TileParams<T>& p, int64_t i, int64_t j, T value) {
  const uint64_t key = uint64_t(order_key(value));
  if (uint64_t(radix_bucket<T>(key_t<T>(key))) < *p.candidate_bin) return;
  const ull slot = atomicAdd(p.candidate_count, ull(1));
  if (int64_t(slot) >= p.candidate_capacity) return;  // cannot happen (the flag)
  p.candidate_pair[slot] = i * p.batch + j;
  p.candidate_value[slot] = value;
  p.candidate_key[slot] = int64_t(key);
}

//! Upper-triangle tile `t` (row-major over tile rows) -> (tile_row, tile_col), tile_col >= tile_row.
//! Rows 0 ... r-1 hold S(r) = r tiles - r (r - 1) / 2 tiles, so the row is the largest r with
//! S(r) <= t: the root of r^2 - (2 tiles + 1) r + 2 t = 0, in fp64 (exact operands: tiles <=
//! 65535), then corrected by a step where the square root rounded across an integer.  Why not a
//! walk over the rows: it took t's row count of steps, every thread of every tile block, about
//! a third of the tile rows on average (170 steps at B = 32768).
__host__ __device__ __forceinline__ void upper_tile(int64_t t, int64_t tiles, int64_t* tile_row,
                                                    int64_t* tile_col) {
  // (32-bit integers, fewer registers: S(r) = r (2 tiles + 1 - r) / 2 with the product at most
  // tiles (tiles + 1) = twice the grid's block count, < 2^32; see kMaxBatch)
  const uint32_t n = uint32_t(tiles), u = uint32_t(t);
  const auto before = [n](uint32_t r) { return r * (2u * n + 1u - r) / 2u; };
  const double b = 2.0 * double(n) + 1.0;
  uint32_t row = uint32_t((b - sqrt(b * b - 8.0 * double(u))) * 0.5);
  while (row > 0 && before(row) > u) --row;
  while (before(row + 1) <= u) ++row;  // (stops by row tiles - 1: S(tiles) is every tile, > t)
  *tile_row = row;
  *tile_col = int64_t(row) + (u - before(row));
}

//! out[0 ... 3] = p[0 ... 3], from shared memory 16-byte aligned, in one vector load (where the
//! compiler would not prove the alignment itself).
__device__ __forceinline__ void load4(const float* p, float (&out)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}

//! acc[u][v] = <x[i], x[j]> over the feature dimension, (i, j) the pair of tile row and column
//! (4 ty + u, 4 tx + v) in fp32, (ty + 16 u, tx + 16 v) in fp64 (kConsecutiveTiles).
template <typename T>
__device__ __forceinline__ void gram_tile(const T* __restrict__ x, int64_t dim, int64_t batch, int64_t row0,
                                          int64_t col0, T (&acc)[4][4], T (*rows)[kTileLd<T>],
                                          T (*cols)[kTileLd<T>]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < 4; ++v) acc[u][v] = T(0);
  // A thread stages the same places every step: rows r + kStride s (s < kStaged) of the tile's
  // rows and of its columns, feature k0 + k (the element e = threadIdx.x + kTileThreads s of a
  // row-major kTile x kTileDepth step).  Their offsets and row bounds are worked out once, here:
  // recomputed at every step (64-bit products and compares an element) they were most of the
  // loop's instructions that are not FMAs or shared loads (sm_90 SASS).  The same values staged.
  constexpr int kStaged = kTile * kTileDepth / kTileThreads, kStride = kTileThreads / kTileDepth;
  const int r = threadIdx.x / kTileDepth, k = threadIdx.x % kTileDepth;
  const int64_t row_at = (row0 + r) * dim + k, col_at = (col0 + r) * dim + k, stride = kStride * dim;
  unsigned row_ok = 0, col_ok = 0;  // bit s: that row is in the batch
#pragma unroll
  for (int s = 0; s < kStaged; ++s) {
    row_ok |= unsigned(row0 + r + kStride * s < batch) << s;
    col_ok |= unsigned(col0 + r + kStride * s < batch) << s;
  }
  for (int64_t k0 = 0; k0 < dim; k0 += kTileDepth) {
    const bool feature_ok = k0 + k < dim;
#pragma unroll
    for (int s = 0; s < kStaged; ++s) {
      rows[k][r + kStride * s] = feature_ok && (row_ok >> s & 1u) ? x[row_at + s * stride + k0] : T(0);
      cols[k][r + kStride * s] = feature_ok && (col_ok >> s & 1u) ? x[col_at + s * stride + k0] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileDepth; ++kk) {
      T a[4], b[4];
      if constexpr (kConsecutiveTiles<T>) {
        load4(&rows[kk][4 * ty], a);
        load4(&cols[kk][4 * tx], b);
      } else {
        for (int u = 0; u < 4; ++u) a[u] = rows[kk][ty + 16 * u];
        for (int v = 0; v < 4; ++v) b[v] = cols[kk][tx + 16 * v];
      }
      for (int u = 0; u < 4; ++u)
        for (int v = 0; v < 4; ++v) acc[u][v] = fma(a[u], b[v], acc[u][v]);
    }
    __syncthreads();
  }
}

// ----------------------------------------------------------------------------- tensor-core tiles
// The fp32 tiles on tensor cores (EKD_CUDA_TENSOR_CORES=1, sm_80 and later; off by default: the
// fifth GPU run, H200, passed their tests and found this way's tile kernels 17% slower than the
// FMA tiles at B = 8192, the mma.sync way below 10% faster, bench/NOTES.md): 3xTF32, i.e. each
// operand split into a TF32 "big" part and the TF32 rounding of the rest, and per 8-feature step
// small x big + big x small + big x big (the small x small term, ~2^-22 relative, left out), where
// plain TF32 (~1e-3 relative) would not do (tau = 0.01 amplifies a similarity error 100-fold).
// Each step's three products go into a zeroed accumulator, which is then added to the running sum
// by an ordinary fp32 add: tensor cores truncate their own accumulation (round toward zero; Fasi et
// al., PeerJ CS 2021; Ootomo and Yokota 2022), and a running sum kept inside them over D / 8 steps would be
// biased low, by about 4e-6 at D = 512 in a model of this sequence (the reviewing helper's, not a
// measurement), against 2.6e-8 this way and ~1.4e-7 (rms) for the FMA tiles; the tests hold
// thresholds to 1e-6.  Why: the FMA tiles above run at about 18 TFLOP/s on an H200 (11.4 of the
// 12.3 ms of a forward+backward at B = 8192).
//
// Same bits in every pass, and for a single pair: every pass computes a tile with the same code
// and alignment, and pair_dot_tc computes one pair (i, j), i < j, with the same sequence of
// operations (the same 8-feature steps, zero-padded to the same kTcDepth multiple, the same
// three products a step into a zeroed accumulator, the same add), row i at row 0 of A and row j
// at column 0 of B of otherwise zero operands, as the tile has a pair's lower row in A and its
// upper one in B (the two cross products make the sum asymmetric in its operands): an MMA
// computes each output element from its row of A, its column of B and its accumulator alone,
// by the same arithmetic wherever the element sits (the assumption Triton's _pair_similarities
// makes too; no evidence against it found, bit-exact per-element models of the hardware rely on
// it).  The selected pairs' similarities then have the tile passes' bits, as tile_order_dot gives
// the FMA tiles' (test_cuda_tensor_cores_selected_pairs_have_the_tiles_bits checks it on a GPU).
constexpr int kTcDepth = 32;              // features staged in shared memory a step
constexpr int kTcStageLd = kTcDepth + 4;  // a staged row's stride (wmma: 16-byte row starts)
constexpr int kTcOutLd = kTile + 8;       // the accumulator tile's row stride (32-byte row starts)
constexpr int kTcSmemFloats =
    (2 * kTile * kTcStageLd > kTile * kTcOutLd) ? 2 * kTile * kTcStageLd : kTile * kTcOutLd;
[[maybe_unused]] constexpr int kTcStaged = kTile * kTcDepth / kTileThreads;  // staged values a thread, a matrix, a step
//! A warp's buffer in pair_dot_tc: a kTcDepth step's four 16 x 8 A operands and four 8 x 16 B
//! operands (then the 16 x 16 result).
constexpr int kTcPairFloats = 2 * (kTcDepth / 8) * 128;
static_assert(kTileThreads == 256 && kTile == 64, "gram_tile_tc: 8 warps, a 4 x 4 grid of 16 x 16 fragments");
static_assert(kTcDepth == kWarpSize, "pair_dot_tc: a lane a feature of a step");

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define EKD_TC_FALLBACK 1  // no TF32 MMA before sm_80: the FMA tile and tile_order_dot instead
#endif

#ifndef EKD_TC_FALLBACK  // (mma.h declares the TF32 fragments for sm_80 and later only)
namespace wmma = nvcuda::wmma;
using TcA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TcB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using TcAcc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

//! big = TF32 rounding of each element, small = TF32 rounding of what big leaves out.
template <typename Fragment>
__device__ __forceinline__ void split_tf32(const Fragment& x, Fragment& big, Fragment& small) {
#pragma unroll
  for (int t = 0; t < x.num_elements; ++t) {
    const float value = x.x[t];
    const float high = wmma::__float_to_tf32(value);
    big.x[t] = high;
    small.x[t] = wmma::__float_to_tf32(value - high);
  }
}

//! acc += a b in 3xTF32, the step summed apart and added by an fp32 add (see above); the one
//! sequence both gram_tile_tc and pair_dot_tc use.  (Fragments of one type hold the same
//! elements at the same indices, so the add is element for element.)
__device__ __forceinline__ void mma_3xtf32(TcAcc& acc, const TcA& a, const TcB& b) {
  TcA a_big, a_small;
  TcB b_big, b_small;
  split_tf32(a, a_big, a_small);
  split_tf32(b, b_big, b_small);
  TcAcc step;
  wmma::fill_fragment(step, 0.0f);
  wmma::mma_sync(step, a_small, b_big, step);
  wmma::mma_sync(step, a_big, b_small, step);
  wmma::mma_sync(step, a_big, b_big, step);
#pragma unroll
  for (int t = 0; t < acc.num_elements; ++t) acc.x[t] += step.x[t];
}

//! Where a thread's staged value s of a step goes in a staging array: row r = e / kTcDepth,
//! feature k = e % kTcDepth of the step, e = threadIdx.x + s kTileThreads (a warp, one row's
//! kTcDepth features), at r * kTcStageLd + k.
__device__ __forceinline__ int staged_index(int s) {
  const int e = threadIdx.x + s * kTileThreads;
  return (e / kTcDepth) * kTcStageLd + e % kTcDepth;
}

//! Thread's share of a step's staging: rows[r][k] and cols[r][k] of features k0 ... k0 + kTcDepth.
__device__ __forceinline__ void fetch_tc_step(const float* __restrict__ x, int64_t dim, int64_t batch, int64_t row0,
                                              int64_t col0, int64_t k0, float (&row_values)[kTcStaged],
                                              float (&col_values)[kTcStaged]) {
#pragma unroll
  for (int s = 0; s < kTcStaged; ++s) {
    const int e = threadIdx.x + s * kTileThreads;
    const int r = e / kTcDepth, k = e % kTcDepth;  // a warp reads one row's kTcDepth features
    const int64_t feature = k0 + k;
    const int64_t gr = row0 + r, gc = col0 + r;
    row_values[s] = (gr < batch && feature < dim) ? x[gr * dim + feature] : 0.0f;
    col_values[s] = (gc < batch && feature < dim) ? x[gc * dim + feature] : 0.0f;
  }
}
#endif  // EKD_TC_FALLBACK

#ifdef EKD_TC_FALLBACK
//! gram_tile in a tensor-core kernel's shared buffer: what a build without sm_80 code runs instead
//! of gram_tile_tc and gram_tile_mma, consistent with tile_order_dot.
__device__ __forceinline__ void gram_tile_fma_in(const float* __restrict__ x, int64_t dim, int64_t batch,
                                                 int64_t row0, int64_t col0, float (&acc)[4][4], float* smem) {
  gram_tile(x, dim, batch, row0, col0, acc, reinterpret_cast<float(*)[kTileLd<float>]>(smem),
            reinterpret_cast<float(*)[kTileLd<float>]>(smem + kTileDepth * kTileLd<float>));
}
#else
//! After a tensor-core tile's accumulators were stored in `out` (row stride kTcOutLd): acc in the
//! tensor-core layout the epilogues read (acc[u][v] = C[ty + 16u][tx + 16v]).
__device__ __forceinline__ void read_tc_tile(const float* out, float (&acc)[4][4]) {
  __syncthreads();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = out[(ty + 16 * u) * kTcOutLd + tx + 16 * v];
  __syncthreads();  // before a second tile (kCritical) stages over `out`
}
#endif  // EKD_TC_FALLBACK

//! gram_tile's products in the tensor-core layout (acc[u][v] = <x[row0 + ty + 16u], x[col0 + tx +
//! 16v]>) on tensor cores:
//! warp w holds the fragments of rows 16 (w / 2) and columns 16 (2 (w % 2)) and 16 (2 (w % 2) + 1);
//! the next step's values are read into registers while this step's MMAs run; the accumulators
//! go through shared memory to the tensor-core layout (acc[u][v] = C[ty + 16u][tx + 16v]).
__device__ __forceinline__ void gram_tile_tc(const float* __restrict__ x, int64_t dim, int64_t batch, int64_t row0,
                                             int64_t col0, float (&acc)[4][4], float* smem) {
#ifdef EKD_TC_FALLBACK
  gram_tile_fma_in(x, dim, batch, row0, col0, acc, smem);
#else
  float* rows = smem;                       // rows[r * kTcStageLd + k] = x[row0 + r][k0 + k]
  float* cols = smem + kTile * kTcStageLd;  // likewise for the columns' rows
  const int warp = threadIdx.x / kWarpSize;
  const int frag_row = warp / 2, frag_col = 2 * (warp % 2);
  TcAcc c[2];
  wmma::fill_fragment(c[0], 0.0f);
  wmma::fill_fragment(c[1], 0.0f);
  float row_values[kTcStaged], col_values[kTcStaged];
  if (dim > 0) fetch_tc_step(x, dim, batch, row0, col0, 0, row_values, col_values);
  for (int64_t k0 = 0; k0 < dim; k0 += kTcDepth) {
#pragma unroll
    for (int s = 0; s < kTcStaged; ++s) {
      rows[staged_index(s)] = row_values[s];
      cols[staged_index(s)] = col_values[s];
    }
    __syncthreads();
    if (k0 + kTcDepth < dim) fetch_tc_step(x, dim, batch, row0, col0, k0 + kTcDepth, row_values, col_values);
#pragma unroll
    for (int kk = 0; kk < kTcDepth; kk += 8) {
      TcA a;
      wmma::load_matrix_sync(a, rows + frag_row * 16 * kTcStageLd + kk, kTcStageLd);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        TcB b;  // B(k, n) = cols[n][k]: column-major
        wmma::load_matrix_sync(b, cols + (frag_col + f) * 16 * kTcStageLd + kk, kTcStageLd);
        mma_3xtf32(c[f], a, b);
      }
    }
    __syncthreads();
  }
  float* out = smem;  // the staging buffers are free: every warp passed the loop's last barrier
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(out + frag_row * 16 * kTcOutLd + (frag_col + f) * 16, c[f], kTcOutLd,
                            wmma::mem_row_major);
  read_tc_tile(out, acc);
#endif
}

template <typename T>
__device__ __forceinline__ T tile_order_dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n);

//! <x, y> with gram_tile_tc's bits for the pair (i, j), i < j, x = row i and y = row j (see
//! above: the sum is not symmetric), by the whole warp (all 32 lanes call it with the same
//! arguments); `buffer`: the warp's kTcPairFloats floats of shared memory, 32-byte aligned.
__device__ __forceinline__ float pair_dot_tc(const float* __restrict__ x, const float* __restrict__ y, int64_t n,
                                             float* buffer) {
#ifdef EKD_TC_FALLBACK
  return tile_order_dot(x, y, n);
#else
  const int lane = threadIdx.x % kWarpSize;
  // Sub-step q (features k0 + 8q ... k0 + 8q + 7) of a step: A at buffer[128 q], row-major (ld 8),
  // row 0 holding x's 8 features, rows 1-15 zero; B at buffer[512 + 128 q], column-major (ld 8),
  // column 0 holding y's, the others zero.  A step's 32 features come in one load a lane.
  float* a_operands = buffer;
  float* b_operands = buffer + kTcPairFloats / 2;
  for (int e = lane; e < kTcPairFloats; e += kWarpSize) buffer[e] = 0.0f;
  const int slot = (lane / 8) * 128 + lane % 8;  // feature k0 + lane: sub-step lane / 8, place lane % 8
  TcAcc c;
  wmma::fill_fragment(c, 0.0f);
  const int64_t padded = (n + kTcDepth - 1) / kTcDepth * kTcDepth;  // the tile's zero-padded steps
  for (int64_t k0 = 0; k0 < padded; k0 += kTcDepth) {
    const float x_value = k0 + lane < n ? x[k0 + lane] : 0.0f;
    const float y_value = k0 + lane < n ? y[k0 + lane] : 0.0f;
    __syncwarp();  // the last step's loads of the operands are done
    a_operands[slot] = x_value;
    b_operands[slot] = y_value;
    __syncwarp();
#pragma unroll
    for (int q = 0; q < kTcDepth / 8; ++q) {
      TcA a;
      TcB b;
      wmma::load_matrix_sync(a, a_operands + 128 * q, 8);
      wmma::load_matrix_sync(b, b_operands + 128 * q, 8);
      mma_3xtf32(c, a, b);
    }
  }
  __syncwarp();
  wmma::store_matrix_sync(buffer, c, 16, wmma::mem_row_major);
  __syncwarp();
  const float result = buffer[0];
  __syncwarp();  // before the warp's next pair zeroes the buffer
  return result;
#endif
}

// ----------------------------------------------------------------------------- tensor-core tiles, mma.sync
// EKD_CUDA_TENSOR_CORES=2: the same 3xTF32 arithmetic for every element (an 8-feature step's
// small x big, big x small, big x big into a zeroed accumulator, then an fp32 add) through
// mma.sync.m16n8k8 PTX instead of wmma, with the operands where the PTX ISA's fragment layout
// puts them: each value split once, when it is staged in shared memory (wmma's fragments are
// split by every warp that loads them), shared-memory loads at fixed offsets (wmma's load
// through generic addresses, with 64-bit address arithmetic an element), a warp's four 8-column
// blocks sharing its A operands.  Not bitwise EKD_CUDA_TENSOR_CORES=1's results necessarily
// (another instruction sequence), but the same bits in every pass and for a single pair
// (pair_dot_mma), as there.
//   m16n8k8 TF32 fragments (PTX ISA), g = lane / 4, t = lane % 4: A (16 x 8, row-major)
//   a0 = A[g][t], a1 = A[g + 8][t], a2 = A[g][t + 4], a3 = A[g + 8][t + 4]; B (8 x 8, column-major)
//   b0 = B[t][g], b1 = B[t + 4][g]; C (16 x 8) c0 = C[g][2t], c1 = C[g][2t + 1], c2 = C[g + 8][2t],
//   c3 = C[g + 8][2t + 1].
//! Shared floats of gram_tile_mma: big and small parts of the rows and of the columns, then the
//! accumulator tile.
constexpr int kMmaSmemFloats =
    (4 * kTile * kTcStageLd > kTile * kTcOutLd) ? 4 * kTile * kTcStageLd : kTile * kTcOutLd;

#ifndef EKD_TC_FALLBACK
//! The TF32 rounding (to nearest, ties away) of x, as the bits of a float.
__device__ __forceinline__ float to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

//! d = a b + c, one m16n8k8 TF32 MMA with fp32 accumulators.
__device__ __forceinline__ void mma_m16n8k8(float (&d)[4], const float (&a)[4], const float (&b)[2],
                                            const float (&c)[4]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}

//! acc += a b in 3xTF32 from operands already split: the step into a zeroed accumulator, then an
//! fp32 add (see gram_tile_tc's comment); the one sequence gram_tile_mma and pair_dot_mma use.
__device__ __forceinline__ void mma_3xtf32_split(float (&acc)[4], const float (&a_big)[4], const float (&a_small)[4],
                                                 const float (&b_big)[2], const float (&b_small)[2]) {
  const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float step[4];
  mma_m16n8k8(step, a_small, b_big, zero);
  mma_m16n8k8(step, a_big, b_small, step);
  mma_m16n8k8(step, a_big, b_big, step);
#pragma unroll
  for (int e = 0; e < 4; ++e) acc[e] += step[e];
}
#endif  // EKD_TC_FALLBACK

//! gram_tile's products on tensor cores through mma.sync: warp w holds rows 16 (w / 2) ... + 16 and
//! columns 32 (w % 2) ... + 32 (four 8-column blocks); the accumulators go through shared memory
//! to the tensor-core layout (acc[u][v] = C[ty + 16u][tx + 16v]).
__device__ __forceinline__ void gram_tile_mma(const float* __restrict__ x, int64_t dim, int64_t batch, int64_t row0,
                                              int64_t col0, float (&acc)[4][4], float* smem) {
#ifdef EKD_TC_FALLBACK
  gram_tile_fma_in(x, dim, batch, row0, col0, acc, smem);
#else
  constexpr int kPart = kTile * kTcStageLd;  // [r * kTcStageLd + k]: feature k0 + k of row r
  float* rows_big = smem;
  float* rows_small = smem + kPart;
  float* cols_big = smem + 2 * kPart;
  float* cols_small = smem + 3 * kPart;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int r0 = (warp / 2) * 16, c0 = (warp % 2) * 32;
  float c[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[j][e] = 0.0f;
  float row_values[kTcStaged], col_values[kTcStaged];
  if (dim > 0) fetch_tc_step(x, dim, batch, row0, col0, 0, row_values, col_values);
  for (int64_t k0 = 0; k0 < dim; k0 += kTcDepth) {
#pragma unroll
    for (int s = 0; s < kTcStaged; ++s) {
      const int at = staged_index(s);
      const float row_big = to_tf32(row_values[s]), col_big = to_tf32(col_values[s]);
      rows_big[at] = row_big;
      rows_small[at] = to_tf32(row_values[s] - row_big);
      cols_big[at] = col_big;
      cols_small[at] = to_tf32(col_values[s] - col_big);
    }
    __syncthreads();
    if (k0 + kTcDepth < dim) fetch_tc_step(x, dim, batch, row0, col0, k0 + kTcDepth, row_values, col_values);
#pragma unroll
    for (int kk = 0; kk < kTcDepth; kk += 8) {
      const int a_at = (r0 + g) * kTcStageLd + kk + t;
      const float a_big[4] = {rows_big[a_at], rows_big[a_at + 8 * kTcStageLd], rows_big[a_at + 4],
                              rows_big[a_at + 8 * kTcStageLd + 4]};
      const float a_small[4] = {rows_small[a_at], rows_small[a_at + 8 * kTcStageLd], rows_small[a_at + 4],
                                rows_small[a_at + 8 * kTcStageLd + 4]};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int b_at = (c0 + 8 * j + g) * kTcStageLd + kk + t;
        const float b_big[2] = {cols_big[b_at], cols_big[b_at + 4]};
        const float b_small[2] = {cols_small[b_at], cols_small[b_at + 4]};
        mma_3xtf32_split(c[j], a_big, a_small, b_big, b_small);
      }
    }
    __syncthreads();
  }
  float* out = smem;  // the staging buffers are free: every warp passed the loop's last barrier
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int column = c0 + 8 * j + 2 * t;
    out[(r0 + g) * kTcOutLd + column] = c[j][0];
    out[(r0 + g) * kTcOutLd + column + 1] = c[j][1];
    out[(r0 + g + 8) * kTcOutLd + column] = c[j][2];
    out[(r0 + g + 8) * kTcOutLd + column + 1] = c[j][3];
  }
  read_tc_tile(out, acc);
#endif
}

//! <x, y> with gram_tile_mma's bits for the pair (i, j), i < j, x = row i and y = row j, by the
//! whole warp (all 32 lanes call it with the same arguments): lanes 0-3 hold row 0 of A and
//! column 0 of B (g = 0), every other operand is zero, and C[0][0] is lane 0's c0.  The same
//! 8-feature steps, zero-padded to the same kTcDepth multiple, split by the same rounding.
__device__ __forceinline__ float pair_dot_mma(const float* __restrict__ x, const float* __restrict__ y, int64_t n) {
#ifdef EKD_TC_FALLBACK
  return tile_order_dot(x, y, n);
#else
  const int lane = threadIdx.x % kWarpSize;
  const int t = lane % 4;
  const bool holds = lane < 4;  // g = 0
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t padded = (n + kTcDepth - 1) / kTcDepth * kTcDepth;
  for (int64_t k0 = 0; k0 < padded; k0 += kTcDepth) {
    float xs[kTcDepth / 4], ys[kTcDepth / 4];  // features k0 + 8q + t and k0 + 8q + t + 4, q = 0 ... 3
#pragma unroll
    for (int h = 0; h < kTcDepth / 4; ++h) {
      const int64_t feature = k0 + 8 * (h / 2) + t + 4 * (h % 2);
      xs[h] = holds && feature < n ? x[feature] : 0.0f;
      ys[h] = holds && feature < n ? y[feature] : 0.0f;
    }
#pragma unroll
    for (int q = 0; q < kTcDepth / 8; ++q) {
      const float x0 = xs[2 * q], x4 = xs[2 * q + 1], y0 = ys[2 * q], y4 = ys[2 * q + 1];
      const float x0_big = to_tf32(x0), x4_big = to_tf32(x4), y0_big = to_tf32(y0), y4_big = to_tf32(y4);
      const float a_big[4] = {x0_big, 0.0f, x4_big, 0.0f};
      const float a_small[4] = {to_tf32(x0 - x0_big), 0.0f, to_tf32(x4 - x4_big), 0.0f};
      const float b_big[2] = {y0_big, y4_big};
      const float b_small[2] = {to_tf32(y0 - y0_big), to_tf32(y4 - y4_big)};
      mma_3xtf32_split(c, a_big, a_small, b_big, b_small);
    }
  }
  return __shfl_sync(0xffffffffu, c[0], 0);
#endif
}

//! How this call's fp32 tiles are computed: on tensor cores with EKD_CUDA_TENSOR_CORES=1 (wmma) or
//! 2 (mma.sync) and a device of compute capability 8.0 or later, else (unset, another value) by
//! FMA (read at every call: a benchmark's A/B switches it in one process).  fp64 always takes the
//! FMA tiles.  (A build without an sm_80+ image, e.g.
//! TORCH_CUDA_ARCH_LIST=7.5+PTX, runs the fallback above on such a device: FMA tiles, consistent
//! but not on tensor cores, whatever this says; the default build has sm_80 and sm_90.)
enum TileMath : int {
  kFmaTiles = 0,   // gram_tile (the default)
  kWmmaTiles = 1,  // gram_tile_tc, EKD_CUDA_TENSOR_CORES=1
  kMmaTiles = 2,   // gram_tile_mma, EKD_CUDA_TENSOR_CORES=2
};

TileMath tile_math_requested() {
  const char* setting = std::getenv("EKD_CUDA_TENSOR_CORES");
  if (setting == nullptr || at::cuda::getCurrentDeviceProperties()->major < 8) return kFmaTiles;
  if (std::strcmp(setting, "1") == 0) return kWmmaTiles;
  if (std::strcmp(setting, "2") == 0) return kMmaTiles;
  return kFmaTiles;
}

//! A tile's Gram on the FMA path (gram_tile) or on tensor cores (gram_tile_tc, gram_tile_mma: fp32
//! only), in the kernel's one shared buffer.
template <typename T, int kMath>
__device__ __forceinline__ void tile_gram(const T* __restrict__ x, int64_t dim, int64_t batch, int64_t row0,
                                          int64_t col0, T (&acc)[4][4], unsigned char* smem) {
  if constexpr (kMath == kWmmaTiles) {
    gram_tile_tc(x, dim, batch, row0, col0, acc, reinterpret_cast<float*>(smem));
  } else if constexpr (kMath == kMmaTiles) {
    gram_tile_mma(x, dim, batch, row0, col0, acc, reinterpret_cast<float*>(smem));
  } else {
    gram_tile(x, dim, batch, row0, col0, acc, reinterpret_cast<T(*)[kTileLd<T>]>(smem),
              reinterpret_cast<T(*)[kTileLd<T>]>(smem + kTileDepth * kTileLd<T> * sizeof(T)));
  }
}

//! One upper-triangle tile of x's Gram (and of y's in the kCritical pass), each pair (i < j)
//! handed to the pass's epilogue.  Negatives only, except kCritical (all pairs).  kCandidates: the
//! kHistogram pass that also collects the top-N candidates when its flag is set (a kernel of its
//! own: the collection's code in every pass's epilogue would cost the tensor-core tiles' kernels
//! registers there, at their 128).
template <typename T, int kMath, bool kCandidates>
__device__ __forceinline__ void similarity_tile(const T* __restrict__ x, int64_t x_dim, const T* __restrict__ y,
                                                int64_t y_dim, const TileParams<T>& p, unsigned char* smem) {
  if ((p.pass == kBoundaryTies || p.pass == kCollect) &&
      (*p.boundary_residual < 0 || (p.candidate_flag != nullptr && *p.candidate_flag != 0)))
    return;  // no top-N selection, or its candidates were collected in the second histogram pass
  const int64_t tiles = (p.batch + kTile - 1) / kTile;
  int64_t tile_row, tile_col;
  upper_tile(blockIdx.x, tiles, &tile_row, &tile_col);
  const int64_t row0 = tile_row * kTile, col0 = tile_col * kTile;
  T acc[4][4];
  tile_gram<T, kMath>(x, x_dim, p.batch, row0, col0, acc, smem);
  T acc_y[4][4];
  if (p.pass == kCritical) tile_gram<T, kMath>(y, y_dim, p.batch, row0, col0, acc_y, smem);
  // (the same for the whole block; read after the Gram: nothing more live through its loop)
  bool collecting = false;
  if constexpr (kCandidates) collecting = *p.candidate_flag != 0;

  // The layout acc holds (kConsecutiveTiles): the FMA tiles' (gram_tile, also in the tensor-core
  // kernels of a build without sm_80 code: EKD_TC_FALLBACK) or the tensor-core tiles' (strided)
#ifdef EKD_TC_FALLBACK
  constexpr bool kConsecutive = kConsecutiveTiles<T>;
#else
  constexpr bool kConsecutive = kMath == kFmaTiles && kConsecutiveTiles<T>;
#endif
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  ull critical = 0;
  HistogramRun run;
  // Fully unrolled: a runtime index into acc / acc_y would put both in local memory (a stack
  // frame), and the Gram loop above would then update its accumulators through memory.
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = kConsecutive ? row0 + 4 * ty + u : row0 + ty + 16 * u;
    if (i >= p.batch) continue;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = kConsecutive ? col0 + 4 * tx + v : col0 + tx + 16 * v;
      if (j >= p.batch || j <= i) continue;
      if (p.pass == kCritical) {
        PairMath<T> m{p.student_thresholds, p.teacher_thresholds, p.num_thresholds, T(1), kSoftRank};
        critical += is_critical(acc[u][v], acc_y[u][v], m);
        continue;
      }
      if (p.labels[i] == p.labels[j]) continue;
      if (p.pass == kHistogram) {
        histogram_count(p, run, acc[u][v]);
        if constexpr (kCandidates) {
          if (collecting) collect_candidate(p, i, j, acc[u][v]);
        }
      } else {
        boundary_epilogue(p, i, j, acc[u][v]);
      }
    }
  }
  // Every lane of every warp gets here (no early exit above: the block-wide return happens
  // before the tile loads), as the warp-wide flush needs.
  if (p.pass == kHistogram) histogram_flush_warp(p, run);
  if (p.pass == kCritical && critical > 0) atomicAdd(p.critical_count, critical);
}

//! The FMA tiles' kernel.  Shared memory: rows and columns, kTileDepth x kTileLd<T> each.  fp32:
//! held to 64 registers, four blocks an SM (uncapped, the candidates' variant takes 68: three);
//! fp64 to 128, two.
template <typename T, bool kCandidates>
__global__ void __launch_bounds__(kTileThreads, sizeof(T) == 4 ? 4 : 2)
    similarity_tile_kernel(const T* __restrict__ x, int64_t x_dim, const T* __restrict__ y, int64_t y_dim,
                           TileParams<T> p) {
  __shared__ __align__(128) unsigned char smem[2 * kTileDepth * kTileLd<T> * sizeof(T)];
  similarity_tile<T, kFmaTiles, kCandidates>(x, x_dim, y, y_dim, p, smem);
}

//! The tensor-core tiles' kernels (fp32: kWmmaTiles or kMmaTiles), held to 128 registers so that
//! two blocks share an SM (wmma: 173 uncapped, one); shared memory: the tile's staging, then its
//! accumulators.
template <int kMath, bool kCandidates>
__global__ void __launch_bounds__(kTileThreads, 2) similarity_tile_tc_kernel(const float* __restrict__ x,
                                                                             int64_t x_dim,
                                                                             const float* __restrict__ y,
                                                                             int64_t y_dim, TileParams<float> p) {
  __shared__ __align__(128) unsigned char smem[(kMath == kMmaTiles ? kMmaSmemFloats : kTcSmemFloats) * sizeof(float)];
  similarity_tile<float, kMath, kCandidates>(x, x_dim, y, y_dim, p, smem);
}

//! A tile pass over the upper triangle; `math` (tile_math_requested) picks the fp32 tiles' path
//! for the whole call, so every pass computes a pair's similarity alike.
template <typename T>
void launch_tiles(const at::Tensor& x, const at::Tensor& y, const TileParams<T>& params, TileMath math) {
  const int64_t blocks = tile_blocks(params.batch);
  // ekd_forward_cuda refuses B > kMaxBatch; a larger grid would be truncated to 32 bits.
  EKD_CHECK(blocks <= kMaxGridX, "ekd_forward: ", blocks, " tile blocks exceed the grid's x limit");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool candidates = params.pass == kHistogram && params.candidate_flag != nullptr;
  if constexpr (std::is_same<T, float>::value) {
    if (math != kFmaTiles) {
      auto* kernel = math == kMmaTiles
                         ? (candidates ? similarity_tile_tc_kernel<kMmaTiles, true>
                                       : similarity_tile_tc_kernel<kMmaTiles, false>)
                         : (candidates ? similarity_tile_tc_kernel<kWmmaTiles, true>
                                       : similarity_tile_tc_kernel<kWmmaTiles, false>);
      kernel<<<blocks, kTileThreads, 0, stream>>>(x.data_ptr<T>(), x.size(1), y.data_ptr<T>(), y.size(1), params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto* kernel = candidates ? similarity_tile_kernel<T, true> : similarity_tile_kernel<T, false>;
  kernel<<<blocks, kTileThreads, 0, stream>>>(x.data_ptr<T>(), x.size(1), y.data_ptr<T>(), y.size(1), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------- threshold selection
//! The FPR fractions of one init launch, passed by value: no host-to-device copy, hence no host
//! sync (a blocking .to(device) waits for the whole stream) and nothing that breaks graph capture.
constexpr int64_t kFractionsPerLaunch = 32;
struct FractionChunk {
  int64_t first;  // index of the first threshold of this chunk
  int64_t count;  // <= kFractionsPerLaunch
  int64_t numerator[kFractionsPerLaunch];
  int64_t denominator[kFractionsPerLaunch];
};

//! Requests of one model: K threshold ranks (one chunk of them a launch), plus the top-N
//! boundary for the student (with_boundary: set on the launch of the last chunk only).
__global__ void init_requests_kernel(const int64_t* num_negative, FractionChunk fractions, int64_t num_thresholds,
                                     int64_t num_hard_negatives, bool with_boundary, uint64_t* prefix,
                                     int64_t* residual) {
  const int64_t negatives = *num_negative;
  for (int64_t c = 0; c < fractions.count; ++c) {
    const int64_t k = fractions.first + c;
    prefix[k] = 0;
    residual[k] =
        negatives > 0 ? threshold_index(negatives, fractions.numerator[c], fractions.denominator[c]) : -1;
  }
  if (with_boundary) {
    const int64_t n = negatives < num_hard_negatives ? negatives : num_hard_negatives;
    prefix[num_thresholds] = 0;
    residual[num_thresholds] = n > 0 ? n - 1 : -1;
  }
}

//! The scan of locate_requests_kernel: kLocateThreads chunks of kLocateThreads bins each.
constexpr int kLocateThreads = 256;
static_assert(int64_t(kLocateThreads) * kLocateThreads == kRadixBins, "one bin per thread and chunk");
static_assert(kLocateThreads % kWarpSize == 0, "whole warps, each summing 32 chunks");

//! After a histogram pass: each request learns 16 more bits of its key and its rank among the
//! elements sharing them.  One block per request; the result is locate_rank's (ekd_math.h, the
//! CPU's serial scan from the top bin down), found in two block-wide prefix sums instead of one
//! thread's 65536 dependent loads (milliseconds): chunk t's total (chunk t counted from the top)
//! goes to thread t, a scan over the chunk sums finds the chunk holding the rank, a scan over that
//! chunk's bins the bin.  Integer sums: exact, whatever the order.
//!
//! The chunk totals are summed a warp a chunk: each warp reads its 32 chunks one after another,
//! 32 consecutive bins a load (two cache lines), and lane c of the warp keeps chunk c's total.
//! Why: a thread summing its own chunk made each warp load touch 32 cache lines 2 KB apart (one
//! bin of each lane's chunk), 32 L1 wavefronts a load: 256 loads x 8 warps x 32 = 65536 cycles,
//! the 36 us this kernel took at every B in the fifth GPU run (4 launches a csrc call).
__global__ void __launch_bounds__(kLocateThreads) locate_requests_kernel(const int64_t* histogram,
                                                                         int64_t histogram_stride, uint64_t* prefix,
                                                                         int64_t* residual, int64_t* at_or_above) {
  using Scan = cub::BlockScan<int64_t, kLocateThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int64_t found_chunk, found_above;
  const int64_t r = blockIdx.x;
  const int64_t rank = residual[r];
  if (rank < 0) return;  // a void request (the same for the whole block)
  const int64_t* counts = histogram + r * histogram_stride;
  const int t = threadIdx.x;

  // Chunk c holds bins top(c) - kLocateThreads < b <= top(c), counted from the top bin down.
  const int lane = t % kWarpSize, first_chunk = t - lane;  // the warp's chunks: first_chunk + 0..31
  int64_t chunk_total = 0;  // chunk t's
  for (int c = 0; c < kWarpSize; ++c) {
    const int64_t chunk_top = kRadixBins - 1 - int64_t(first_chunk + c) * kLocateThreads;
    int64_t sum = 0;
    for (int i = lane; i < kLocateThreads; i += kWarpSize) sum += counts[chunk_top - i];
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == c) chunk_total = sum;
  }
  int64_t above_chunk = 0;  // elements in the chunks above chunk t
  Scan(scan_storage).ExclusiveSum(chunk_total, above_chunk);
  if (t == 0) found_chunk = -1;
  __syncthreads();
  if (rank >= above_chunk && rank < above_chunk + chunk_total) {  // exactly one chunk when in range
    found_chunk = t;
    found_above = above_chunk;
  }
  __syncthreads();
  if (found_chunk < 0) {  // rank out of range (no element at all): as locate_rank, bucket -1
    if (t == 0) {
      prefix[r] = (prefix[r] << kRadixBits) | uint64_t(int64_t(-1));
      residual[r] = 0;
    }
    return;
  }

  // Thread t takes bin t of the found chunk, counted from the chunk's top.
  const int64_t bin = kRadixBins - 1 - found_chunk * kLocateThreads - t;
  const int64_t count = counts[bin];
  int64_t above_bin = 0;
  Scan(scan_storage).ExclusiveSum(count, above_bin);  // storage reuse: the barriers above separate the scans
  const int64_t before = found_above + above_bin;
  if (rank >= before && rank < before + count) {  // exactly one bin: the element's
    prefix[r] = (prefix[r] << kRadixBits) | uint64_t(bin);
    residual[r] = rank - before;
    if (at_or_above != nullptr) at_or_above[r] = before + count;  // the elements in this bin or above
  }
}

template <typename T>
__global__ void request_values_kernel(const uint64_t* prefix, const int64_t* residual, int64_t count, T* values) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (64-bit: no wrap past 2^32)
  if (r >= count) return;
  values[r] = residual[r] >= 0 ? value_of_key<T>(key_t<T>(prefix[r])) : T(NAN);
}

//! The top-N selection's candidates collected in the student's second histogram pass
//! (EKD_CUDA_CANDIDATES=1): every negative whose key shares or passes the top kRadixBits bits of
//! the N-th largest, which pass 1's histogram counts.  When they fit in `capacity` (a random
//! batch: about N of them; collapsed similarities: most of the batch, and they do not), the two
//! passes of hardest_negatives that count the ties and collect the selection (two more tile
//! passes: a third of the forward's tiles) return at once, and the same counts and selection come
//! from the candidates.  Empty (capacity 0) when off.
struct Candidates {
  int64_t capacity = 0;
  at::Tensor flag;   // 0-d int64 on the device: 1 when they were collected
  at::Tensor count;  // 0-d int64
  at::Tensor pair;   // capacity int64, i * B + j; INT64_MAX in unused slots
  at::Tensor value;  // capacity T
  at::Tensor key;    // capacity int64 (order_key's bits)
};

//! Whether this call collects the top-N candidates in the second histogram pass
//! (EKD_CUDA_CANDIDATES=1; read at every call, as EKD_CUDA_TENSOR_CORES: a benchmark's A/B
//! switches it in one process).  Off by default until a GPU run has checked and timed it.
bool candidates_requested() {
  const char* setting = std::getenv("EKD_CUDA_CANDIDATES");
  return setting != nullptr && std::strcmp(setting, "1") == 0;
}

//! Slots for the candidates: a random batch has about N of them (the boundary's bin holds a
//! handful at D = 512); beyond this many (collapsed or heavily tied similarities) the two passes
//! run as without candidates.
constexpr int64_t kMinCandidateCapacity = int64_t(1) << 16;

struct Requests {
  at::Tensor prefix;    // uint64 stored as int64
  at::Tensor residual;  // int64, < 0 when void
  int64_t count;
  Candidates candidates;  // the student's (with_boundary), when requested
};

//! Radix selection of the requests of one model (x = its normalised rows): KeyOf<T>::bits / 16
//! histogram passes over the tiles.
template <typename T>
Requests select_requests(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& num_negative,
                         const ForwardOptions& options, bool with_boundary, TileMath math) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t k = options.num_thresholds();
  Requests req;
  req.count = k + (with_boundary ? 1 : 0);
  const auto long_options = labels.options().dtype(at::kLong);
  req.prefix = at::empty({req.count}, long_options);
  req.residual = at::empty({req.count}, long_options);
  auto* prefix = reinterpret_cast<uint64_t*>(req.prefix.data_ptr<int64_t>());
  for (int64_t first = 0; first < k; first += kFractionsPerLaunch) {  // k >= 1 (checked)
    FractionChunk chunk{};
    chunk.first = first;
    chunk.count = std::min<int64_t>(kFractionsPerLaunch, k - first);
    for (int64_t c = 0; c < chunk.count; ++c) {
      chunk.numerator[c] = options.fpr_numerators[first + c];
      chunk.denominator[c] = options.fpr_denominators[first + c];
    }
    const bool last = first + chunk.count == k;
    init_requests_kernel<<<1, 1, 0, stream>>>(num_negative.data_ptr<int64_t>(), chunk, k, options.num_hard_negatives,
                                              with_boundary && last, prefix, req.residual.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Candidates& c = req.candidates;
  at::Tensor at_or_above;
  if (with_boundary && candidates_requested()) {
    // (n_max, not N: a huge N, "take every negative", would ask for slots past the pairs; and
    // never more slots than pairs, B <= kMaxBatch: no overflow)
    const int64_t batch = x.size(0), pairs = batch * (batch - 1) / 2;
    const int64_t n_max = max_selected(batch, options.num_hard_negatives);
    c.capacity = std::min(pairs, std::max<int64_t>(kMinCandidateCapacity, 4 * n_max));
  }
  if (c.capacity > 0) {
    c.count = at::zeros({}, long_options);
    c.pair = at::full({c.capacity}, std::numeric_limits<int64_t>::max(), long_options);
    c.value = at::zeros({c.capacity}, x.options());
    c.key = at::zeros({c.capacity}, long_options);
    at_or_above = at::full({req.count}, std::numeric_limits<int64_t>::max(), long_options);
  }
  at::Tensor histogram = at::empty({req.count * kRadixBins}, long_options);
  for (int prefix_bits = 0; prefix_bits < KeyOf<T>::bits; prefix_bits += kRadixBits) {
    histogram.zero_();
    TileParams<T> p{};
    p.pass = kHistogram;
    p.batch = x.size(0);
    p.labels = labels.data_ptr<int64_t>();
    p.histogram = reinterpret_cast<ull*>(histogram.data_ptr<int64_t>());
    p.num_requests = req.count;
    p.prefix = prefix;
    p.residual = req.residual.data_ptr<int64_t>();
    p.prefix_bits = prefix_bits;
    if (c.capacity > 0 && prefix_bits == kRadixBits) {  // the second pass: the boundary's top bits are known
      p.candidate_flag = c.flag.data_ptr<int64_t>();
      p.candidate_bin = prefix + k;  // the boundary request comes after the k thresholds
      p.candidate_count = reinterpret_cast<ull*>(c.count.data_ptr<int64_t>());
      p.candidate_pair = c.pair.data_ptr<int64_t>();
      p.candidate_value = c.value.data_ptr<T>();
      p.candidate_key = c.key.data_ptr<int64_t>();
      p.candidate_capacity = c.capacity;
    }
    launch_tiles<T>(x, x, p, math);
    // The first pass fills one histogram shared by all requests.
    const int64_t stride = prefix_bits == 0 ? 0 : kRadixBins;
    const bool first_with_candidates = c.capacity > 0 && prefix_bits == 0;
    locate_requests_kernel<<<req.count, kLocateThreads, 0, stream>>>(
        histogram.data_ptr<int64_t>(), stride, prefix, req.residual.data_ptr<int64_t>(),
        first_with_candidates ? at_or_above.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (first_with_candidates) {
      // Collected when there is a top-N selection (its request found a bin) and they all fit:
      // decided on the device, no host sync.
      c.flag = at::logical_and(req.residual.narrow(0, k, 1) >= 0, at_or_above.narrow(0, k, 1) <= c.capacity)
                   .to(at::kLong)
                   .reshape({})
                   .contiguous();
    }
  }
  return req;
}

template <typename T>
at::Tensor request_values(const Requests& req, int64_t count, const at::TensorOptions& options) {
  at::Tensor values = at::empty({count}, options);
  request_values_kernel<T><<<blocks_for(count, 32), 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint64_t*>(req.prefix.data_ptr<int64_t>()), req.residual.data_ptr<int64_t>(), count,
      values.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return values;
}

// ----------------------------------------------------------------------------- pair selection
struct Selection {
  at::Tensor pairs;       // n_max x 2 int64, -1 padded
  at::Tensor student;     // n_max: a of each selected pair (0 in padding)
  at::Tensor num_selected;  // 0-d int64
};

//! The n hardest negatives: every element above the n-th largest key, then ties at it in
//! row-major order, found without host synchronisation.
template <typename T>
Selection hardest_negatives(const at::Tensor& student_hat, const at::Tensor& labels, const Requests& student_req,
                            int64_t boundary_index, const at::Tensor& num_negative, int64_t num_hard_negatives,
                            int64_t n_max, TileMath math) {
  const int64_t batch = student_hat.size(0);
  const auto long_options = labels.options().dtype(at::kLong);
  const auto* boundary_key = reinterpret_cast<const uint64_t*>(student_req.prefix.data_ptr<int64_t>()) + boundary_index;
  const int64_t* boundary_residual = student_req.residual.data_ptr<int64_t>() + boundary_index;
  const at::Tensor n = at::clamp_max(num_negative, num_hard_negatives);

  at::Tensor row_ties = at::zeros({batch}, long_options);
  at::Tensor above = at::zeros({}, long_options);
  TileParams<T> p{};
  p.pass = kBoundaryTies;
  p.batch = batch;
  p.labels = labels.data_ptr<int64_t>();
  p.boundary_key = boundary_key;
  p.boundary_residual = boundary_residual;
  p.row_ties = reinterpret_cast<ull*>(row_ties.data_ptr<int64_t>());
  p.above_count = reinterpret_cast<ull*>(above.data_ptr<int64_t>());
  // (with candidates collected this pass and the collection below return at once)
  const Candidates& c = student_req.candidates;
  if (c.capacity > 0) p.candidate_flag = c.flag.data_ptr<int64_t>();
  launch_tiles<T>(student_hat, student_hat, p, math);

  // The same counts from the candidates (nothing when they were not collected: their slots are
  // empty): ties at the boundary key per row and elements above it.  Keys compare as unsigned
  // 64-bit values: with the sign bit flipped, as int64 (fp64 keys use all 64 bits).
  at::Tensor candidate_row, candidate_tie, candidate_above;
  if (c.capacity > 0) {
    const at::Tensor valid = c.pair != std::numeric_limits<int64_t>::max();
    const at::Tensor boundary = student_req.prefix.narrow(0, boundary_index, 1);
    const int64_t flip = std::numeric_limits<int64_t>::min();
    // (unused slots add 0 to rows spread over the batch, not all to row 0: one address would
    // serialise their atomics)
    const at::Tensor spread = at::remainder(at::arange(c.capacity, long_options), batch);
    candidate_row = at::where(valid, at::floor_divide(c.pair, batch), spread);
    candidate_tie = at::logical_and(valid, c.key == boundary);
    candidate_above = at::logical_and(valid, at::bitwise_xor(c.key, flip) > at::bitwise_xor(boundary, flip));
    row_ties.index_add_(0, candidate_row, candidate_tie.to(at::kLong));
    above.add_(candidate_above.sum());
  }

  // Ties wanted = n - above; the cut row is the first whose cumulative ties reach it.
  const at::Tensor ties_wanted = n - above;
  const at::Tensor cumulative = at::cumsum(row_ties, 0);
  const at::Tensor cut_row =
      at::clamp_max(at::searchsorted(cumulative, ties_wanted.reshape({1}), false, false), batch - 1).reshape({});
  const at::Tensor cut_index = cut_row.reshape({1});
  const at::Tensor ties_at_cut =
      ties_wanted - (cumulative.index_select(0, cut_index) - row_ties.index_select(0, cut_index)).reshape({});

  const int64_t capacity = n_max + batch;
  at::Tensor count = at::zeros({}, long_options);
  at::Tensor pair_index = at::full({capacity}, std::numeric_limits<int64_t>::max(), long_options);
  at::Tensor values = at::zeros({capacity}, student_hat.options());
  at::Tensor at_cut = at::zeros({capacity}, long_options);
  const at::Tensor cut_row_c = cut_row.contiguous();
  p.pass = kCollect;
  p.cut_row = cut_row_c.data_ptr<int64_t>();
  p.collect_count = reinterpret_cast<ull*>(count.data_ptr<int64_t>());
  p.collect_pair = pair_index.data_ptr<int64_t>();
  p.collect_value = values.data_ptr<T>();
  p.collect_at_cut = at_cut.data_ptr<int64_t>();
  p.collect_capacity = capacity;
  launch_tiles<T>(student_hat, student_hat, p, math);
  if (c.capacity > 0) {
    // kCollect's choice among the candidates: every element above the boundary key, and its ties
    // in rows up to the cut row (those of the cut row marked); the rest of the slots unused.
    // When they were collected kCollect wrote nothing, else these slots are all unused: the two
    // halves together hold one selection either way, ordered below by pair index alike.
    const at::Tensor take = at::logical_or(candidate_above, at::logical_and(candidate_tie, candidate_row <= cut_row));
    const at::Tensor unused = at::full_like(c.pair, std::numeric_limits<int64_t>::max());
    pair_index = at::cat({pair_index, at::where(take, c.pair, unused)});
    values = at::cat({values, c.value});
    at_cut = at::cat({at_cut, at::logical_and(candidate_tie, candidate_row == cut_row).to(at::kLong)});
  }

  // Deterministic whatever the atomics did: order by pair index, keep the first ties of the
  // cut row, order again and cut to n_max.
  auto sorted = at::sort(pair_index);
  at::Tensor order = std::get<1>(sorted);
  at::Tensor sorted_index = std::get<0>(sorted);
  at::Tensor sorted_cut = at_cut.index_select(0, order);
  const at::Tensor keep = at::logical_or(sorted_cut == 0, at::cumsum(sorted_cut, 0) <= ties_at_cut);
  const at::Tensor kept_index =
      at::where(keep, sorted_index, at::full_like(sorted_index, std::numeric_limits<int64_t>::max()));
  auto final_sorted = at::sort(kept_index);
  const at::Tensor final_index = std::get<0>(final_sorted).narrow(0, 0, n_max);
  const at::Tensor final_order = order.index_select(0, std::get<1>(final_sorted).narrow(0, 0, n_max));
  const at::Tensor used = final_index != std::numeric_limits<int64_t>::max();
  Selection s;
  const at::Tensor rows = at::where(used, at::floor_divide(final_index, batch), at::full_like(final_index, -1));
  const at::Tensor cols = at::where(used, at::remainder(final_index, batch), at::full_like(final_index, -1));
  s.pairs = at::stack({rows, cols}, 1).contiguous();
  s.student = at::where(used, values.index_select(0, final_order), at::zeros({}, values.options())).contiguous();
  s.num_selected = n;
  return s;
}

__global__ void random_pairs_kernel(const int64_t* ranks, int64_t count, const int64_t* row_start,
                                    const int64_t* labels, int64_t batch, int64_t* pairs) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (64-bit: no wrap past 2^32)
  if (e >= count) return;
  negative_at_rank(ranks[e], row_start, labels, batch, pairs + 2 * e, pairs + 2 * e + 1);
  // A rank outside [0, L) finds no column: make the whole pair padding, else the backward's CSR
  // would visit row i with other = -1 and read before student_hat.  (The CPU op raises here; a
  // device-side check cannot without a sync.  csrc_ops draws the ranks from randperm(L).)
  if (pairs[2 * e + 1] < 0) pairs[2 * e] = -1;
}

//! The random selection: the ranks drawn in Python, mapped to pairs on the device.
Selection random_negatives(const PreparedInputs& prep, const at::Tensor& ranks, int64_t n_max) {
  const int64_t batch = prep.batch();
  const auto long_options = prep.labels.options();
  const at::Tensor rows = at::arange(batch, long_options);
  const at::Tensor later_positives = prep.group_end.index_select(0, prep.position) - prep.position - 1;
  const at::Tensor row_negatives = (batch - 1 - rows) - later_positives;
  const at::Tensor row_start = at::cat({at::zeros({1}, long_options), at::cumsum(row_negatives, 0)}).contiguous();
  Selection s;
  s.pairs = at::full({n_max, 2}, -1, long_options);
  const int64_t count = ranks.size(0);
  if (count > 0) {
    const at::Tensor r = ranks.contiguous();
    random_pairs_kernel<<<blocks_for(count, kRowThreads), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        r.data_ptr<int64_t>(), count, row_start.data_ptr<int64_t>(), prep.labels.data_ptr<int64_t>(), batch,
        s.pairs.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  s.num_selected = at::scalar_tensor(count, long_options);
  return s;
}

// ----------------------------------------------------------------------------- warp per row
//! ekd_math.h's Lanes for one warp on one row: lane l takes features l, l + 32, ... (a warp
//! reads 32 consecutive values of a row at a time: coalesced, where a thread per row read 32
//! rows' scattered values and ran its D-long loops alone: milliseconds at B = 1024, whose
//! rows hold a dozen pairs each).  dot: per-lane partial sums, then a butterfly of shuffles;
//! each step adds the same two operands in both lanes of a pair, so every lane ends with the
//! same value, and the value is symmetric in (x, y) (a pair gets one similarity from either of
//! its rows, and the forward and the backward agree on which pairs are critical).  CI, without a
//! GPU, runs the same per-row code on emulated lanes (lane_emulation.h, the CPU op's testing aid).
template <typename T>
struct WarpLanes {
  int lane;
  __device__ __forceinline__ int64_t first() const { return lane; }
  __device__ __forceinline__ int64_t stride() const { return kWarpSize; }
  __device__ __forceinline__ T dot(const T* x, const T* y, int64_t n) const {
    T sum = T(0);
    for (int64_t d = lane; d < n; d += kWarpSize) sum += x[d] * y[d];
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    return sum;
  }
};

//! Blocks of a warp-per-item kernel over `count` items, kRowWarps a block; the kernels loop
//! grid-stride, so a count past the grid's x limit still runs (a warp takes several items).
inline int64_t warp_blocks(int64_t count) {
  return std::max<int64_t>(1, std::min(blocks_for(count, kRowWarps), kMaxGridX));
}

//! Loop of a warp-per-item kernel: `item` takes the warp's items; the whole warp runs each
//! iteration together (its items are warp-uniform), as the shuffles of WarpLanes need.
#define EKD_FOR_EACH_WARP_ITEM(item, count)                                                          \
  for (int64_t item = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize; item < (count);   \
       item += int64_t(gridDim.x) * kRowWarps)

// ----------------------------------------------------------------------------- rank loss
//! A warp per row: the sums over the positive pairs the row opens.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    positive_rows_kernel(const T* student_hat, int64_t ds, const T* teacher_hat, int64_t dt, LabelGroups groups,
                         PairMath<T> math, int64_t batch, double* loss_sum, double* critical_loss_sum,
                         int64_t* num_critical) {
  const WarpLanes<T> lanes{int(threadIdx.x % kWarpSize)};
  EKD_FOR_EACH_WARP_ITEM(row, batch) {
    const PositiveRowSums<T> s = positive_row_sums(row, student_hat, ds, teacher_hat, dt, groups, math, lanes);
    if (lanes.lane == 0) {
      loss_sum[row] = s.loss_sum;
      critical_loss_sum[row] = s.critical_loss_sum;
      num_critical[row] = s.num_critical;
    }
  }
}

//! <x, y> in the order of gram_tile: one fused multiply-add per feature, from the first, so a
//! pair's similarity has the bits the tile passes gave it.  Why: the thresholds are the tile
//! passes' values, and with momentum = 1 each one is some negative's similarity; recomputed in
//! another order (WarpLanes' butterfly) that pair could land an ulp above its own threshold and
//! count as critical where the reference finds it equal.  Every lane of the warp computes the
//! whole sum (the same addresses: broadcast loads); it runs on the N selected pairs only.
template <typename T>
__device__ __forceinline__ T tile_order_dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T acc = T(0);
#pragma unroll 8
  for (int64_t d = 0; d < n; ++d) acc = fma(x[d], y[d], acc);
  return acc;
}

//! A pair's similarity as the tile passes computed it: tile_order_dot after the FMA tiles, the
//! warp's pair_dot_tc or pair_dot_mma after the tensor-core ones (`buffer`: the warp's shared
//! floats, for pair_dot_tc).
template <typename T, int kMath>
__device__ __forceinline__ T tile_pass_dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n,
                                           float* buffer) {
  if constexpr (kMath == kWmmaTiles) return pair_dot_tc(x, y, n, buffer);
  else if constexpr (kMath == kMmaTiles) return pair_dot_mma(x, y, n);
  else return tile_order_dot(x, y, n);
}

//! A warp per selected pair: a (given: the tile pass's value, or recomputed when random), b, as
//! the tile passes computed them (tile_pass_dot), its loss, criticality, d loss / d a.
template <typename T, int kMath>
__global__ void __launch_bounds__(kRowThreads)
    selected_pairs_kernel(const int64_t* pairs, const T* given_student, const T* student_hat, int64_t ds,
                          const T* teacher_hat, int64_t dt, PairMath<T> math, int64_t count, double* loss,
                          int64_t* critical, T* loss_grad) {
  __shared__ __align__(32) float pair_buffers[kMath == kWmmaTiles ? kRowWarps * kTcPairFloats : 1];
  float* buffer = pair_buffers + (kMath == kWmmaTiles ? (threadIdx.x / kWarpSize) * kTcPairFloats : 0);
  const WarpLanes<T> lanes{int(threadIdx.x % kWarpSize)};
  EKD_FOR_EACH_WARP_ITEM(e, count) {
    const int64_t i = pairs[2 * e], j = pairs[2 * e + 1];
    if (i < 0 || j < 0) {  // padding (the same for the whole warp)
      if (lanes.lane == 0) {
        loss[e] = 0.0;
        critical[e] = -1;
        loss_grad[e] = T(0);
      }
      continue;
    }
    const T a = given_student != nullptr
                    ? given_student[e]
                    : tile_pass_dot<T, kMath>(student_hat + i * ds, student_hat + j * ds, ds, buffer);
    const T b = tile_pass_dot<T, kMath>(teacher_hat + i * dt, teacher_hat + j * dt, dt, buffer);
    if (lanes.lane == 0) {
      const PairLossAndGrad<T> both = pair_loss_and_grad(a, b, math);
      loss[e] = double(both.loss);
      critical[e] = is_critical(a, b, math) ? 1 : 0;
      loss_grad[e] = both.grad;
    }
  }
}

template <typename T>
struct TermInputs {
  const double* positive_loss;
  const double* positive_critical_loss;
  const int64_t* positive_critical;
  int64_t batch;
  const int64_t* num_positive;
  const double* negative_loss;
  const int64_t* negative_critical;  // -1: padding
  int64_t n_max;
  double positive_weight, negative_weight;
  bool critical_only;
};

//! The block of terms_kernel.
constexpr int kTermThreads = 256;

//! Sums of terms_kernel, one per thread, then combined in a fixed tree.
struct TermSums {
  double pos_sum, pos_critical_sum, neg_sum, neg_critical_sum;
  int64_t pos_critical, neg_critical, neg_count;

  __device__ void add(const TermSums& o) {
    pos_sum += o.pos_sum;
    pos_critical_sum += o.pos_critical_sum;
    neg_sum += o.neg_sum;
    neg_critical_sum += o.neg_critical_sum;
    pos_critical += o.pos_critical;
    neg_critical += o.neg_critical;
    neg_count += o.neg_count;
  }
};

//! One block: the two terms, the loss and the gradient scales.  Deterministic: thread t sums
//! the rows t, t + 256, ... in order, then a fixed binary tree adds the 256 partial sums (no
//! atomics), so the rounding is the same on every run; one thread alone took milliseconds for
//! its B + N dependent loads at large B.
template <typename T>
__global__ void __launch_bounds__(kTermThreads) terms_kernel(TermInputs<T> in, T* loss, T* terms, T* positive_scale,
                                                             T* negative_scale, int64_t* num_critical_selected) {
  __shared__ TermSums partial[kTermThreads];
  const int t = threadIdx.x;
  TermSums mine{0.0, 0.0, 0.0, 0.0, 0, 0, 0};
  for (int64_t r = t; r < in.batch; r += kTermThreads) {
    mine.pos_sum += in.positive_loss[r];
    mine.pos_critical_sum += in.positive_critical_loss[r];
    mine.pos_critical += in.positive_critical[r];
  }
  for (int64_t e = t; e < in.n_max; e += kTermThreads) {
    const int64_t c = in.negative_critical[e];
    if (c < 0) continue;
    mine.neg_count += 1;
    mine.neg_sum += in.negative_loss[e];
    if (c) {
      mine.neg_critical_sum += in.negative_loss[e];
      mine.neg_critical += 1;
    }
  }
  partial[t] = mine;
  __syncthreads();
  for (int half = kTermThreads / 2; half > 0; half /= 2) {
    if (t < half) partial[t].add(partial[t + half]);
    __syncthreads();
  }
  if (t != 0) return;
  const double pos_sum = partial[0].pos_sum, pos_critical_sum = partial[0].pos_critical_sum;
  const double neg_sum = partial[0].neg_sum, neg_critical_sum = partial[0].neg_critical_sum;
  const int64_t pos_critical = partial[0].pos_critical, neg_critical = partial[0].neg_critical;
  const int64_t neg_count = partial[0].neg_count;
  const int64_t pos_n = in.critical_only ? pos_critical : *in.num_positive;
  const int64_t neg_n = in.critical_only ? neg_critical : neg_count;
  const T positive_term = pos_n > 0 ? T((in.critical_only ? pos_critical_sum : pos_sum) / double(pos_n)) : T(0);
  const T negative_term = neg_n > 0 ? T((in.critical_only ? neg_critical_sum : neg_sum) / double(neg_n)) : T(0);
  terms[0] = positive_term;
  terms[1] = negative_term;
  *loss = T(in.positive_weight) * positive_term + T(in.negative_weight) * negative_term;
  // weight * (1 / n), as the CPU op's TermSums::pair_weight (w / n can differ in the last bit).
  *positive_scale = pos_n > 0 ? T(in.positive_weight * (1.0 / double(pos_n))) : T(0);
  *negative_scale = neg_n > 0 ? T(in.negative_weight * (1.0 / double(neg_n))) : T(0);
  *num_critical_selected = pos_critical + neg_critical;
}

template <typename T>
__global__ void selected_grads_kernel(const int64_t* critical, const T* loss_grad, const T* negative_scale,
                                      bool critical_only, int64_t count, T* grads) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (64-bit: no wrap past 2^32)
  if (e >= count) return;
  const bool included = critical[e] == 1 || (!critical_only && critical[e] == 0);
  grads[e] = included ? *negative_scale * loss_grad[e] : T(0);
}

// ----------------------------------------------------------------------------- the whole forward
template <typename T>
ForwardOutputs forward_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                            const at::Tensor& student_thresholds, const at::Tensor& teacher_thresholds,
                            const std::optional<at::Tensor>& random_negative_ranks, const ForwardOptions& options) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const PreparedInputs prep = prepare_inputs(student, teacher, labels);
  const int64_t batch = prep.batch();
  const int64_t ds = prep.student_hat.size(1), dt = prep.teacher_hat.size(1);
  const int64_t k = options.num_thresholds();
  const int64_t n_max = max_selected(batch, options.num_hard_negatives);
  const bool hardest = !random_negative_ranks.has_value();
  const auto long_options = prep.labels.options();
  const auto compute_options = prep.student_hat.options();
  const at::Tensor num_negative = (batch * (batch - 1) / 2) - prep.num_positive;
  const TileMath tile_math = std::is_same<T, float>::value ? tile_math_requested() : kFmaTiles;

  // Stage 3: batch thresholds (and the student's N-th largest negative) by radix selection.
  const Requests student_req = select_requests<T>(prep.student_hat, prep.labels, num_negative, options, hardest,
                                                           tile_math);
  const Requests teacher_req = select_requests<T>(prep.teacher_hat, prep.labels, num_negative, options, false,
                                                           tile_math);
  const at::Tensor batch_student_c = request_values<T>(student_req, k, compute_options);
  const at::Tensor batch_teacher_c = request_values<T>(teacher_req, k, compute_options);
  const at::Tensor finite = all_finite(student, teacher);
  // A non-finite batch's statistics read as NaN (batch thresholds and terms), as on every backend.
  const at::Tensor batch_student =
      at::where(finite, batch_student_c, at::full_like(batch_student_c, NAN)).to(student_thresholds.scalar_type());
  const at::Tensor batch_teacher =
      at::where(finite, batch_teacher_c, at::full_like(batch_teacher_c, NAN)).to(student_thresholds.scalar_type());
  const at::Tensor valid = finite.logical_and(num_negative > 0).logical_and(
      at::scalar_tensor(options.update_thresholds, finite.options()));
  const at::Tensor new_student = ema_update(student_thresholds, batch_student, options.momentum, valid);
  const at::Tensor new_teacher = ema_update(teacher_thresholds, batch_teacher, options.momentum, valid);
  const at::Tensor student_state = new_student.to(compute_options.dtype()).contiguous();
  const at::Tensor teacher_state = new_teacher.to(compute_options.dtype()).contiguous();
  const PairMath<T> math{student_state.data_ptr<T>(), teacher_state.data_ptr<T>(), k, T(options.temperature),
                         options.rank_loss};

  // Stage 4: the distilled negatives.
  const Selection selection =
      hardest ? hardest_negatives<T>(prep.student_hat, prep.labels, student_req, k, num_negative,
                                     options.num_hard_negatives, n_max, tile_math)
              : random_negatives(prep, *random_negative_ranks, n_max);

  // Stage 5: the two terms and the per-pair gradients.
  const auto double_options = compute_options.dtype(at::kDouble);
  at::Tensor pos_loss = at::empty({batch}, double_options);
  at::Tensor pos_critical_loss = at::empty({batch}, double_options);
  at::Tensor pos_critical = at::empty({batch}, long_options);
  positive_rows_kernel<T><<<warp_blocks(batch), kRowThreads, 0, stream>>>(
      prep.student_hat.data_ptr<T>(), ds, prep.teacher_hat.data_ptr<T>(), dt, prep.groups(), math, batch,
      pos_loss.data_ptr<double>(), pos_critical_loss.data_ptr<double>(), pos_critical.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t slots = std::max<int64_t>(n_max, 1);
  at::Tensor neg_loss = at::zeros({slots}, double_options);
  at::Tensor neg_critical = at::full({slots}, -1, long_options);
  at::Tensor neg_loss_grad = at::zeros({slots}, compute_options);
  if (n_max > 0) {
    auto* kernel = selected_pairs_kernel<T, kFmaTiles>;
    if constexpr (std::is_same<T, float>::value) {
      if (tile_math == kWmmaTiles) kernel = selected_pairs_kernel<T, kWmmaTiles>;
      if (tile_math == kMmaTiles) kernel = selected_pairs_kernel<T, kMmaTiles>;
    }
    kernel<<<warp_blocks(n_max), kRowThreads, 0, stream>>>(
        selection.pairs.data_ptr<int64_t>(), hardest ? selection.student.data_ptr<T>() : nullptr,
        prep.student_hat.data_ptr<T>(), ds, prep.teacher_hat.data_ptr<T>(), dt, math, n_max,
        neg_loss.data_ptr<double>(), neg_critical.data_ptr<int64_t>(), neg_loss_grad.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor loss = at::empty({}, compute_options);
  at::Tensor terms = at::empty({2}, compute_options);
  at::Tensor positive_scale = at::empty({}, compute_options);
  at::Tensor negative_scale = at::empty({}, compute_options);
  at::Tensor num_critical_selected = at::empty({}, long_options);
  const at::Tensor num_positive = prep.num_positive.contiguous();
  TermInputs<T> term_inputs{pos_loss.data_ptr<double>(), pos_critical_loss.data_ptr<double>(),
                            pos_critical.data_ptr<int64_t>(), batch, num_positive.data_ptr<int64_t>(),
                            neg_loss.data_ptr<double>(), neg_critical.data_ptr<int64_t>(), n_max,
                            options.positive_weight, options.negative_weight, options.critical_only};
  terms_kernel<T><<<1, kTermThreads, 0, stream>>>(term_inputs, loss.data_ptr<T>(), terms.data_ptr<T>(),
                                       positive_scale.data_ptr<T>(), negative_scale.data_ptr<T>(),
                                       num_critical_selected.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor selected_grads = at::zeros({n_max}, compute_options);
  if (n_max > 0) {
    selected_grads_kernel<T><<<blocks_for(n_max, kRowThreads), kRowThreads, 0, stream>>>(
        neg_critical.data_ptr<int64_t>(), neg_loss_grad.data_ptr<T>(), negative_scale.data_ptr<T>(),
        options.critical_only, n_max, selected_grads.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor num_critical_pairs = at::zeros({}, long_options);
  if (options.compute_critical_ratio) {
    TileParams<T> p{};
    p.pass = kCritical;
    p.batch = batch;
    p.labels = prep.labels.data_ptr<int64_t>();
    p.student_thresholds = student_state.data_ptr<T>();
    p.teacher_thresholds = teacher_state.data_ptr<T>();
    p.num_thresholds = k;
    p.critical_count = reinterpret_cast<ull*>(num_critical_pairs.data_ptr<int64_t>());
    launch_tiles<T>(prep.student_hat, prep.teacher_hat, p, tile_math);
  }

  const at::Tensor counts = at::stack({prep.num_positive, num_negative, selection.num_selected.to(at::kLong),
                                       num_critical_selected, num_critical_pairs});
  // A non-finite batch reads as NaN (a gradient scaler then skips the step).
  loss = at::where(finite, loss, at::full_like(loss, NAN));
  terms = at::where(finite, terms, at::full_like(terms, NAN));  // the terms too, as every backend
  // and the positive scale, which makes the backward's gradient NaN throughout (row_gradient)
  positive_scale = at::where(finite, positive_scale, at::full_like(positive_scale, NAN));
  return {loss, new_student, new_teacher, batch_student, batch_teacher, counts, terms,
          selection.pairs, selected_grads, positive_scale};
}

// ----------------------------------------------------------------------------- backward
//! A warp per row: ekd_math.h's row_gradient over the warp's lanes.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) row_gradient_kernel(RowGradientInputs<T> in, int64_t batch, T* grad) {
  const WarpLanes<T> lanes{int(threadIdx.x % kWarpSize)};
  EKD_FOR_EACH_WARP_ITEM(row, batch) row_gradient(row, in, grad + row * in.student_dim, lanes);
}

template <typename T>
at::Tensor backward_cuda(const at::Tensor& grad_loss, const PreparedInputs& prep, const at::Tensor& student_thresholds,
                         const at::Tensor& teacher_thresholds, const at::Tensor& selected_pairs,
                         const at::Tensor& selected_grads, const at::Tensor& positive_scale, double temperature,
                         bool critical_only, int64_t rank_loss) {
  const int64_t batch = prep.batch();
  const auto dtype = prep.student_hat.scalar_type();
  const auto csr = negatives_by_row(selected_pairs, selected_grads.to(dtype), batch);
  const at::Tensor student_state = student_thresholds.to(dtype).contiguous();
  const at::Tensor teacher_state = teacher_thresholds.to(dtype).contiguous();
  const at::Tensor grad_value = grad_loss.to(dtype).reshape({}).contiguous();
  // The backward reads the positive factor on the device: no host sync.
  const at::Tensor scale = positive_scale.to(dtype).contiguous();
  RowGradientInputs<T> in{prep.student_hat.data_ptr<T>(),
                          prep.student_norms.data_ptr<T>(),
                          prep.teacher_hat.data_ptr<T>(),
                          prep.student_hat.size(1),
                          prep.teacher_hat.size(1),
                          prep.groups(),
                          PairMath<T>{student_state.data_ptr<T>(), teacher_state.data_ptr<T>(), student_state.size(0),
                                      T(temperature), rank_loss},
                          scale.data_ptr<T>(),
                          critical_only,
                          std::get<0>(csr).data_ptr<int64_t>(),
                          std::get<1>(csr).data_ptr<int64_t>(),
                          std::get<2>(csr).data_ptr<T>(),
                          grad_value.data_ptr<T>(),
                          /*precomputed_positive_grad=*/nullptr,
                          /*precomputed_min_group=*/0};
  at::Tensor grad = at::empty_like(prep.student_hat);
  row_gradient_kernel<T><<<warp_blocks(batch), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      in, batch, grad.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

ForwardOutputs ekd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                const at::Tensor& student_thresholds, const at::Tensor& teacher_thresholds,
                                const std::optional<at::Tensor>& random_negative_ranks, const ForwardOptions& options) {
  check_forward_inputs(student, teacher, labels, student_thresholds, teacher_thresholds, random_negative_ranks,
                       options);
  // (check_forward_inputs has checked the optional ranks' device too: no foreign pointer reaches a kernel)
  EKD_CHECK(student.is_cuda(), "ekd_forward: the CUDA kernel got embeddings on ", student.device());
  EKD_CHECK_VALUE(student.size(0) <= kMaxBatch, "the csrc EKD backend on CUDA takes batches of at most B=", kMaxBatch,
                  " (its tile passes launch cdiv(B, ", kTile, ")^2 / 2 blocks on a grid's x dimension, which stops "
                  "at 2^31 - 1), got B=", student.size(0));
  const c10::cuda::CUDAGuard guard(student.device());
  if (student.scalar_type() == at::kDouble)
    return forward_cuda<double>(student, teacher, labels, student_thresholds, teacher_thresholds,
                                random_negative_ranks, options);
  return forward_cuda<float>(student, teacher, labels, student_thresholds, teacher_thresholds, random_negative_ranks,
                             options);
}

at::Tensor ekd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& labels, const at::Tensor& student_thresholds,
                             const at::Tensor& teacher_thresholds, const at::Tensor& selected_pairs,
                             const at::Tensor& selected_grads, const at::Tensor& positive_scale, double temperature,
                             bool critical_only, int64_t rank_loss) {
  // Shapes, dtypes and devices only: the values of selected_pairs stay on the device (reading
  // them would sync with the host); negatives_by_row skips a pair with an index outside [0, B).
  check_backward_inputs(grad_loss, student, teacher, labels, student_thresholds, teacher_thresholds, selected_pairs,
                        selected_grads, positive_scale, temperature, rank_loss);
  // A CUDA argument with CPU embeddings dispatches here too (check_backward_inputs refuses it).
  EKD_CHECK(student.is_cuda(), "ekd_backward: the CUDA kernel got student on ", student.device());
  const c10::cuda::CUDAGuard guard(student.device());
  const PreparedInputs prep = prepare_inputs(student, teacher.to(student.scalar_type()), labels);
  if (student.scalar_type() == at::kDouble)
    return backward_cuda<double>(grad_loss, prep, student_thresholds, teacher_thresholds, selected_pairs,
                                 selected_grads, positive_scale, temperature, critical_only, rank_loss);
  return backward_cuda<float>(grad_loss, prep, student_thresholds, teacher_thresholds, selected_pairs, selected_grads,
                              positive_scale, temperature, critical_only, rank_loss);
}

ForwardOutputs ekd_forward_cuda_op(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                   const at::Tensor& student_thresholds, const at::Tensor& teacher_thresholds,
                                   const std::optional<at::Tensor>& random_negative_ranks,
                                   at::IntArrayRef fpr_numerators, at::IntArrayRef fpr_denominators,
                                   double temperature, int64_t num_hard_negatives, double momentum,
                                   double positive_weight, double negative_weight, bool critical_only,
                                   int64_t rank_loss, bool update_thresholds, bool compute_critical_ratio) {
  const ForwardOptions options =
      make_options(fpr_numerators, fpr_denominators, temperature, num_hard_negatives, momentum, positive_weight,
                   negative_weight, critical_only, rank_loss, update_thresholds, compute_critical_ratio);
  return ekd_forward_cuda(student, teacher, labels, student_thresholds, teacher_thresholds, random_negative_ranks,
                          options);
}

}  // namespace
}  // namespace ekd

TORCH_LIBRARY_IMPL(ekd_kernels, CUDA, m) {
  m.impl("ekd_forward", &ekd::ekd_forward_cuda_op);
  m.impl("ekd_backward", &ekd::ekd_backward_cuda);
}
