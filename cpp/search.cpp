// The search driver: instruction-set dispatch, blocking into cache-sized tiles, threads, top-k merge, re-scoring.
// Compiled with baseline flags; the hot loops it calls live in the per-ISA kernel builds (kernels_impl.inc).
#include "search.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "kernels.hpp"
#include "topk.hpp"

namespace fine_infer {
namespace {

// --- instruction-set dispatch ---------------------------------------------------------------------------------------

struct IsaEntry {
  const char* name;
  const KernelTable* (*get)();
  bool (*supported)();
};

bool cpu_always() { return true; }
#ifdef FI_HAVE_AVX2
bool cpu_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
#ifdef FI_HAVE_AVX512
bool cpu_avx512() {
  __builtin_cpu_init();  // libgcc also checks that the OS saves the zmm state (XGETBV)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif

// Best first.
const IsaEntry kIsas[] = {
#ifdef FI_HAVE_AVX512
    {"avx512", &kernels_avx512, &cpu_avx512},
#endif
#ifdef FI_HAVE_AVX2
    {"avx2", &kernels_avx2, &cpu_avx2},
#endif
    {"generic", &kernels_generic, &cpu_always},
};

const KernelTable* find_isa(const std::string& name) {
  for (const auto& e : kIsas)
    if (name == e.name && e.supported()) return e.get();
  return nullptr;
}

const KernelTable* detect_isa() {
  if (const char* env = std::getenv("FINE_INFER_ISA")) {
    if (const KernelTable* t = find_isa(env)) return t;  // an unusable override falls back to detection
  }
  for (const auto& e : kIsas)
    if (e.supported()) return e.get();
  return kernels_generic();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable* table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = detect_isa();
    g_table.store(t, std::memory_order_release);
  }
  return t;
}

// --- small helpers --------------------------------------------------------------------------------------------------

// 64-byte aligned scratch (tiles, packed queries, converted gallery blocks).
struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(size_t n) {
    const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

int hardware_threads() {
  const unsigned h = std::thread::hardware_concurrency();
  return h == 0 ? 1 : static_cast<int>(h);
}

// Run fn(worker) on `n` workers (the caller is worker 0); rethrow the first exception in the caller.
template <class Fn>
void run_workers(int n, Fn&& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int w) {
    try {
      fn(w);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n - 1));
  for (int w = 1; w < n; ++w) pool.emplace_back(guarded, w);
  guarded(0);
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

void write_padding(int64_t nq, int64_t k, int64_t from, float* out_s, int64_t* out_i) {
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t r = from; r < k; ++r) {
      out_s[q * k + r] = -std::numeric_limits<float>::infinity();
      out_i[q * k + r] = -1;
    }
}

// Best-first order of up to `count` (score, slot) pairs, written to out (the first min(count, k) entries).
void sort_best_first(std::vector<std::pair<float, int64_t>>& items, int64_t k, float* out_s, int64_t* out_i) {
  auto by_rank = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return better(a.first, a.second, b.first, b.second);
  };
  const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(items.size()));
  std::partial_sort(items.begin(), items.begin() + m, items.end(), by_rank);
  for (int64_t r = 0; r < m; ++r) {
    out_s[r] = items[r].first;
    out_i[r] = items[r].second;
  }
}

size_t element_size(Dtype t) { return t == Dtype::f32 ? 4 : t == Dtype::f16 ? 2 : 1; }

// Below this many multiply-adds a second thread costs more to start than it saves.
constexpr int64_t kParallelMinWork = int64_t{1} << 21;

}  // namespace

// --- exact search ---------------------------------------------------------------------------------------------------

