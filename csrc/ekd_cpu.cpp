// EKD on the CPU: the stages of reference.py, fused where a CPU gains from it.
//
//   similarity tiles  : ONE B x B buffer holds both models, the student's a_ij above the
//                       diagonal and the teacher's b_ij below it, filled by ATen matmuls on
//                       row tiles (only the triangle that pairs need, half the flops of two Grams).
//   threshold selection: radix selection over order-preserving integer keys of the negatives:
//                       a 16-bit histogram pass, then one pass that collects only the elements of
//                       the few buckets holding a wanted rank; std::nth_element finishes inside
//                       them.  No sort of all pairs.  Up to kDirectSelectMax negatives,
//                       std::nth_element over every key instead (the 65536-bin tables would
//                       cost more than the pairs).
//   pair selection    : the top-N hardest negatives are the elements above the N-th largest key
//                       (collected in the same second pass) plus the first ties in row-major order.
//   rank loss         : positives from the label groups (pair by pair with ekd_math.h, shared
//                       with CUDA; groups of >= kLargeGroup members by per-group matmuls), selected
//                       negatives from the buffer.
//   backward          : sparse, only positives and selected negatives (row_gradient in ekd_math.h).
//
// Determinism: work is cut into a fixed number of row chunks whatever the thread count, integer
// histograms are summed exactly, collected lists are concatenated in chunk order and every float
// reduction runs sequentially in a fixed order.
//
// Limits as B grows: every index, count and rank is int64 (pair offsets i * B + j included), so
// the results are exact at any B; memory is the limit.  The B x B buffer takes B^2 * sizeof(T)
// bytes (fp32: 1 GiB at B = 16384, 16 GiB at 65536, 64 GiB at 131072), a label group of n >=
// kLargeGroup rows two n x n matrices more, and the second radix pass the keys of every negative
// in a wanted 16-bit bucket (few, unless the similarities collapse into one bucket: then up to
// one key per negative and model, as much again as the buffer).  Each is checked against the
// machine's physical memory (or the process's cgroup limit, when lower) before it is allocated:
// a ValueError naming B and the bytes needed,
// rather than a failed allocation or, with overcommitted memory, a process killed while it fills
// the buffer.  The top-N candidates are kept to N per row chunk (the N hardest of the chunk),
// whatever the number of ties at the boundary.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <array>
#include <fstream>
#include <string>
#include <limits>
#include <vector>

#include "ekd_common.h"
#include "lane_emulation.h"

namespace ekd {
namespace {

constexpr int64_t kSimilarityTile = 256;
constexpr int64_t kNumChunks = 64;
constexpr int64_t kCriticalBlock = 64;

// ----------------------------------------------------------------------------- memory
//! Bytes of physical memory (0 when the system does not say: no check then).
double physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return double(pages) * double(page);
#endif
  return 0.0;
}

//! The number a cgroup limit file holds (0 for "max", an unreadable file or anything else).
double read_limit(const std::string& path) {
  std::ifstream file(path);
  std::string text;
  if (!(file >> text) || text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return 0.0;
  return std::strtod(text.c_str(), nullptr);
}

//! The smallest memory limit of this process's cgroup and its ancestors (cgroup v2 memory.max,
//! v1 memory.limit_in_bytes), 0 when there is none.  In a container the machine's memory is not
//! what the process may use: past the limit it is killed, not refused (a v1 "no limit" reads
//! about 2^63, above any machine, and is ignored by the caller's minimum).
double cgroup_memory_limit_bytes() {
  std::ifstream cgroups("/proc/self/cgroup");
  std::string line;
  double limit = 0.0;
  while (std::getline(cgroups, line)) {
    // "hierarchy-ID:controllers:path"; v2 is "0::path", v1 lists "memory" among the controllers
    const size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    std::string path = line.substr(second + 1);
    std::string root, file;
    if (controllers.empty()) {
      root = "/sys/fs/cgroup", file = "memory.max";
    } else if (("," + controllers + ",").find(",memory,") != std::string::npos) {
      root = "/sys/fs/cgroup/memory", file = "memory.limit_in_bytes";
    } else {
      continue;
    }
    while (true) {  // the cgroup, then each ancestor up to the hierarchy's root: any of them limits
      const double here = read_limit(root + path + (path.empty() || path.back() != '/' ? "/" : "") + file);
      if (here > 0.0 && (limit == 0.0 || here < limit)) limit = here;
      if (path.empty() || path == "/") break;
      const size_t slash = path.find_last_of('/');
      path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
    }
  }
  return limit;
}

//! ValueError when `bytes` (what the forward is about to hold) exceed the memory this process
//! may use: the machine's physical memory, or its cgroup's limit when that is lower.
void check_cpu_memory(int64_t batch, double bytes, const char* what) {
  // Read once per process (about 30 us of file reads, a few percent of a small call; a limit
  // that changes while the process runs is not followed)
  static const double physical = physical_memory_bytes(), cgroup = cgroup_memory_limit_bytes();
  const bool limited = cgroup > 0.0 && (physical == 0.0 || cgroup < physical);
  const double usable = limited ? cgroup : physical;
  constexpr double kGiB = double(int64_t(1) << 30);
  EKD_CHECK_VALUE(usable == 0.0 || bytes <= usable, "ekd_forward (CPU): B=", batch, " needs ", bytes / kGiB,
                  " GiB for ", what, ", more than ", limited ? "this process's cgroup memory limit of " :
                  "this machine's ", usable / kGiB,
                  " GiB of memory (the CPU op holds a B x B similarity buffer: B^2 * 4 bytes in fp32); "
                  "the CUDA and Triton backends hold no B x B buffer");
}

// ----------------------------------------------------------------------------- work splitting
//! Boundaries of row chunks holding about equal numbers of pairs.  `upper`: row i owns the pairs
//! (i, j > i); otherwise row j owns (i < j, j).  Fixed for a given B, whatever the thread count.
std::vector<int64_t> balanced_row_chunks(int64_t batch, bool upper) {
  const int64_t total = batch * (batch - 1) / 2;
  const int64_t chunks = std::max<int64_t>(1, std::min(kNumChunks, batch));
  std::vector<int64_t> bounds{0};
  int64_t seen = 0;
  for (int64_t row = 0; row < batch; ++row) {
    seen += upper ? (batch - 1 - row) : row;
    const int64_t next = int64_t(bounds.size());
    if (next < chunks && seen * chunks >= total * next && row + 1 < batch) bounds.push_back(row + 1);
  }
  bounds.push_back(batch);
  return bounds;
}

//! Row chunks of both models in one list (model 0: student rows of the upper triangle, model 1:
//! teacher rows of the lower one), so that each pass over all pairs is ONE parallel region: a
//! fork/join is expensive on a small machine shared with other work.
struct Chunk {
  int model;
  int64_t begin, end;
};

std::vector<Chunk> model_chunks(int64_t batch) {
  std::vector<Chunk> chunks;
  for (int model = 0; model < 2; ++model) {
    const std::vector<int64_t> bounds = balanced_row_chunks(batch, /*upper=*/model == 0);
    for (size_t c = 0; c + 1 < bounds.size(); ++c) chunks.push_back({model, bounds[c], bounds[c + 1]});
  }
  return chunks;
}

template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& fn) {
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c, chunks[c]);
  });
}

