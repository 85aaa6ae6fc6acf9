// The CUDA op's warp per row, emulated on the CPU for the tests (CI has no GPU).
//
// On CUDA a warp takes a row (or a selected pair): ekd_math.h's positive_row_sums and
// row_gradient run on its 32 lanes through WarpLanes (ekd_cuda.cu), lane l taking features
// l, l + 32, ... and writing only its own features of the row's accumulator, the dots ending
// in a butterfly of __shfl_xor_sync.  With EKD_CPU_EMULATE_LANES=<n> in the environment (a
// power of two, 1 ... 32) the CPU op runs the same per-row code with n threads standing for the
// lanes: EmulatedLanes exchanges the partial sums through shared memory between two barriers
// and adds them in the butterfly's order.  What CI then checks against the reference is the lane
// logic (the striding, each lane's own features, the dots every lane must see whole); lanes
// whose control flow diverges (one reaching a dot the others skip, a hang on a GPU) fail
// with an error instead.  A testing aid, slow (a thread per lane per row): never for real use.
#pragma once

#include "check.h"

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ekd {

//! 0 (off) or the number of emulated lanes that EKD_CPU_EMULATE_LANES asks for.
inline int emulated_lanes() {
  const char* setting = std::getenv("EKD_CPU_EMULATE_LANES");
  if (setting == nullptr || *setting == '\0') return 0;
  char* end = nullptr;
  const long lanes = std::strtol(setting, &end, 10);
  EKD_CHECK_VALUE(*end == '\0' && lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0,
                  "EKD_CPU_EMULATE_LANES must be a power of two from 1 to 32, got '", setting, "'");
  return int(lanes);
}

//! The lanes of one row: their meeting point and the partial sums they exchange.
template <typename T>
class LaneGroup {
 public:
  explicit LaneGroup(int count) : count_(count), partials_(count) {}

  int count() const { return count_; }
  std::vector<T>& partials() { return partials_; }

  //! Every lane waits for all the others; an error when a lane has left the row meanwhile (its
  //! control flow diverged) or does not come within the timeout.
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    EKD_CHECK(!diverged_, "emulated lanes diverged: a lane left the row while others wait at a dot");
    const int64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      changed_.notify_all();
      return;
    }
    const bool met = changed_.wait_for(lock, std::chrono::seconds(30),
                                       [&] { return generation_ != generation || diverged_; });
    EKD_CHECK(met && generation_ != generation,
              "emulated lanes diverged: not every lane reached the same dot (on a GPU, a hang)");
  }

  //! A lane is done with the row: the ones still waiting at a dot cannot be met any more.
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (arrived_ > 0) diverged_ = true;
    changed_.notify_all();
  }

 private:
  const int count_;
  std::vector<T> partials_;
  std::mutex mutex_;
  std::condition_variable changed_;
  int arrived_ = 0;
  int64_t generation_ = 0;
  bool diverged_ = false;
};

//! ekd_math.h's Lanes for an emulated lane (the CPU twin of WarpLanes).
template <typename T>
struct EmulatedLanes {
  int lane;
  LaneGroup<T>* group;

  int64_t first() const { return lane; }
  int64_t stride() const { return group->count(); }
  T dot(const T* x, const T* y, int64_t n) const {
    const int count = group->count();
    T sum = T(0);
    for (int64_t d = lane; d < n; d += count) sum += x[d] * y[d];
    group->partials()[lane] = sum;
    group->arrive_and_wait();
    // __shfl_xor_sync's butterfly: at each step every lane adds its partner's value to its own.
    std::vector<T> value = group->partials();
    std::vector<T> next(count);
    for (int offset = count / 2; offset > 0; offset /= 2) {
      for (int l = 0; l < count; ++l) next[l] = value[l] + value[l ^ offset];
      value.swap(next);
    }
    group->arrive_and_wait();  // all have read the partials before the next dot writes them
    return value[lane];
  }
};

//! body(lanes) on `count` threads, one per lane of one row; a lane's error is rethrown here.
template <typename T, typename Body>
void run_emulated_lanes(int count, const Body& body) {
  LaneGroup<T> group(count);
  std::vector<std::exception_ptr> errors(count);
  std::vector<std::thread> threads;
  threads.reserve(count);
  for (int lane = 0; lane < count; ++lane) {
    threads.emplace_back([&, lane] {
      try {
        body(EmulatedLanes<T>{lane, &group});
      } catch (...) {
        errors[lane] = std::current_exception();
      }
      group.leave();
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace ekd