void search(const float* queries, int64_t nq, const Gallery& g, int64_t k, float* out_s, int64_t* out_i,
            int threads) {
  const KernelTable* K = table();
  const int64_t dim = g.dim, n = g.n;
  const int64_t kk = std::min(k, n);
  write_padding(nq, k, 0, out_s, out_i);
  if (nq == 0 || kk <= 0) return;

  // Queries packed [block][dim][mr] so the kernel broadcasts consecutive floats; int8 scales folded in here, so the
  // gallery side only widens integers: <q, s*x> = <q*s, x>.
  const int mr = K->mr;
  const int64_t nqb = (nq + mr - 1) / mr;
  AlignedFloats qp(static_cast<size_t>(nqb * dim * mr));
  std::memset(qp.p, 0, sizeof(float) * static_cast<size_t>(nqb * dim * mr));
  for (int64_t q = 0; q < nq; ++q) {
    float* dst = qp.p + (q / mr) * dim * mr + q % mr;
    const float* src = queries + q * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d * mr] = g.scales ? src[d] * g.scales[d] : src[d];
  }

  // Blocking: a gallery block of ~256 KB of fp32 (256 slots at dim 256) stays in L2 while every query block of the
  // super-block (<= 64 queries, 64 KB of scores) runs over it; each panel is read from memory once per super-block.
  const int64_t npanels = (n + kPanel - 1) / kPanel;
  const int64_t block_panels = std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1));
  const int64_t nblocks = (npanels + block_panels - 1) / block_panels;
  const int64_t super_rows = mr * ((64 + mr - 1) / mr);  // >= 64 queries share each pass over the gallery
  const int64_t nsuper = (nq + super_rows - 1) / super_rows;
  const int64_t ld = block_panels * kPanel;

  int nthreads = threads > 0 ? threads : hardware_threads();
  if (nq * n * dim < kParallelMinWork) nthreads = 1;
  // Tasks = (query super-block, gallery chunk), handed out dynamically: ~4 per thread so a core slowed by another
  // process does not hold the whole call back. Few queries: split the gallery (each chunk keeps its own top-k per
  // query, merged at the end); many queries: split the queries.
  int64_t nchunks = 1;
  if (nthreads > 1) {
    const int64_t want = (int64_t{4} * nthreads + nsuper - 1) / nsuper;
    nchunks = std::clamp<int64_t>(want, 1, nblocks);
    const int64_t heap_budget = int64_t{1} << 24;  // entries across all chunk heaps
    nchunks = std::max<int64_t>(1, std::min<int64_t>(nchunks, heap_budget / std::max<int64_t>(1, nq * kk)));
  }
  const int64_t ntasks = nsuper * nchunks;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, ntasks));

  std::vector<float> heap_s(static_cast<size_t>(nchunks * nq * kk));
  std::vector<int64_t> heap_i(static_cast<size_t>(nchunks * nq * kk));
  std::vector<TopK> heaps(static_cast<size_t>(nchunks * nq));
  for (int64_t h = 0; h < nchunks * nq; ++h) {
    heaps[h].s = heap_s.data() + h * kk;
    heaps[h].i = heap_i.data() + h * kk;
    heaps[h].k = kk;
  }

  const size_t esize = element_size(g.dtype);
  const char* base = static_cast<const char*>(g.panels);
  const int64_t panel_values = dim * kPanel;
  std::atomic<int64_t> next_task{0};

  run_workers(nthreads, [&](int) {
    AlignedFloats tile(static_cast<size_t>(super_rows * ld));
    std::vector<float> thresh(static_cast<size_t>(super_rows));
    std::vector<uint8_t> hot(static_cast<size_t>(super_rows));
    std::unique_ptr<AlignedFloats> scratch;
    if (g.dtype != Dtype::f32)
      scratch = std::make_unique<AlignedFloats>(static_cast<size_t>(block_panels * panel_values));
    for (int64_t t = next_task.fetch_add(1); t < ntasks; t = next_task.fetch_add(1)) {
      const int64_t s = t / nchunks, c = t % nchunks;
      const int64_t q0 = s * super_rows, q1 = std::min(nq, q0 + super_rows);
      const float* qblock = qp.p + (q0 / mr) * dim * mr;
      TopK* hq = heaps.data() + c * nq;
      const int64_t b0 = c * nblocks / nchunks, b1 = (c + 1) * nblocks / nchunks;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t p0 = b * block_panels;
        const int64_t np = std::min(block_panels, npanels - p0);
        const void* src = base + static_cast<size_t>(p0 * panel_values) * esize;
        for (int64_t q = q0; q < q1; ++q) {
          const TopK& h = hq[q];
          thresh[q - q0] = h.size == kk ? h.s[0] : std::numeric_limits<float>::infinity();
          hot[q - q0] = h.size < kk;  // still filling: every score is taken
        }
        if (g.dtype == Dtype::f32) {
          K->score_f32(qblock, q1 - q0, dim, src, np, tile.p, ld, thresh.data(), hot.data());
        } else if (q1 - q0 <= mr) {  // one query block: widen in registers, nothing to amortise a scratch copy over
          (g.dtype == Dtype::f16 ? K->score_f16 : K->score_i8)(qblock, q1 - q0, dim, src, np, tile.p, ld,
                                                               thresh.data(), hot.data());
        } else {  // several query blocks: widen the gallery block once, then score it as fp32 from L2
          if (g.dtype == Dtype::f16)
            K->convert_f16(static_cast<const uint16_t*>(src), scratch->p, np * panel_values);
          else
            K->convert_i8(static_cast<const int8_t*>(src), scratch->p, np * panel_values);
          K->score_f32(qblock, q1 - q0, dim, scratch->p, np, tile.p, ld, thresh.data(), hot.data());
        }
        const int64_t valid = std::min(np * kPanel, n - p0 * kPanel);
        for (int64_t q = q0; q < q1; ++q)
          if (hot[q - q0]) hq[q].scan(tile.p + (q - q0) * ld, p0 * kPanel, valid);
      }
    }
  });

  // Merge the chunks' lists per query (one chunk: just order its heap).
  std::vector<std::pair<float, int64_t>> items;
  for (int64_t q = 0; q < nq; ++q) {
    items.clear();
    for (int64_t c = 0; c < nchunks; ++c) {
      const TopK& h = heaps[c * nq + q];
      for (int64_t r = 0; r < h.size; ++r) items.emplace_back(h.s[r], h.i[r]);
    }
    sort_best_first(items, kk, out_s + q * k, out_i + q * k);
    // A chunk never holds fewer than min(kk, its slots); all chunks together hold >= kk, so nothing is missing.
  }
}

