// The interface between the search driver (search.cpp, baseline flags) and the hot loops, which are compiled once
// per instruction set (kernels_avx512.cpp, kernels_avx2.cpp, kernels_generic.cpp all include kernels_impl.inc).
// The driver picks one table at run time (__builtin_cpu_supports), so a wheel built on one CPU runs on another.
#pragma once
#include <cstdint>

namespace fine_infer {

// Gallery storage layout, shared by every dtype and ISA: panels of 16 slots, each panel [dim][16] — slot s, dimension
// d lives at panels[s / 16][d][s % 16]. A panel row of 16 lanes is one 64-byte fp32 vector, so the inner loop is a
// broadcast-multiply-add over gallery slots: no horizontal sums, no packing pass, the same code for 1 or 64 queries.
constexpr int kPanel = 16;

struct KernelTable {
  const char* name;
  // Queries per micro-block: queries are packed as [block][dim][mr] (zero-padded) before calling score_block.
  int mr;
  // tile[q * ld + j] = <query q, slot j> for q < nq, j < npanels * 16, over `npanels` panels in the layout above:
  // fp32, or float16 / int8 widened in registers (int8 unscaled: the per-dimension scale is folded into the query).
  // hot[q] |= 1 where a score of row q exceeds thresh[q] (the query's current k-th best), tested while the scores
  // are in registers: the top-k update then skips the rows (nearly all, once warm) with nothing to offer.
  using ScoreFn = void (*)(const float* qpacked, int64_t nq, int64_t dim, const void* panels, int64_t npanels,
                           float* tile, int64_t ld, const float* thresh, uint8_t* hot);
  ScoreFn score_f32;
  ScoreFn score_f16;
  ScoreFn score_i8;
  // Widen `count` stored values to fp32 (int8 unscaled). A batch of queries widens each gallery block once into
  // a scratch buffer and scores it with score_f32: cheaper than widening in every query block's pass.
  void (*convert_f16)(const uint16_t* src, float* dst, int64_t count);
  void (*convert_i8)(const int8_t* src, float* dst, int64_t count);
  // <a, b> over n floats (the exact re-scoring of candidates).
  float (*dot)(const float* a, const float* b, int64_t n);
};

const KernelTable* kernels_generic();
#ifdef FI_HAVE_AVX2
const KernelTable* kernels_avx2();
#endif
#ifdef FI_HAVE_AVX512
const KernelTable* kernels_avx512();
#endif

}  // namespace fine_infer
