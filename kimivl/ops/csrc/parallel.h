// A parallel loop whose threads take their next piece of the range as they finish the last one.
//
// Why: at::parallel_for hands each thread one fixed share (the range split in as many parts as threads). The decode
// step's loops stream weights from memory, and on a shared or virtual machine one core often streams slower than the
// other for a while; with fixed shares the faster thread then waits at the loop's end (on the 2-vCPU sandbox the
// main thread spent ~5 % of a decode step waiting for the worker). Here the shares shrink as the range is used up
// (each piece a half of the remainder's share per thread, "guided" scheduling), so the threads finish together
// while each still streams long runs of rows.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

// body() once on each of up to `most` threads (inline when one thread is all there is, or inside a parallel region,
// where torch's loops run inline too). The helpers below hand out their work from a shared counter inside it.
template <typename F>
void on_each_thread(int64_t most, const F& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), most);
  if (threads <= 1 || at::in_parallel_region()) {
    body();
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(); });
}

// f(b, e) over pieces [b, e) of [0, n): every piece starts at a multiple of `grain` (so kernels that group rows in
// blocks see the same blocks whichever thread takes them: the results do not depend on the schedule).
template <typename F>
void balanced_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t units = (n + grain - 1) / grain;
  const int64_t shares = 2 * std::min<int64_t>(at::get_num_threads(), units);
  std::atomic<int64_t> next{0};  // the first unit no thread has taken yet
  on_each_thread(units, [&]() {
    for (;;) {
      int64_t first = next.load(std::memory_order_relaxed), take;
      do {
        if (first >= units) return;
        take = std::max<int64_t>(1, (units - first) / shares);
      } while (!next.compare_exchange_weak(first, first + take, std::memory_order_relaxed));
      f(first * grain, std::min(n, (first + take) * grain));
    }
  });
}

// Items 0 .. n-1 handed out one at a time, in order, to whichever thread is free: body(take) runs once per thread
// (its scratch set up once) and calls take() for its next item until it answers -1. For tasks of unequal size
// sorted longest first, the long ones start first and the short ones fill in at the end, whichever thread is slowed.
template <typename F>
void take_in_turn(int64_t n, const F& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const auto take = [&]() -> int64_t {
    const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
    return i < n ? i : -1;
  };
  on_each_thread(n, [&]() { body(take); });
}
