// Exact top-k by inner product over a row-major float32 gallery.
#pragma once
#include <cstdint>

namespace fine_infer {

// queries (nq x d), gallery (n x d), both row-major float32. Writes scores (nq x k, best first) and indices
// (nq x k); slots beyond n are -inf / -1. Ties go to the lower index. Runs on up to `threads` threads.
void topk_inner_product(const float* queries, int64_t nq, const float* gallery, int64_t n, int64_t d, int64_t k,
                        float* out_scores, int64_t* out_indices, int threads);

}  // namespace fine_infer
