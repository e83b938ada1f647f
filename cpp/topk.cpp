#include "topk.hpp"

#include <algorithm>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

namespace fine_infer {
namespace {

// "Better" = higher score, then lower index.
inline bool better(float sa, int64_t ia, float sb, int64_t ib) { return sa > sb || (sa == sb && ia < ib); }

void one_query(const float* q, const float* gallery, int64_t n, int64_t d, int64_t k, float* out_s, int64_t* out_i) {
  // A min-heap of the k best seen so far; its top is the worst kept candidate.
  std::vector<std::pair<float, int64_t>> heap;
  heap.reserve(static_cast<size_t>(k));
  auto worse_first = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return better(a.first, a.second, b.first, b.second);
  };
  for (int64_t j = 0; j < n; ++j) {
    const float* g = gallery + j * d;
    float s = 0.f;
    for (int64_t t = 0; t < d; ++t) s += q[t] * g[t];
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.emplace_back(s, j);
      std::push_heap(heap.begin(), heap.end(), worse_first);
    } else if (better(s, j, heap.front().first, heap.front().second)) {
      std::pop_heap(heap.begin(), heap.end(), worse_first);
      heap.back() = {s, j};
      std::push_heap(heap.begin(), heap.end(), worse_first);
    }
  }
  std::sort(heap.begin(), heap.end(), worse_first);
  for (int64_t r = 0; r < k; ++r) {
    if (r < static_cast<int64_t>(heap.size())) {
      out_s[r] = heap[r].first;
      out_i[r] = heap[r].second;
    } else {
      out_s[r] = -std::numeric_limits<float>::infinity();
      out_i[r] = -1;
    }
  }
}

}  // namespace

void topk_inner_product(const float* queries, int64_t nq, const float* gallery, int64_t n, int64_t d, int64_t k,
                        float* out_scores, int64_t* out_indices, int threads) {
  threads = std::max(1, std::min<int>(threads, static_cast<int>(nq)));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([=] {
      for (int64_t qi = t; qi < nq; qi += threads)
        one_query(queries + qi * d, gallery, n, d, k, out_scores + qi * k, out_indices + qi * k);
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace fine_infer