// ----------------------------------------------------------------------------- stage 1: normalise
// Plain loops instead of the shared ATen path (ekd_common.cpp, used by CUDA): each small ATen op
// is a parallel region of its own, and on a busy 2-core machine every region waits for a
// descheduled thread.  The math is the same.

//! x / max(||x||, eps) row by row into `out` (contiguous); returns the raw norms and whether every
//! element is finite.  The sum of squares runs in double, in a fixed order.
template <typename T>
bool normalize_rows(const at::Tensor& x, at::Tensor* out, at::Tensor* norms) {
  const at::Tensor in = x.contiguous();
  const int64_t rows = in.size(0), dim = in.size(1);
  *out = at::empty({rows, dim}, in.options());
  *norms = at::empty({rows}, in.options());
  const T* src = in.data_ptr<T>();
  T* dst = out->data_ptr<T>();
  T* norm_out = norms->data_ptr<T>();
  std::vector<char> row_finite(static_cast<size_t>(rows), 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = src + r * dim;
      double squares = 0.0;
      for (int64_t d = 0; d < dim; ++d) squares += double(row[d]) * double(row[d]);
      bool finite = std::isfinite(squares);
      if (!finite) {  // overflow of huge finite values is not "non-finite": look at the elements
        finite = true;
        for (int64_t d = 0; d < dim; ++d) finite = finite && std::isfinite(row[d]);
      }
      row_finite[r] = finite;
      // Rounded to T before the root, as the reference's fp32 norm: a squared norm past the
      // largest T (|x| ~ 1e20 in fp32) is inf there, and the row x / inf = 0 (F.normalize's
      // overflow), which the double sum alone would not reproduce.
      const T norm = std::sqrt(T(squares));
      norm_out[r] = norm;
      const T denominator = norm > T(kNormEps) ? norm : T(kNormEps);
      for (int64_t d = 0; d < dim; ++d) dst[r * dim + d] = row[d] / denominator;
    }
  });
  return std::all_of(row_finite.begin(), row_finite.end(), [](char f) { return f != 0; });
}

//! Label groups (ekd_math.h LabelGroups) by a stable sort of the rows by label.
void group_labels(const at::Tensor& labels, PreparedInputs* p) {
  const int64_t batch = labels.size(0);
  p->labels = labels.to(at::kLong).contiguous();
  const int64_t* label = p->labels.data_ptr<int64_t>();
  const auto long_options = p->labels.options();
  p->order = at::empty({batch}, long_options);
  p->position = at::empty({batch}, long_options);
  p->group_start = at::empty({batch}, long_options);
  p->group_end = at::empty({batch}, long_options);
  int64_t* order = p->order.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i) order[i] = i;
  std::stable_sort(order, order + batch, [&](int64_t x, int64_t y) { return label[x] < label[y]; });
  int64_t* start = p->group_start.data_ptr<int64_t>();
  int64_t* end = p->group_end.data_ptr<int64_t>();
  int64_t* position = p->position.data_ptr<int64_t>();
  int64_t num_positive = 0;
  for (int64_t first = 0; first < batch;) {
    int64_t last = first + 1;
    while (last < batch && label[order[last]] == label[order[first]]) ++last;
    for (int64_t q = first; q < last; ++q) {
      start[q] = first;
      end[q] = last;
      position[order[q]] = q;
    }
    num_positive += (last - first) * (last - first - 1) / 2;
    first = last;
  }
  p->num_positive = at::scalar_tensor(num_positive, long_options);
}

template <typename T>
PreparedInputs prepare_inputs_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                  bool* finite) {
  PreparedInputs p;
  at::Tensor teacher_norms;
  const bool student_finite = normalize_rows<T>(student, &p.student_hat, &p.student_norms);
  const bool teacher_finite = normalize_rows<T>(teacher, &p.teacher_hat, &teacher_norms);
  *finite = student_finite && teacher_finite;
  group_labels(labels, &p);
  return p;
}

// ----------------------------------------------------------------------------- matmuls, any thread count
//! body(begin, end) over [0, n) in ONE parallel region, also for n = 1 (then on one of the
//! region's threads).  Why: an ATen matmul on the calling thread, outside a region, runs MKL on
//! every thread, and MKL's sgemm rounds some shapes differently with its thread count (a 200 x 32
//! Gram at 1 and 8 threads); inside a region each matmul runs on one thread.  So the op's bits do
//! not depend on torch.set_num_threads.
template <typename F>
void in_one_region(int64_t n, const F& body) {
  if (n == 1 && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t) {
      if (begin == 0) body(0, 1);
    });
    return;
  }
  at::parallel_for(0, n, 1, body);
}

//! a @ b in blocks of kSimilarityTile rows of a, each a single-threaded matmul (in_one_region):
//! the same bits for every thread count, and the blocks still share the threads.
at::Tensor blocked_mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  const int64_t blocks = (a.size(0) + kSimilarityTile - 1) / kSimilarityTile;
  in_one_region(blocks, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r0 = w * kSimilarityTile, rows = std::min(kSimilarityTile, a.size(0) - r0);
      at::Tensor part = out.narrow(0, r0, rows);
      at::mm_out(part, a.narrow(0, r0, rows), b);
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- stage 2: similarities
//! The one B x B buffer: buffer[i][j] = a_ij (student) and buffer[j][i] = b_ij (teacher), i < j.
//!
//! Square blocks of the upper triangle (and their mirror for the teacher) are the work items of
//! ONE parallel region (in_one_region: also for one block, B <= 256); each block is a
//! single-threaded ATen matmul writing straight into the buffer (a strided view).  A block's result does not depend on the thread count, and one region
//! instead of one multi-threaded matmul per tile avoids a fork/join per call.
template <typename T>
at::Tensor pair_similarities(const at::Tensor& student_hat, const at::Tensor& teacher_hat) {
  const int64_t batch = student_hat.size(0);
  at::Tensor buffer = at::empty({batch, batch}, student_hat.options());
  T* data = buffer.data_ptr<T>();
  const int64_t blocks = (batch + kSimilarityTile - 1) / kSimilarityTile;
  std::vector<std::array<int64_t, 2>> work;  // (row block, column block), column >= row
  for (int64_t bi = 0; bi < blocks; ++bi)
    for (int64_t bj = bi; bj < blocks; ++bj) work.push_back({bi, bj});
  in_one_region(int64_t(work.size()), [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r0 = work[w][0] * kSimilarityTile, c0 = work[w][1] * kSimilarityTile;
      const int64_t rows = std::min(kSimilarityTile, batch - r0), cols = std::min(kSimilarityTile, batch - c0);
      at::Tensor upper = buffer.narrow(0, r0, rows).narrow(1, c0, cols);
      at::mm_out(upper, student_hat.narrow(0, r0, rows), student_hat.narrow(0, c0, cols).t());
      if (r0 != c0) {
        at::Tensor lower = buffer.narrow(0, c0, cols).narrow(1, r0, rows);
        at::mm_out(lower, teacher_hat.narrow(0, c0, cols), teacher_hat.narrow(0, r0, rows).t());
        continue;
      }
      // A diagonal block holds both models: the teacher's lower half comes through a scratch tile.
      const at::Tensor t_block = teacher_hat.narrow(0, r0, rows);
      const at::Tensor diagonal = at::mm(t_block, t_block.t()).contiguous();
      const T* tile = diagonal.data_ptr<T>();
      for (int64_t i = 1; i < rows; ++i)
        for (int64_t j = 0; j < i; ++j) data[(r0 + i) * batch + r0 + j] = tile[i * rows + j];
    }
  });
  return buffer;
}

