// Work items shared out one at a time among a kernel's threads, for the loops that at::parallel_for ran.
//
// at::parallel_for gives each thread an equal contiguous share of the items up front. On a small machine the cores
// are not the kernel's alone: the HTTP frontend, the engine's other threads and the client take one for a while,
// and the thread on it then finishes its share late while the other waits at the end of the call (OpenMP's waits
// were ~10% of SmolLM2's 32-row int8 step on 2 cores). Here each thread takes the next item not yet taken, so the
// one that runs takes the rest. Items are taken in order, so each thread still reads the weight forward.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace attnserve {

// body(take) runs once on each of up to at::get_num_threads() threads (once on this thread where there is one
// item, one thread, or a parallel region already); take() returns the thread's next item, n or more when none is
// left. `shared`: items go to whichever thread asks next; else as at::parallel_for gives them, a contiguous share
// per thread: a one-row product's items take ~1 us each, where a shared counter's trips between the cores cost
// more than the balance gains (SmolLM2's one-row int8 step measured 5-20% slower shared).
template <typename Body>
inline void share_items(int64_t n, bool shared, const Body& body) {
  if (!shared) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      body([&i, end, n]() { return i < end ? i++ : n; });
    });
    return;
  }
  std::atomic<int64_t> next{0};
  const auto take = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    body(take);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  body(take);
}

// Rows of x from which a product's items are shared rather than split (the work of an item grows with them).
constexpr int64_t SHARED_FROM_ROWS = 8;

}  // namespace attnserve
