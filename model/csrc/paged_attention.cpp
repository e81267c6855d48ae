// Paged attention on the CPU: every query row attends over the keys its block table names, read in place.
//
// A row n of q (N, h, d) belongs to the sequence whose block table is tables[row_table[n]] and sees that
// sequence's first context_lens[n] keys (a decode row: all of them; a prefill row at position p: p + 1 of them,
// which makes the chunk causal). Key t of a sequence lies in block tables[r][t / bs] at offset t % bs of the
// pool k_cache (blocks, bs, h_kv, d). Blocks shared by several sequences (a cached prefix) are read where they
// lie, like any other. Grouped-query attention: the g = h / h_kv query heads of one K/V head are computed
// together, so each key is read once per group. Softmax is online over blocks (running max, rescaled sums, as
// flash attention does); float32 or bfloat16 storage (bfloat16 K/V under float32 queries too: a float32 model's
// pool kept in half the bytes), float32 arithmetic. One work item per (row, K/V head), spread over torch's
// intra-op threads. With AVX-512 the two inner products (a query with a key, a weight times
// a value added to the output) are written with intrinsics: the compiler's own reduction of a dot product spilled
// its 16 lanes and added them one by one, which made this kernel ~7x slower than its memory traffic. With AVX2 +
// FMA and no AVX-512, the same plan in 8 lanes for the common shapes (paged_attention_avx2.h) and the two
// products in 8 lanes in the portable loop otherwise.
#include "kernels.h"
#include "share_items.h"
#include "elementwise.h"
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ATTNSERVE_PAGED_AVX2 1
#endif

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float as_float(T x) { return static_cast<float>(x); }

using attnserve::elementwise::exp_nonpositive;  // the softmax's e^(s - max), s - max <= 0

#if defined(__AVX512F__)
// 16 keys' or values' lanes from storage as float32 (bfloat16 is the high half of a float32's bits).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

#include "paged_attention_avx512.h"
#elif defined(ATTNSERVE_PAGED_AVX2)
#include "avx2_lanes.h"
#include "paged_attention_avx2.h"
#endif

#if defined(__AVX512F__) || defined(ATTNSERVE_PAGED_AVX2)
// The vector path's `attend_item<T, D, G>` (paged_attention_avx512.h or _avx2.h) behind one pointer type.
using ItemFn = void (*)(const float*, const void*, const void*, const int64_t*, int64_t, int64_t, int64_t, float*);

template <typename T, int D, int G>
void item_erased(const float* qf, const void* kp, const void* vp, const int64_t* table, int64_t len, int64_t k_block,
                 int64_t k_token, float* out) {
  attend_item<T, D, G>(qf, static_cast<const T*>(kp), static_cast<const T*>(vp), table, len, k_block, k_token, out);
}

// The vector path's item function for (D, G) with blocks of `bs` keys, or nullptr (then the portable loop runs).
template <typename T>
ItemFn fast_item(int64_t bs, int64_t d, int64_t g) {
  if (bs != 16 || (d != 64 && d != 128) || g < 1 || g > 8) return nullptr;
#define ATTNSERVE_ITEM(DD)                                                                           \
  switch (g) {                                                                                       \
    case 1: return &item_erased<T, DD, 1>; case 2: return &item_erased<T, DD, 2>;                    \
    case 3: return &item_erased<T, DD, 3>; case 4: return &item_erased<T, DD, 4>;                    \
    case 5: return &item_erased<T, DD, 5>; case 6: return &item_erased<T, DD, 6>;                    \
    case 7: return &item_erased<T, DD, 7>; default: return &item_erased<T, DD, 8>;                   \
  }
  if (d == 64) { ATTNSERVE_ITEM(64) }
  ATTNSERVE_ITEM(128)
#undef ATTNSERVE_ITEM
}
#endif

// q . k over d values (q in float32, already scaled).
template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  int64_t c = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; c + 16 <= d; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load16(k + c), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(ATTNSERVE_PAGED_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; c + 8 <= d; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load8(k + c), acc);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  sum = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
#endif
  for (; c < d; ++c) sum += q[c] * as_float(k[c]);
  return sum;
}

// acc += p * v over d values.
template <typename T>
inline void axpy(float p, const T* v, float* acc, int64_t d) {
  int64_t c = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; c + 16 <= d; c += 16) _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(pv, load16(v + c), _mm512_loadu_ps(acc + c)));
#elif defined(ATTNSERVE_PAGED_AVX2)
  const __m256 pv = _mm256_set1_ps(p);
  for (; c + 8 <= d; c += 8) _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(pv, load8(v + c), _mm256_loadu_ps(acc + c)));
#endif
  for (; c < d; ++c) acc[c] += p * as_float(v[c]);
}

// Q: the queries' and the output's storage; T: the pool's.
template <typename Q, typename T>
void attend_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& tables, const at::Tensor& row_table, const at::Tensor& context_lens,
                 double scale, at::Tensor& out) {
  const int64_t N = q.size(0), h = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), h_kv = k_cache.size(2), W = tables.size(1);
  const int64_t g = h / h_kv;
  const Q* qp = q.data_ptr<Q>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  Q* op = out.data_ptr<Q>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* rp = row_table.data_ptr<int64_t>();
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  const int64_t k_block = bs * h_kv * d, k_token = h_kv * d;  // strides of the pool (contiguous)
  const float fscale = static_cast<float>(scale);
