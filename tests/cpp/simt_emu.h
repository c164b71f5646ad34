// A small emulation of CUDA's SIMT execution model on the CPU, so that CUDA kernel source (kept in
// a .cuh header) can be compiled by the host compiler and run against a CPU reference on machines
// without a GPU.
//
// What it provides: __global__ / __device__ / __host__ / __forceinline__ / __shared__,
// threadIdx / blockIdx / blockDim / gridDim / warpSize, __shfl_xor_sync / __shfl_down_sync,
// __syncthreads, atomicAdd, dim3, and simt::launch(kernel, grid, block, args...).
//
// How it runs: the blocks of a grid one after another; within a block, one fiber (ucontext) per
// CUDA thread, all on the calling OS thread. A fiber runs until it reaches a synchronisation point
// (a shuffle or __syncthreads), where it waits until every thread that must take part has arrived:
// the 32 lanes of its warp for a shuffle, the whole block for __syncthreads. Between those points
// the fibers of a round run in an order drawn from a seeded generator (simt::set_schedule_seed),
// so code that depends on an unsynchronised order between threads shows up as a difference
// between seeds. atomicAdd is a plain read-modify-write: fibers never run concurrently.
//
// What it reports (simt::Error, thrown from launch): a full-mask shuffle in a warp where a lane
// has exited or reaches a different shuffle; __syncthreads reached by only part of the block;
// a deadlock (every unfinished thread waiting). These are undefined behaviour on a GPU.
//
// What it does not model: memory ordering between threads without a barrier, out-of-bounds
// accesses (use the CPU's own tools), warp-synchronous code without the *_sync intrinsics,
// performance. Only full-mask, width-32 shuffles are supported (all the kernels use).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

namespace simt {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

struct Thread {
  ucontext_t context;
  uint3 index;
  int lane = 0, warp = 0;
  bool done = false;
  enum class Wait { kNone, kWarp, kBlock } wait = Wait::kNone;
  uint64_t wait_generation = 0;
};

// A barrier: `arrived` of the expected threads are waiting; `generation` counts completions. The
// first arrival records its call site, which every other arrival must share.
struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
  int exited = 0;
  uint32_t line = 0;
  int tag = 0;
};

struct Warp : Barrier {
  uint64_t slots[kWarpSize] = {};
};

constexpr size_t kStackBytes = 64 * 1024;