// ----------------------------------------------------------------------------- stage 3: thresholds
template <typename T>
struct ModelView {
  const T* buffer;      // the B x B similarity buffer
  int64_t batch;
  bool upper;           // student (above the diagonal) or teacher (below)
  const int64_t* labels;

  //! Calls fn(i, j, value) for the negative pairs owned by `row`, in increasing pair order.
  template <typename F>
  void for_each_negative(int64_t row, const F& fn) const {
    const T* line = buffer + row * batch;
    const int64_t label = labels[row];
    if (upper) {
      for (int64_t col = row + 1; col < batch; ++col)
        if (labels[col] != label) fn(row, col, line[col]);
    } else {
      for (int64_t col = 0; col < row; ++col)
        if (labels[col] != label) fn(col, row, line[col]);
    }
  }
};

template <typename T>
using ModelViews = std::array<ModelView<T>, 2>;  // student, teacher

//! The radix select's 65536-bin tables, kept from call to call by each thread that calls the op.
//! Allocated afresh, their megabytes (a histogram per worker thread and model, the summed
//! histograms, the bucket -> slot maps) came from newly mapped pages every call, as the heap was
//! trimmed back in between: about 600 page faults a call, more time than the counting itself
//! below B of a few hundred (the op was slower than the pure-PyTorch reference at B = 64 on one
//! thread).  Each call overwrites what it reads; what stays allocated is what a call used to
//! allocate: 1 MiB per thread of the pool and 2 MiB, per thread that has called the op.
struct RadixTables {
  std::vector<int64_t> per_thread;                   // threads x 2 models x kRadixBins
  std::array<std::vector<int64_t>, 2> histograms;    // per model, summed over the threads
  std::array<std::vector<int64_t>, 2> slot_of_bucket;  // per model: bucket -> wanted slot, or -1
};

RadixTables& radix_tables() {
  thread_local RadixTables tables;
  return tables;
}

//! First radix round: histograms of the top 16 bits of the negatives' keys, both models in one
//! pass (per-thread integer histograms, summed exactly), into `tables.histograms`.
template <typename T>
void negative_histograms(const ModelViews<T>& views, RadixTables& tables) {
  const int64_t threads = at::get_num_threads();
  const int64_t stride = 2 * kRadixBins;
  // (the calling thread's tables; a worker zeroes its own slice when it takes its first chunk, so
  // a small B, whose few chunks leave most of a large pool idle, zeroes and sums only what it used)
  tables.per_thread.resize(static_cast<size_t>(threads * stride));
  int64_t* per_thread = tables.per_thread.data();
  std::vector<char> used(static_cast<size_t>(threads), 0);
  for_each_chunk(model_chunks(views[0].batch), [&](int64_t, const Chunk& chunk) {
    const int64_t thread = at::get_thread_num();
    EKD_CHECK(thread < threads, "ekd_forward: thread ", thread, " outside the pool of ", threads);
    if (!used[thread]) {
      std::fill(per_thread + thread * stride, per_thread + (thread + 1) * stride, int64_t(0));
      used[thread] = 1;
    }
    int64_t* histogram = per_thread + thread * stride + chunk.model * kRadixBins;
    for (int64_t row = chunk.begin; row < chunk.end; ++row) {
      views[chunk.model].for_each_negative(
          row, [&](int64_t, int64_t, T value) { ++histogram[radix_bucket<T>(order_key(value))]; });
    }
  });
  for (int model = 0; model < 2; ++model) {
    std::vector<int64_t>& histogram = tables.histograms[model];
    histogram.assign(kRadixBins, 0);
    for (int64_t t = 0; t < threads; ++t) {
      if (!used[t]) continue;
      const int64_t* part = per_thread + t * stride + model * kRadixBins;
      for (int64_t b = 0; b < kRadixBins; ++b) histogram[b] += part[b];
    }
  }
}

//! A wanted order statistic: descending rank among the negatives, located in the histogram.
struct RankRequest {
  int64_t rank;
  int64_t bucket;
  int64_t rank_in_bucket;
  int64_t slot;  // index of its bucket among the distinct wanted buckets
};

std::vector<RankRequest> locate_requests(const std::vector<int64_t>& ranks, const std::vector<int64_t>& histogram,
                                         std::vector<int64_t>* slot_of_bucket, int64_t* num_slots) {
  std::vector<RankRequest> requests;
  slot_of_bucket->assign(kRadixBins, -1);
  *num_slots = 0;
  for (int64_t rank : ranks) {
    RankRequest r{rank, -1, 0, -1};
    locate_rank(histogram.data(), rank, &r.bucket, &r.rank_in_bucket);
    if ((*slot_of_bucket)[r.bucket] < 0) (*slot_of_bucket)[r.bucket] = (*num_slots)++;
    r.slot = (*slot_of_bucket)[r.bucket];
    requests.push_back(r);
  }
  return requests;
}

//! A negative pair kept as a top-N candidate: its pair and the key of its student similarity.
template <typename T>
struct Candidate {
  int64_t i, j;
  key_t<T> key;
};

//! Second radix round: the keys of the wanted buckets (per slot) and, for the top-N, every pair
//! in or above the N-th bucket (fewer than N above it), all in row-major order.
template <typename T>
struct Collected {
  std::vector<std::vector<key_t<T>>> keys_by_slot;
  std::vector<Candidate<T>> candidates;
};

//! What the second pass looks for in one model: the slot of each wanted bucket, and (student)
//! the bucket of the N-th largest key, at and above which every pair is a top-N candidate.
struct BucketTable {
  const int64_t* slot_of_bucket = nullptr;  // kRadixBins entries (RadixTables::slot_of_bucket)
  int64_t num_slots = 0;
  int64_t candidate_bucket = -1;
  int64_t candidate_keep = 0;  // N: the top-N candidates a row chunk keeps (its N hardest)
};

//! A chunk's candidate list is cut back to its `keep` hardest once it reaches this length.
int64_t candidate_limit(int64_t keep) { return keep + std::max<int64_t>(keep, 4096); }

