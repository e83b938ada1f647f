// Per-query top-k selection over streamed score tiles, without sorting a row. Compiled with baseline flags only
// (search.cpp): never include this from the per-ISA kernel files.
#pragma once
#include <cstdint>
#include <limits>

namespace fine_infer {

// Order of results: higher score first, then the lower slot (so ties are deterministic).
inline bool better(float sa, int64_t ia, float sb, int64_t ib) { return sa > sb || (sa == sb && ia < ib); }

// A bounded min-heap of (score, slot) in caller-owned arrays; its root is the worst candidate kept. Fed slots in
// increasing order, a new score enters only if it beats the root strictly (an equal score has a higher slot, so it
// loses the tie), which lets `scan` skip 16 scores at a time with one vectorised comparison against the root.
struct TopK {
  float* s = nullptr;
  int64_t* i = nullptr;
  int64_t k = 0;
  int64_t size = 0;

  void push(float score, int64_t idx) {  // while size < k: sift up
    int64_t c = size++;
    while (c > 0) {
      const int64_t p = (c - 1) / 2;
      if (!better(s[p], i[p], score, idx)) break;  // parent is worse-or-equal: stop
      s[c] = s[p];
      i[c] = i[p];
      c = p;
    }
    s[c] = score;
    i[c] = idx;
  }

  void replace_root(float score, int64_t idx) {  // sift down
    int64_t c = 0;
    for (;;) {
      int64_t w = 2 * c + 1;
      if (w >= size) break;
      if (w + 1 < size && better(s[w], i[w], s[w + 1], i[w + 1])) ++w;  // the worse child
      if (!better(score, idx, s[w], i[w])) break;
      s[c] = s[w];
      i[c] = i[w];
      c = w;
    }
    s[c] = score;
    i[c] = idx;
  }

  // Offer scores of slots base, base+1, ... base+count-1 (greater than every slot offered before).
  void scan(const float* row, int64_t base, int64_t count) {
    int64_t j = 0;
    for (; j < count && size < k; ++j) {
      const float v = row[j];
      push(v == v ? v : -std::numeric_limits<float>::infinity(), base + j);  // a NaN never outranks anything
    }
    if (j >= count) return;
    float t = s[0];
    for (; j + 16 <= count; j += 16) {
      int any = 0;
      for (int l = 0; l < 16; ++l) any |= row[j + l] > t;  // an integer OR-reduction: vectorises without fast-math
      if (!any) continue;
      for (int l = 0; l < 16; ++l)
        if (row[j + l] > t) {
          replace_root(row[j + l], base + j + l);
          t = s[0];
        }
    }
    for (; j < count; ++j)
      if (row[j] > t) {
        replace_root(row[j], base + j);
        t = s[0];
      }
  }
};

}  // namespace fine_infer