#if defined(__AVX512F__) || defined(ATTNSERVE_PAGED_AVX2)
  const ItemFn fast = fast_item<T>(bs, d, g);  // the common shapes' path (paged_attention_avx512.h / _avx2.h)
#endif

  // A work item is one row's K/V heads where there are rows enough to go round: a head's keys are every h_kv-th
  // slice of a block's memory, and the lines fetched along with them are then the next head's, in this core's
  // cache; with few rows, one head each, so that every thread has work. (32 rows of SmolLM2's 3 K/V heads at 150
  // keys in a pool of 8192 blocks: 201 against 243 us a layer, medians, 2-core Zen 3.)
  const int64_t per_item = N >= 8 ? h_kv : 1, items = N * h_kv / per_item;
  attnserve::share_items(items, true, [&](const auto& take) {
    std::vector<float> qf(g * d), acc(g * d), m(g), l(g), s(g * bs);
    for (int64_t item = take(); item < items; item = take())
    for (int64_t part = item * per_item; part < (item + 1) * per_item; ++part) {
      const int64_t n = part / h_kv, kvh = part % h_kv;
      const int64_t len = std::min(lp[n], W * bs);  // never past the table
      const int64_t* table = tp + rp[n] * W;
      for (int64_t i = 0; i < g; ++i) {  // the group's queries, scaled once
        const Q* src = qp + (n * h + kvh * g + i) * d;
        for (int64_t c = 0; c < d; ++c) qf[i * d + c] = as_float(src[c]) * fscale;
      }
#if defined(__AVX512F__) || defined(ATTNSERVE_PAGED_AVX2)
      if (fast != nullptr) {
        fast(qf.data(), kp + kvh * d, vp + kvh * d, table, len, k_block, k_token, acc.data());
        Q* dst = op + (n * h + kvh * g) * d;  // the group's g heads are consecutive rows of d
        for (int64_t c = 0; c < g * d; ++c) dst[c] = static_cast<Q>(acc[c]);
        continue;
      }
#endif
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t b = 0; b * bs < len; ++b) {
        const int64_t nt = std::min(bs, len - b * bs);
        const T* kb = kp + table[b] * k_block + kvh * d;
        const T* vb = vp + table[b] * k_block + kvh * d;
        for (int64_t t = 0; t < nt; ++t) {  // scores of this block: the group's queries with each key (in cache)
          const T* kt = kb + t * k_token;
          for (int64_t i = 0; i < g; ++i) s[i * bs + t] = dot(qf.data() + i * d, kt, d);
        }
        for (int64_t i = 0; i < g; ++i) {  // the new running maximum, the block's weights, rescaled sums
          float* si = s.data() + i * bs;
          float best = m[i];
          for (int64_t t = 0; t < nt; ++t) best = std::max(best, si[t]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < nt; ++t) {
            si[t] = exp_nonpositive(si[t] - best);
            sum += si[t];
          }
          const float rescale = exp_nonpositive(m[i] - best);  // ~0 on the first block (m = -inf)
          float* ai = acc.data() + i * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) ai[c] *= rescale;
          m[i] = best;
          l[i] = l[i] * rescale + sum;
        }
        for (int64_t t = 0; t < nt; ++t) {  // the weighted values, each value row shared by the group
          const T* vt = vb + t * k_token;
          for (int64_t i = 0; i < g; ++i) axpy(s[i * bs + t], vt, acc.data() + i * d, d);
        }
      }
      for (int64_t i = 0; i < g; ++i) {  // a row with no key (never in practice) gives zeros
        Q* dst = op + (n * h + kvh * g + i) * d;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<Q>(acc[i * d + c] * inv);
      }
    }
  });
}

}  // namespace

namespace attnserve {

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& row_table, const at::Tensor& context_lens,
                           double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "inputs must be contiguous");
  const bool mixed = q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK((q.scalar_type() == k_cache.scalar_type() || mixed) && k_cache.scalar_type() == v_cache.scalar_type(),
              "the pool's dtype: q's, or bfloat16 under float32 queries");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "heads must group evenly");
  TORCH_CHECK(tables.scalar_type() == at::kLong && row_table.scalar_type() == at::kLong &&
              context_lens.scalar_type() == at::kLong, "tables, row_table and context_lens are int64");
  TORCH_CHECK(tables.dim() == 2 && tables.is_contiguous() && row_table.size(0) == q.size(0) &&
              context_lens.size(0) == q.size(0), "one table row and one length per query row");
  auto out = at::empty_like(q);
  if (mixed) {
    attend_rows<float, at::BFloat16>(q, k_cache, v_cache, tables, row_table.contiguous(), context_lens.contiguous(),
                                     scale, out);
  } else if (q.scalar_type() == at::kFloat) {
    attend_rows<float, float>(q, k_cache, v_cache, tables, row_table.contiguous(), context_lens.contiguous(), scale,
                              out);
  } else if (q.scalar_type() == at::kBFloat16) {
    attend_rows<at::BFloat16, at::BFloat16>(q, k_cache, v_cache, tables, row_table.contiguous(),
                                            context_lens.contiguous(), scale, out);
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16 only");
  }
  return out;
}

}  // namespace attnserve

#if !defined(ATTNSERVE_NO_BINDINGS)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &attnserve::paged_attention, "attention of each query row over its block table (CPU)");
}
#endif