//! Keeps the `keep` hardest candidates: larger key first, ties in row-major (i, j) order, the
//! order hardest_negatives takes them in.  Every pair of the global top N is among the N hardest
//! of its chunk (what beats it in the chunk beats it globally), and the ties a chunk keeps are
//! its first ones: the concatenation still yields the global selection (cut ties come after
//! at least N - above kept ones).  Without the cut, collapsed similarities (every pair in the
//! boundary's bucket) would keep all L pairs, 24 bytes each.
template <typename T>
void keep_hardest(std::vector<Candidate<T>>* candidates, int64_t keep) {
  if (int64_t(candidates->size()) <= keep) return;
  std::nth_element(candidates->begin(), candidates->begin() + keep, candidates->end(),
                   [](const Candidate<T>& x, const Candidate<T>& y) {
                     return x.key != y.key ? x.key > y.key : (x.i != y.i ? x.i < y.i : x.j < y.j);
                   });
  candidates->resize(static_cast<size_t>(keep));
}

template <typename T>
std::array<Collected<T>, 2> collect_buckets(const ModelViews<T>& views, const std::array<BucketTable, 2>& tables) {
  const std::vector<Chunk> chunks = model_chunks(views[0].batch);
  std::vector<Collected<T>> per_chunk(chunks.size());
  for_each_chunk(chunks, [&](int64_t c, const Chunk& chunk) {
    const BucketTable& table = tables[chunk.model];
    Collected<T>& out = per_chunk[c];
    out.keys_by_slot.resize(static_cast<size_t>(table.num_slots));
    for (int64_t row = chunk.begin; row < chunk.end; ++row) {
      views[chunk.model].for_each_negative(row, [&](int64_t i, int64_t j, T value) {
        const key_t<T> key = order_key(value);
        const int64_t bucket = radix_bucket<T>(key);
        const int64_t slot = table.slot_of_bucket[bucket];
        if (slot >= 0) out.keys_by_slot[slot].push_back(key);
        if (table.candidate_bucket >= 0 && bucket >= table.candidate_bucket) {
          out.candidates.push_back({i, j, key});
          if (int64_t(out.candidates.size()) >= candidate_limit(table.candidate_keep))
            keep_hardest(&out.candidates, table.candidate_keep);
        }
      });
    }
    if (table.candidate_bucket >= 0) {  // back to row-major order after the cuts
      keep_hardest(&out.candidates, table.candidate_keep);
      std::sort(out.candidates.begin(), out.candidates.end(), [](const Candidate<T>& x, const Candidate<T>& y) {
        return x.i != y.i ? x.i < y.i : x.j < y.j;
      });
    }
  });
  // Concatenated in chunk order: row-major order whatever the thread count.
  std::array<Collected<T>, 2> all;
  for (int model = 0; model < 2; ++model) all[model].keys_by_slot.resize(static_cast<size_t>(tables[model].num_slots));
  for (size_t c = 0; c < chunks.size(); ++c) {
    Collected<T>& into = all[chunks[c].model];
    Collected<T>& part = per_chunk[c];
    for (size_t s = 0; s < part.keys_by_slot.size(); ++s) {
      into.keys_by_slot[s].insert(into.keys_by_slot[s].end(), part.keys_by_slot[s].begin(), part.keys_by_slot[s].end());
      std::vector<key_t<T>>().swap(part.keys_by_slot[s]);  // freed as soon as copied
    }
    into.candidates.insert(into.candidates.end(), part.candidates.begin(), part.candidates.end());
  }
  return all;
}

//! The exact key of each request, by selection inside its bucket.
template <typename T>
std::vector<key_t<T>> select_keys(const std::vector<RankRequest>& requests, Collected<T>& collected) {
  std::vector<key_t<T>> keys;
  for (const RankRequest& r : requests) {
    std::vector<key_t<T>>& bucket = collected.keys_by_slot[r.slot];
    const int64_t ascending = int64_t(bucket.size()) - 1 - r.rank_in_bucket;
    std::nth_element(bucket.begin(), bucket.begin() + ascending, bucket.end());
    keys.push_back(bucket[ascending]);
  }
  return keys;
}

//! Descending ranks m_k = floor(L * fpr_k) of the K thresholds.
std::vector<int64_t> threshold_ranks(int64_t num_negatives, const ForwardOptions& options) {
  std::vector<int64_t> ranks;
  for (int64_t k = 0; k < options.num_thresholds(); ++k)
    ranks.push_back(threshold_index(num_negatives, options.fpr_numerators[k], options.fpr_denominators[k]));
  return ranks;
}

//! The batch thresholds of one model (NaN when there is no negative) and, for the student, the
//! key of the top-N boundary rank with the top-N candidates.
template <typename T>
struct ModelSelection {
  std::vector<T> batch_thresholds;
  key_t<T> boundary_key = 0;
  std::vector<Candidate<T>> candidates;
};

//! The most negatives (L) that stage 3 selects directly rather than by the radix select: below
//! a few thousand pairs the radix select's 65536-bin tables (clearing, summing, scanning them)
//! cost more than the pairs (about 150 us a call at B = 4, on one thread), while the direct
//! selection costs O(L) per wanted rank.  EKD_CPU_DIRECT_SELECT_MAX overrides it (the tests set
//! 0, the radix select at every L, to compare the two bit for bit).
constexpr int64_t kDirectSelectMax = 8192;

int64_t direct_select_max() {
  const char* setting = std::getenv("EKD_CPU_DIRECT_SELECT_MAX");
  if (setting == nullptr || *setting == '\0') return kDirectSelectMax;
  char* end = nullptr;
  const long long value = std::strtoll(setting, &end, 10);
  EKD_CHECK_VALUE(*end == '\0' && value >= 0, "EKD_CPU_DIRECT_SELECT_MAX must be a non-negative integer, got '",
                  setting, "'");
  return int64_t(value);
}

//! Stage 3 without the radix select, for few negatives: every key in row-major order, then each
//! wanted rank by nth_element; the student's top-N candidates are the pairs at or above the
//! boundary key, in row-major order.  The same keys as the radix select (order statistics are
//! unique) and the same candidates for hardest_negatives, which takes those above the boundary
//! and the first ties in row-major order either way.
template <typename T>
std::array<ModelSelection<T>, 2> select_directly(const ModelViews<T>& views, const ForwardOptions& options,
                                                 int64_t boundary_rank, int64_t num_negatives) {
  std::array<ModelSelection<T>, 2> out;
  for (int model = 0; model < 2; ++model) {
    const bool with_boundary = model == 0 && boundary_rank >= 0;
    std::vector<key_t<T>> keys;
    std::vector<Candidate<T>> pairs;  // (the student's, for the candidates)
    keys.reserve(static_cast<size_t>(num_negatives));
    if (with_boundary) pairs.reserve(static_cast<size_t>(num_negatives));
    for (int64_t row = 0; row < views[model].batch; ++row) {
      views[model].for_each_negative(row, [&](int64_t i, int64_t j, T value) {
        keys.push_back(order_key(value));
        if (with_boundary) pairs.push_back({i, j, keys.back()});
      });
    }
    // (rows in turn give row-major order for the student, whose row i owns (i, j > i); the
    // teacher's order does not matter: only its keys are selected)
    std::vector<int64_t> ranks = threshold_ranks(int64_t(keys.size()), options);
    if (with_boundary) ranks.push_back(boundary_rank);
    std::vector<key_t<T>> selected;
    for (int64_t rank : ranks) {  // descending rank r is ascending position L - 1 - r
      const auto at = keys.begin() + (int64_t(keys.size()) - 1 - rank);
      std::nth_element(keys.begin(), at, keys.end());
      selected.push_back(*at);
    }
    for (int64_t k = 0; k < options.num_thresholds(); ++k)
      out[model].batch_thresholds.push_back(value_of_key<T>(selected[k]));
    if (with_boundary) {
      out[model].boundary_key = selected.back();
      for (const Candidate<T>& c : pairs)
        if (c.key >= out[model].boundary_key) out[model].candidates.push_back(c);
    }
  }
  return out;
}