struct State {
  dim3 grid, block, block_index;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier block_barrier;
  std::vector<std::unique_ptr<char[]>> stacks;
  Thread* current = nullptr;
  ucontext_t scheduler;
  std::function<void()> body;
  std::string error;
  uint64_t seed = 0;
  uint64_t switches = 0;
  uint64_t atomics = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline Thread& current() { return *state().current; }

// Back to the scheduler; returns when this thread is resumed.
inline void yield() {
  State& s = state();
  Thread* t = s.current;
  ++s.switches;
  swapcontext(&t->context, &s.scheduler);
}

// Records the first error and parks this thread for good: launch throws it.
[[noreturn]] inline void fail(const std::string& message) {
  State& s = state();
  if (s.error.empty()) s.error = message;
  for (;;) yield();
}

inline std::string where(const Thread& t) {
  const State& s = state();
  return "block (" + std::to_string(s.block_index.x) + "," + std::to_string(s.block_index.y) + "," +
         std::to_string(s.block_index.z) + ") thread (" + std::to_string(t.index.x) + "," +
         std::to_string(t.index.y) + "," + std::to_string(t.index.z) + ")";
}

// Waits until `expected` threads (warp lanes or the block) have arrived at `barrier` from the
// same call site.
inline void arrive(Barrier& barrier, int expected, Thread::Wait kind, const char* what,
                   const std::source_location& site, int tag) {
  Thread& t = current();
  if (barrier.exited > 0) {
    fail(where(t) + ": " + what + " at line " + std::to_string(site.line()) + " while " +
         std::to_string(barrier.exited) + " of its threads have exited (undefined on a GPU)");
  }
  if (barrier.arrived == 0) {
    barrier.line = site.line();
    barrier.tag = tag;
  } else if (barrier.line != site.line() || barrier.tag != tag) {
    fail(where(t) + ": " + what + " at line " + std::to_string(site.line()) + " (argument " +
         std::to_string(tag) + ") while others of its threads wait at line " +
         std::to_string(barrier.line) + " (argument " + std::to_string(barrier.tag) +
         "): divergent synchronisation");
  }
  if (++barrier.arrived == expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  t.wait = kind;
  t.wait_generation = barrier.generation;
  yield();
  t.wait = Thread::Wait::kNone;
}

inline void trampoline() {
  State& s = state();
  s.body();
  Thread& t = current();
  t.done = true;
  Warp& w = s.warps[t.warp];
  ++w.exited;
  ++s.block_barrier.exited;
  if (w.arrived > 0) {
    s.error = where(t) + " exited while lanes of its warp wait at the shuffle at line " +
              std::to_string(w.line) + " (undefined on a GPU)";
  } else if (s.block_barrier.arrived > 0) {
    s.error = where(t) + " exited while threads of its block wait at __syncthreads (line " +
              std::to_string(s.block_barrier.line) + ")";
  }
  // returning resumes the scheduler (uc_link)
}

inline bool runnable(const State& s, const Thread& t) {
  switch (t.wait) {
    case Thread::Wait::kWarp:
      return s.warps[t.warp].generation != t.wait_generation;
    case Thread::Wait::kBlock:
      return s.block_barrier.generation != t.wait_generation;
    default:
      return true;
  }
}

inline void run_block(State& s, std::mt19937_64& rng) {
  const int n = static_cast<int>(s.block.x * s.block.y * s.block.z);
  s.threads.assign(n, Thread{});
  s.warps.assign((n + kWarpSize - 1) / kWarpSize, Warp{});
  s.block_barrier = Barrier{};
  while (static_cast<int>(s.stacks.size()) < n) {
    s.stacks.push_back(std::make_unique<char[]>(kStackBytes));
  }
  for (int i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    t.index = {static_cast<unsigned>(i % s.block.x),
               static_cast<unsigned>(i / s.block.x % s.block.y),
               static_cast<unsigned>(i / (s.block.x * s.block.y))};
    t.lane = i % kWarpSize;
    t.warp = i / kWarpSize;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &s.scheduler;
    makecontext(&t.context, trampoline, 0);
  }
  // a partial last warp cannot take part in a full-mask shuffle
  if (n % kWarpSize != 0) s.warps.back().exited = kWarpSize - n % kWarpSize;
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  for (;;) {
    if (s.seed != 0) std::shuffle(order.begin(), order.end(), rng);
    bool progress = false, all_done = true;
    for (int i : order) {
      Thread& t = s.threads[i];
      if (t.done) continue;
      all_done = false;
      if (!runnable(s, t)) continue;
      s.current = &t;
      ++s.switches;
      swapcontext(&s.scheduler, &t.context);
      progress = true;
      if (!s.error.empty()) throw Error(s.error);
    }
    if (all_done) return;
    if (!progress) {
      for (const Thread& t : s.threads) {
        if (!t.done) {
          throw Error("deadlock: " + where(t) + " and every other unfinished thread wait at a " +
                      "barrier that cannot complete");
        }
      }
    }
  }
}

}  // namespace detail

// Seed of the order in which fibers run between synchronisation points; 0: thread order.
inline void set_schedule_seed(uint64_t seed) { detail::state().seed = seed; }

// Fiber switches so far (a measure of the emulation's cost).
inline uint64_t switches() { return detail::state().switches; }

// atomicAdd calls so far.
inline uint64_t atomics() { return detail::state().atomics; }

// Runs kernel(args...) on every thread of a grid x block launch; throws simt::Error on undefined
// behaviour. The arguments are converted to the kernel's parameter types once, as a launch does,
// and every thread gets its own copy.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  detail::State& s = detail::state();
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  s.grid = grid;
  s.block = block;
  s.error.clear();
  s.body = [&] { std::apply(kernel, params); };
  std::mt19937_64 rng(s.seed);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        s.block_index = dim3(x, y, z);
        detail::run_block(s, rng);
      }
    }
  }
  s.body = nullptr;
}

}  // namespace simt

// ---- the CUDA names kernel code uses ----

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// blocks run one at a time on one OS thread, so a function-local static is per-block memory
// (uninitialised on a GPU: kernels must not read it before writing it)
#define __shared__ static

#define threadIdx (::simt::detail::current().index)
#define blockIdx (::simt::detail::state().block_index)
#define blockDim (::simt::detail::state().block)
#define gridDim (::simt::detail::state().grid)
#define warpSize (::simt::kWarpSize)

namespace simt::detail {

// Every lane of the warp publishes `value`, then reads lane source(lane)'s; two barriers, so no
// lane overwrites its slot before every lane has read it.
template <typename T, typename Source>
T exchange(unsigned mask, T value, int width, int tag, const std::source_location& site,
           Source source) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
                "shuffles move values of at most 8 bytes");
  Thread& t = current();
  if (mask != kFullMask || width != kWarpSize) {
    fail(where(t) + ": only full-mask, width-32 shuffles are emulated (line " +
         std::to_string(site.line()) + ")");
  }
  Warp& w = state().warps[t.warp];
  std::memcpy(&w.slots[t.lane], &value, sizeof(T));
  arrive(w, kWarpSize, Thread::Wait::kWarp, "shuffle", site, tag);
  T out;
  std::memcpy(&out, &w.slots[source(t.lane)], sizeof(T));
  arrive(w, kWarpSize, Thread::Wait::kWarp, "shuffle", site, tag);
  return out;
}

}  // namespace simt::detail

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location site = std::source_location::current()) {
  return simt::detail::exchange(mask, var, width, lane_mask, site,
                                [&](int lane) { return lane ^ lane_mask; });
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location site = std::source_location::current()) {
  return simt::detail::exchange(mask, var, width, static_cast<int>(delta), site, [&](int lane) {
    return lane + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  });
}

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  simt::detail::State& s = simt::detail::state();
  simt::detail::arrive(s.block_barrier, static_cast<int>(s.threads.size()),
                       simt::detail::Thread::Wait::kBlock, "__syncthreads", site, 0);
}

// CUDA's atomicAdd: adds, returns the old value. Fibers never run at the same time, so a plain
// read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_arithmetic_v<T>, "atomicAdd on int, unsigned, float or double");
  ++simt::detail::state().atomics;
  const T old = *address;
  *address = old + value;
  return old;
}