// --- exact re-scoring -----------------------------------------------------------------------------------------------

void rescore(const float* queries, int64_t nq, int64_t dim, const float* rows, int64_t n, const int64_t* cand,
             int64_t kc, int64_t k, float* out_s, int64_t* out_i, int threads) {
  const KernelTable* K = table();
  write_padding(nq, k, 0, out_s, out_i);
  if (nq == 0 || kc == 0 || k == 0) return;
  int nthreads = threads > 0 ? threads : hardware_threads();
  if (nq * kc * dim < kParallelMinWork) nthreads = 1;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, nq));
  std::atomic<int64_t> next{0};
  run_workers(nthreads, [&](int) {
    std::vector<std::pair<float, int64_t>> items;
    for (int64_t q = next.fetch_add(1); q < nq; q = next.fetch_add(1)) {
      items.clear();
      const int64_t* c = cand + q * kc;
      for (int64_t j = 0; j < kc; ++j)
        if (c[j] >= 0 && c[j] < n) items.emplace_back(K->dot(queries + q * dim, rows + c[j] * dim, dim), c[j]);
      sort_best_first(items, k, out_s + q * k, out_i + q * k);
    }
  });
}

// --- instruction sets -----------------------------------------------------------------------------------------------

std::string active_isa() { return table()->name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const auto& e : kIsas)
    if (e.supported()) out.emplace_back(e.name);
  return out;
}

bool set_isa(const std::string& name) {
  const KernelTable* t = find_isa(name);
  if (t == nullptr) return false;
  g_table.store(t, std::memory_order_release);
  return true;
}

}  // namespace fine_infer