//! Stage 3 for both models: two passes over the pairs (histograms, then the wanted buckets), or
//! for few negatives the direct selection above.  `boundary_rank` >= 0 also selects the
//! student's key of that rank (the top-N boundary).  `num_negatives`: L, from the label groups.
template <typename T>
std::array<ModelSelection<T>, 2> select_thresholds(const ModelViews<T>& views, const ForwardOptions& options,
                                                   int64_t boundary_rank, int64_t num_negatives) {
  std::array<ModelSelection<T>, 2> out;
  if (num_negatives == 0) {
    for (auto& model : out) model.batch_thresholds.assign(static_cast<size_t>(options.num_thresholds()), T(NAN));
    return out;
  }
  if (num_negatives <= direct_select_max()) return select_directly(views, options, boundary_rank, num_negatives);
  RadixTables& radix = radix_tables();
  negative_histograms(views, radix);
  const std::array<std::vector<int64_t>, 2>& histograms = radix.histograms;
  std::array<std::vector<RankRequest>, 2> requests;
  std::array<BucketTable, 2> tables;
  for (int model = 0; model < 2; ++model) {
    std::vector<int64_t> ranks = threshold_ranks(num_negatives, options);
    const bool with_boundary = model == 0 && boundary_rank >= 0;
    if (with_boundary) ranks.push_back(boundary_rank);
    requests[model] =
        locate_requests(ranks, histograms[model], &radix.slot_of_bucket[model], &tables[model].num_slots);
    tables[model].slot_of_bucket = radix.slot_of_bucket[model].data();
    if (with_boundary) {
      tables[model].candidate_bucket = requests[model].back().bucket;
      tables[model].candidate_keep = boundary_rank + 1;
    }
  }
  // What the second pass will hold, known from the histograms: the keys of the wanted buckets
  // (twice while the chunks' lists are concatenated) and the candidates, beside the buffer.
  double collected_bytes = 0.0;
  for (int model = 0; model < 2; ++model)
    for (int64_t b = 0; b < kRadixBins; ++b)
      if (tables[model].slot_of_bucket[b] >= 0)
        collected_bytes += 2.0 * double(histograms[model][b]) * sizeof(key_t<T>);
  if (tables[0].candidate_bucket >= 0) {
    double at_or_above = 0.0;
    for (int64_t b = tables[0].candidate_bucket; b < kRadixBins; ++b) at_or_above += double(histograms[0][b]);
    const double most = double(kNumChunks) * double(candidate_limit(tables[0].candidate_keep));
    collected_bytes += 2.0 * std::min(at_or_above, most) * sizeof(Candidate<T>);
  }
  const int64_t batch = views[0].batch;
  check_cpu_memory(batch, double(batch) * double(batch) * sizeof(T) + collected_bytes,
                   "its B x B similarity buffer and the keys of the negatives in the wanted radix buckets (all of "
                   "them when the similarities collapse into one bucket)");
  std::array<Collected<T>, 2> collected = collect_buckets(views, tables);
  for (int model = 0; model < 2; ++model) {
    const std::vector<key_t<T>> keys = select_keys(requests[model], collected[model]);
    for (int64_t k = 0; k < options.num_thresholds(); ++k)
      out[model].batch_thresholds.push_back(value_of_key<T>(keys[k]));
    if (model == 0 && boundary_rank >= 0) {
      out[model].boundary_key = keys.back();
      out[model].candidates = std::move(collected[model].candidates);
    }
  }
  return out;
}

// ----------------------------------------------------------------------------- stage 4: selection
//! The n hardest negatives: every candidate above the n-th largest key, then ties at that key
//! in row-major order until n (the authors' unstable sort leaves the tie order unspecified).
template <typename T>
std::vector<std::array<int64_t, 2>> hardest_negatives(const std::vector<Candidate<T>>& candidates,
                                                       key_t<T> boundary_key, int64_t count) {
  std::vector<std::array<int64_t, 2>> selected;
  int64_t above = 0;
  for (const Candidate<T>& c : candidates) above += c.key > boundary_key;
  int64_t ties_wanted = count - above;
  for (const Candidate<T>& c : candidates) {
    if (c.key > boundary_key) {
      selected.push_back({c.i, c.j});
    } else if (c.key == boundary_key && ties_wanted > 0) {
      selected.push_back({c.i, c.j});
      --ties_wanted;
    }
  }
  return selected;
}

//! Pairs of the random selection: the reference's randperm ranks (drawn in Python) index the
//! negatives enumerated in row-major order of (i, j), i < j.
std::vector<std::array<int64_t, 2>> negatives_at_ranks(const at::Tensor& ranks, const int64_t* labels,
                                                       const LabelGroups& groups, int64_t batch) {
  // row_start[i]: rank of row i's first negative (its negatives are the later rows of other labels).
  std::vector<int64_t> row_start(static_cast<size_t>(batch + 1), 0);
  for (int64_t row = 0; row < batch; ++row) {
    const int64_t p = groups.position[row];
    const int64_t later_positives = groups.group_end[p] - p - 1;
    row_start[row + 1] = row_start[row] + (batch - 1 - row) - later_positives;
  }
  std::vector<std::array<int64_t, 2>> selected;
  const at::Tensor r = ranks.contiguous();
  const int64_t* rank_data = r.data_ptr<int64_t>();
  for (int64_t e = 0; e < r.size(0); ++e) {
    const int64_t rank = rank_data[e];
    EKD_CHECK(rank >= 0 && rank < row_start[batch], "ekd_forward: random negative rank ", rank, " out of range");
    int64_t row = 0, col = 0;
    negative_at_rank(rank, row_start.data(), labels, batch, &row, &col);
    selected.push_back({row, col});
  }
  return selected;
}

// ----------------------------------------------------------------------------- stage 5: rank loss
struct TermSums {
  double loss_sum = 0.0;
  double critical_loss_sum = 0.0;
  int64_t num_pairs = 0;
  int64_t num_critical = 0;

  //! Mean over the included pairs (critical ones in the Eq. 5 variant), 0 when there are none.
  double mean(bool critical_only) const {
    const int64_t n = critical_only ? num_critical : num_pairs;
    if (n == 0) return 0.0;
    return (critical_only ? critical_loss_sum : loss_sum) / double(n);
  }
  //! d term / d (pair loss) of an included pair.
  double pair_weight(bool critical_only) const {
    const int64_t n = critical_only ? num_critical : num_pairs;
    return n == 0 ? 0.0 : 1.0 / double(n);
  }
};

