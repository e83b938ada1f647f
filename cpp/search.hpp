// Exact top-k by inner product over a gallery stored in panels (see kernels.hpp) as float32, float16 or int8.
// The algorithm only: no Python here (the pybind11 bindings are in bindings.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace fine_infer {

enum class Dtype : int { f32 = 0, f16 = 1, i8 = 2 };

struct Gallery {
  const void* panels = nullptr;  // ceil(n / 16) panels of [dim][16] values of `dtype`
  Dtype dtype = Dtype::f32;
  int64_t n = 0;                 // slots in use (tail lanes of the last panel are ignored)
  int64_t dim = 0;
  const float* scales = nullptr;  // int8 only: value = scale[d] * stored (symmetric, per dimension)
};

// queries: nq x dim row-major fp32. Writes out_scores / out_slots (nq x k, best first; ties to the lower slot).
// Where the gallery holds fewer than k slots the rest is -inf / -1. int8 and float16 scores are those of the
// dequantised vectors (fp32 arithmetic). Uses up to `threads` threads (<= 0: all cores); safe to call concurrently.
void search(const float* queries, int64_t nq, const Gallery& gallery, int64_t k, float* out_scores,
            int64_t* out_slots, int threads);

// Exact fp32 re-scoring: for each query, the inner products with its `kc` candidate slots (rows of the row-major
// n x dim `rows`; entries < 0 or >= n are skipped), then the best k as in `search`.
void rescore(const float* queries, int64_t nq, int64_t dim, const float* rows, int64_t n, const int64_t* candidates,
             int64_t kc, int64_t k, float* out_scores, int64_t* out_slots, int threads);

// The instruction set the kernels run with ("avx512", "avx2", "generic"), those this CPU and build can run, and an
// override (for tests and benchmarks; also FINE_INFER_ISA at first use). set_isa returns false if unavailable.
std::string active_isa();
std::vector<std::string> available_isas();
bool set_isa(const std::string& name);

}  // namespace fine_infer