// Positives are visited pair by pair (ekd_math.h, as on CUDA) in small identity groups; a group
// of at least kLargeGroup members is done by two small matmuls instead (its pairs cost n^2 D
// either way, but BLAS runs it many times faster).  Forward and backward compute the group's
// similarities by the same matmuls, so they agree on every value and every critical mask.
constexpr int64_t kLargeGroup = 32;

//! Sorted-position ranges [first, last) of the groups with at least `min_size` members.
std::vector<std::array<int64_t, 2>> large_groups(const PreparedInputs& prep, int64_t min_size = kLargeGroup) {
  std::vector<std::array<int64_t, 2>> out;
  const LabelGroups g = prep.groups();
  for (int64_t q = 0; q < prep.batch(); q = g.group_end[q])
    if (g.group_end[q] - q >= min_size) out.push_back({q, g.group_end[q]});
  return out;
}

//! A large group's rows (ascending) and the two similarity matrices of its members.
struct GroupSimilarities {
  at::Tensor rows, student_rows, student, teacher;
};

GroupSimilarities group_similarities(const PreparedInputs& prep, const std::array<int64_t, 2>& range) {
  GroupSimilarities g;
  g.rows = prep.order.narrow(0, range[0], range[1] - range[0]);
  g.student_rows = prep.student_hat.index_select(0, g.rows);
  const at::Tensor teacher_rows = prep.teacher_hat.index_select(0, g.rows);
  g.student = blocked_mm(g.student_rows, g.student_rows.t());  // (any thread count: blocked_mm)
  g.teacher = blocked_mm(teacher_rows, teacher_rows.t());
  return g;
}

template <typename T>
TermSums positive_sums(const PreparedInputs& prep, const PairMath<T>& math, int64_t num_positive) {
  const int64_t batch = prep.batch();
  const T* s_hat = prep.student_hat.data_ptr<T>();
  const T* t_hat = prep.teacher_hat.data_ptr<T>();
  const int64_t ds = prep.student_hat.size(1);
  const int64_t dt = prep.teacher_hat.size(1);
  const LabelGroups groups = prep.groups();
  std::vector<PositiveRowSums<T>> rows(static_cast<size_t>(batch), PositiveRowSums<T>{0.0, 0.0, 0});
  // The tests' emulation of the CUDA op's warp per row takes every group by the pair loop, as CUDA does.
  const int lanes = emulated_lanes();
  const int64_t large_group = lanes == 0 ? kLargeGroup : std::numeric_limits<int64_t>::max();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = groups.position[row];
      if (groups.group_end[p] - groups.group_start[p] >= large_group) continue;
      if (lanes == 0) {
        rows[row] = positive_row_sums(row, s_hat, ds, t_hat, dt, groups, math);
        continue;
      }
      run_emulated_lanes<T>(lanes, [&](const EmulatedLanes<T>& l) {
        const PositiveRowSums<T> sums = positive_row_sums(row, s_hat, ds, t_hat, dt, groups, math, l);
        if (l.lane == 0) rows[row] = sums;  // as the CUDA kernel: lane 0 writes
      });
    }
  });
  TermSums sums;
  sums.num_pairs = num_positive;
  for (const PositiveRowSums<T>& r : rows) {  // fixed order: deterministic
    sums.loss_sum += r.loss_sum;
    sums.critical_loss_sum += r.critical_loss_sum;
    sums.num_critical += r.num_critical;
  }
  for (const auto& range : large_groups(prep, large_group)) {  // group order, then member order: deterministic
    const GroupSimilarities g = group_similarities(prep, range);
    const int64_t n = range[1] - range[0];
    const T* a = g.student.data_ptr<T>();
    const T* b = g.teacher.data_ptr<T>();
    std::vector<PositiveRowSums<T>> members(static_cast<size_t>(n), PositiveRowSums<T>{0.0, 0.0, 0});
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        PositiveRowSums<T>& out = members[p];
        for (int64_t q = p + 1; q < n; ++q) {
          const T loss = pair_loss(a[p * n + q], b[p * n + q], math);
          out.loss_sum += double(loss);
          if (is_critical(a[p * n + q], b[p * n + q], math)) {
            out.critical_loss_sum += double(loss);
            out.num_critical += 1;
          }
        }
      }
    });
    for (const PositiveRowSums<T>& m : members) {
      sums.loss_sum += m.loss_sum;
      sums.critical_loss_sum += m.critical_loss_sum;
      sums.num_critical += m.num_critical;
    }
  }
  return sums;
}

//! sum_j g_ij * s_hat_j over the positives of every row of a large group (B x Ds, zero elsewhere),
//! by one matmul per group; each pair's g from the upper triangle so both rows use one value.
template <typename T>
at::Tensor large_group_positive_grad(const PreparedInputs& prep, const PairMath<T>& math, T positive_scale,
                                     bool critical_only) {
  const std::vector<std::array<int64_t, 2>> ranges = large_groups(prep);
  if (ranges.empty() || positive_scale == T(0)) return at::Tensor();
  at::Tensor out = at::zeros_like(prep.student_hat);
  for (const auto& range : ranges) {
    const GroupSimilarities g = group_similarities(prep, range);
    const int64_t n = range[1] - range[0];
    const T* a = g.student.data_ptr<T>();
    const T* b = g.teacher.data_ptr<T>();
    at::Tensor coefficients = at::zeros({n, n}, prep.student_hat.options());
    T* c = coefficients.data_ptr<T>();
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {  // member p owns the pairs (p, q > p)
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t q = p + 1; q < n; ++q) {
          const T sa = a[p * n + q], sb = b[p * n + q];
          const bool included = !critical_only || is_critical(sa, sb, math);
          c[p * n + q] = c[q * n + p] = included ? positive_scale * pair_loss_grad(sa, sb, math) : T(0);
        }
      }
    });
    out.index_copy_(0, g.rows, blocked_mm(coefficients, g.student_rows));
  }
  return out;
}

//! Critical pairs among all pairs (compute_critical_ratio), read from the buffer in square
//! blocks so that the teacher's transposed reads stay in cache.
template <typename T>
int64_t count_critical_pairs(const T* buffer, int64_t batch, const PairMath<T>& math) {
  const int64_t blocks = (batch + kCriticalBlock - 1) / kCriticalBlock;
  std::vector<int64_t> per_block_row(static_cast<size_t>(blocks), 0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      int64_t count = 0;
      const int64_t i0 = bi * kCriticalBlock, i1 = std::min(batch, i0 + kCriticalBlock);
      for (int64_t j0 = i0; j0 < batch; j0 += kCriticalBlock) {
        const int64_t j1 = std::min(batch, j0 + kCriticalBlock);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j)
            count += is_critical(buffer[i * batch + j], buffer[j * batch + i], math);
      }
      per_block_row[bi] = count;
    }
  });
  int64_t total = 0;
  for (int64_t c : per_block_row) total += c;
  return total;
}

template <typename T>
std::vector<T> host_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(c10::CppTypeToScalarType<T>::value).contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

// ----------------------------------------------------------------------------- the whole forward
template <typename T>
ForwardOutputs forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                           const at::Tensor& student_thresholds, const at::Tensor& teacher_thresholds,
                           const std::optional<at::Tensor>& random_negative_ranks, const ForwardOptions& options) {
  bool all_finite_host = true;
  const PreparedInputs prep = prepare_inputs_cpu<T>(student, teacher, labels, &all_finite_host);
  const int64_t batch = prep.batch();
  const int64_t num_positive = prep.num_positive.item<int64_t>();
  const int64_t num_negative = batch * (batch - 1) / 2 - num_positive;
  const bool hardest = !random_negative_ranks.has_value();
  const int64_t num_selected =
      hardest ? std::min(options.num_hard_negatives, num_negative) : random_negative_ranks->size(0);
  const int64_t* label_data = prep.labels.data_ptr<int64_t>();

  // Stages 2-3: similarities, batch thresholds, and the top-N boundary for the student.  The
  // buffer, and the n x n matrices of the largest label group that positive_sums multiplies out
  // while it is held, must fit in memory (see the top of the file).
  int64_t largest_group = 0;
  for (const auto& range : large_groups(prep)) largest_group = std::max(largest_group, range[1] - range[0]);
  check_cpu_memory(batch,
                   (double(batch) * double(batch) + 2.0 * double(largest_group) * double(largest_group)) * sizeof(T),
                   "its B x B similarity buffer (and the n x n similarities of its largest label group)");
  const at::Tensor buffer = pair_similarities<T>(prep.student_hat, prep.teacher_hat);
  const T* sims = buffer.data_ptr<T>();
  const ModelViews<T> views{ModelView<T>{sims, batch, /*upper=*/true, label_data},
                            ModelView<T>{sims, batch, /*upper=*/false, label_data}};
  const int64_t boundary_rank = hardest && num_selected > 0 ? num_selected - 1 : -1;
  const std::array<ModelSelection<T>, 2> selections = select_thresholds(views, options, boundary_rank, num_negative);
  const ModelSelection<T>& student_sel = selections[0];
  const ModelSelection<T>& teacher_sel = selections[1];

  const at::TensorOptions state_options = student_thresholds.options();
  const at::TensorOptions compute_options = prep.student_hat.options();
  // A non-finite batch's statistics read as NaN (batch thresholds and terms), as on every backend.
  const auto batch_values = [&](const ModelSelection<T>& sel) {
    const at::Tensor values = at::tensor(sel.batch_thresholds, compute_options).to(state_options.dtype());
    return all_finite_host ? values : at::full_like(values, NAN);
  };
  const at::Tensor batch_student = batch_values(student_sel);
  const at::Tensor batch_teacher = batch_values(teacher_sel);
  const at::Tensor finite = at::scalar_tensor(all_finite_host, at::TensorOptions().dtype(at::kBool));
  const at::Tensor valid = at::logical_and(finite, at::scalar_tensor(num_negative > 0 && options.update_thresholds,
                                                                     finite.options()));
  const at::Tensor new_student = ema_update(student_thresholds, batch_student, options.momentum, valid);
  const at::Tensor new_teacher = ema_update(teacher_thresholds, batch_teacher, options.momentum, valid);
  // The loss uses the state after this call's update, as the authors do.
  const std::vector<T> student_state = host_vector<T>(new_student);
  const std::vector<T> teacher_state = host_vector<T>(new_teacher);
  const PairMath<T> math{student_state.data(), teacher_state.data(), options.num_thresholds(),
                         T(options.temperature), options.rank_loss};

  // Stage 4: the distilled negatives.
  const std::vector<std::array<int64_t, 2>> selected =
      hardest ? hardest_negatives(student_sel.candidates, student_sel.boundary_key, num_selected)
              : negatives_at_ranks(*random_negative_ranks, label_data, prep.groups(), batch);

  // Stage 5: the two terms, and d loss / d a of every selected negative.
  const TermSums positives = positive_sums(prep, math, num_positive);
  TermSums negatives;
  negatives.num_pairs = int64_t(selected.size());
  std::vector<T> loss_grad_selected;  // d pair loss / d a, scaled below once the term's weight is known
  std::vector<bool> critical_selected;
  for (const auto& pair : selected) {
    const T a = sims[pair[0] * batch + pair[1]];
    const T b = sims[pair[1] * batch + pair[0]];
    const PairLossAndGrad<T> both = pair_loss_and_grad(a, b, math);
    const bool critical = is_critical(a, b, math);
    negatives.loss_sum += double(both.loss);
    negatives.critical_loss_sum += critical ? double(both.loss) : 0.0;
    negatives.num_critical += critical;
    loss_grad_selected.push_back(both.grad);
    critical_selected.push_back(critical);
  }
  const T positive_term = T(positives.mean(options.critical_only));
  const T negative_term = T(negatives.mean(options.critical_only));
  T loss = T(options.positive_weight) * positive_term + T(options.negative_weight) * negative_term;

  const int64_t n_max = max_selected(batch, options.num_hard_negatives);
  at::Tensor selected_pairs = at::full({n_max, 2}, -1, prep.labels.options());
  at::Tensor selected_grads = at::zeros({n_max}, compute_options);
  const T negative_scale = T(options.negative_weight * negatives.pair_weight(options.critical_only));
  int64_t* pair_out = selected_pairs.data_ptr<int64_t>();
  T* grad_out = selected_grads.data_ptr<T>();
  for (size_t p = 0; p < selected.size(); ++p) {
    pair_out[2 * p] = selected[p][0];
    pair_out[2 * p + 1] = selected[p][1];
    const bool included = !options.critical_only || critical_selected[p];
    grad_out[p] = included ? negative_scale * loss_grad_selected[p] : T(0);
  }
  // A non-finite batch: NaN, which makes the backward's gradient NaN throughout (row_gradient).
  const T positive_scale =
      all_finite_host ? T(options.positive_weight * positives.pair_weight(options.critical_only)) : T(NAN);

  const int64_t num_critical_pairs =
      options.compute_critical_ratio ? count_critical_pairs(sims, batch, math) : int64_t(0);
  const at::Tensor counts =
      at::tensor(std::vector<int64_t>{num_positive, num_negative, num_selected,
                                      positives.num_critical + negatives.num_critical, num_critical_pairs},
                 prep.labels.options());
  at::Tensor loss_tensor = at::scalar_tensor(loss, compute_options);
  // A non-finite batch reads as NaN (a gradient scaler then skips the step).
  loss_tensor = at::where(finite, loss_tensor, at::full_like(loss_tensor, NAN));
  // The terms too, as every backend reports them (reference.py).
  at::Tensor terms = at::tensor(std::vector<T>{positive_term, negative_term}, compute_options);
  terms = at::where(finite, terms, at::full_like(terms, NAN));
  return {loss_tensor, new_student, new_teacher, batch_student, batch_teacher, counts, terms,
          selected_pairs, selected_grads, at::scalar_tensor(positive_scale, compute_options)};
}

ForwardOutputs ekd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                               const at::Tensor& student_thresholds, const at::Tensor& teacher_thresholds,
                               const std::optional<at::Tensor>& random_negative_ranks, at::IntArrayRef fpr_numerators,
                               at::IntArrayRef fpr_denominators, double temperature, int64_t num_hard_negatives,
                               double momentum, double positive_weight, double negative_weight, bool critical_only,
                               int64_t rank_loss, bool update_thresholds, bool compute_critical_ratio) {
  const ForwardOptions options =
      make_options(fpr_numerators, fpr_denominators, temperature, num_hard_negatives, momentum, positive_weight,
                   negative_weight, critical_only, rank_loss, update_thresholds, compute_critical_ratio);
  check_forward_inputs(student, teacher, labels, student_thresholds, teacher_thresholds, random_negative_ranks,
                       options);
  if (student.scalar_type() == at::kDouble)
    return forward_cpu<double>(student, teacher, labels, student_thresholds, teacher_thresholds,
                               random_negative_ranks, options);
  return forward_cpu<float>(student, teacher, labels, student_thresholds, teacher_thresholds, random_negative_ranks,
                            options);
}

// ----------------------------------------------------------------------------- backward
//! The selected negatives as CSR over rows, both directions of each pair, in pair order inside
//! a row (a counting sort): the backward then sums every row in a fixed order.
template <typename T>
struct NegativesByRow {
  std::vector<int64_t> offsets, other;
  std::vector<T> grads;
};

template <typename T>
NegativesByRow<T> negatives_by_row_cpu(const at::Tensor& selected_pairs, const at::Tensor& selected_grads,
                                       int64_t batch) {
  const at::Tensor pairs = selected_pairs.contiguous();
  const at::Tensor grads = selected_grads.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const int64_t* pair = pairs.data_ptr<int64_t>();
  const T* grad = grads.data_ptr<T>();
  const int64_t count = pairs.size(0);
  NegativesByRow<T> out;
  out.offsets.assign(static_cast<size_t>(batch + 1), 0);
  for (int64_t p = 0; p < count; ++p) {
    // The values index the rows: a pair of rows in [0, B), or -1 -1 (an unfilled slot).
    const int64_t i = pair[2 * p], j = pair[2 * p + 1];
    const bool padding = i == -1 && j == -1;
    EKD_CHECK_VALUE(padding || (i >= 0 && i < batch && j >= 0 && j < batch), "ekd_backward: selected_pairs[", p,
                    "] = (", i, ", ", j, ") is neither a pair of rows in [0, B = ", batch,
                    ") nor the unfilled slot (-1, -1)");
  }
  for (int64_t p = 0; p < count; ++p) {
    if (pair[2 * p] < 0) continue;  // padding
    ++out.offsets[pair[2 * p] + 1];
    ++out.offsets[pair[2 * p + 1] + 1];
  }
  for (int64_t r = 0; r < batch; ++r) out.offsets[r + 1] += out.offsets[r];
  out.other.resize(static_cast<size_t>(out.offsets[batch]));
  out.grads.resize(static_cast<size_t>(out.offsets[batch]));
  std::vector<int64_t> fill(out.offsets.begin(), out.offsets.end() - 1);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t i = pair[2 * p], j = pair[2 * p + 1];
    if (i < 0) continue;
    out.other[fill[i]] = j;
    out.grads[fill[i]++] = grad[p];
    out.other[fill[j]] = i;
    out.grads[fill[j]++] = grad[p];
  }
  return out;
}

template <typename T>
at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                        const at::Tensor& labels, const at::Tensor& student_thresholds,
                        const at::Tensor& teacher_thresholds, const at::Tensor& selected_pairs,
                        const at::Tensor& selected_grads, const at::Tensor& positive_scale, double temperature,
                        bool critical_only, int64_t rank_loss) {
  bool finite = true;
  const PreparedInputs prep = prepare_inputs_cpu<T>(student, teacher, labels, &finite);
  const int64_t batch = prep.batch();
  const NegativesByRow<T> csr = negatives_by_row_cpu<T>(selected_pairs, selected_grads, batch);
  const std::vector<T> student_state = host_vector<T>(student_thresholds);
  const std::vector<T> teacher_state = host_vector<T>(teacher_thresholds);
  const T grad_value = host_vector<T>(grad_loss.reshape({-1}))[0];
  const T positive_scale_value = host_vector<T>(positive_scale.reshape({-1}))[0];
  RowGradientInputs<T> in{prep.student_hat.data_ptr<T>(),
                                prep.student_norms.data_ptr<T>(),
                                prep.teacher_hat.data_ptr<T>(),
                                prep.student_hat.size(1),
                                prep.teacher_hat.size(1),
                                prep.groups(),
                                PairMath<T>{student_state.data(), teacher_state.data(),
                                            int64_t(student_state.size()), T(temperature), rank_loss},
                                &positive_scale_value,
                                critical_only,
                                csr.offsets.data(),
                                csr.other.data(),
                                csr.grads.data(),
                                &grad_value,
                                /*precomputed_positive_grad=*/nullptr,
                                /*precomputed_min_group=*/0};
  at::Tensor grad = at::empty_like(prep.student_hat);
  T* out = grad.data_ptr<T>();
  // The tests' emulation of the CUDA op's warp per row takes every group by the pair loop, as CUDA does.
  const int lanes = emulated_lanes();
  const at::Tensor large = lanes == 0 ? large_group_positive_grad<T>(prep, in.math, positive_scale_value, critical_only)
                                      : at::Tensor();
  if (large.defined()) {
    in.precomputed_positive_grad = large.data_ptr<T>();
    in.precomputed_min_group = kLargeGroup;
  }
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (lanes == 0) {
        row_gradient(row, in, out + row * in.student_dim);
      } else {
        run_emulated_lanes<T>(lanes,
                              [&](const EmulatedLanes<T>& l) { row_gradient(row, in, out + row * in.student_dim, l); });
      }
    }
  });
  return grad;
}

at::Tensor ekd_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& labels, const at::Tensor& student_thresholds,
                            const at::Tensor& teacher_thresholds, const at::Tensor& selected_pairs,
                            const at::Tensor& selected_grads, const at::Tensor& positive_scale, double temperature,
                            bool critical_only, int64_t rank_loss) {
  // Shapes, dtypes and devices here; the values of selected_pairs in negatives_by_row_cpu.
  check_backward_inputs(grad_loss, student, teacher, labels, student_thresholds, teacher_thresholds, selected_pairs,
                        selected_grads, positive_scale, temperature, rank_loss);
  const at::Tensor teacher_c = teacher.to(student.scalar_type());
  if (student.scalar_type() == at::kDouble)
    return backward_cpu<double>(grad_loss, student, teacher_c, labels, student_thresholds, teacher_thresholds,
                                selected_pairs, selected_grads, positive_scale, temperature, critical_only, rank_loss);
  return backward_cpu<float>(grad_loss, student, teacher_c, labels, student_thresholds, teacher_thresholds,
                             selected_pairs, selected_grads, positive_scale, temperature, critical_only, rank_loss);
}

}  // namespace
}  // namespace ekd

TORCH_LIBRARY_IMPL(ekd_kernels, CPU, m) {
  m.impl("ekd_forward", &ekd::ekd_forward_cpu);
  m.impl("ekd_backward", &ekd::ekd_backward_cpu);
}
