// Fused multi-head attention for XLA:CPU (forward and backward), called through the XLA FFI.
//
// Computes exactly what dmd_jax.model.attention computes (see _head_forward/_head_backward
// there): per sample b and head h, scores s = q k^T over the keys a query row may see, the
// row's max m and reciprocal normaliser r = 1 / (sum_j exp(s_j - m) * (1 - rate)), and the output
// r_i sum_j keep_ij exp(s_ij - m_i) v_j. The backward pass recomputes the probabilities from m and
// r exactly as the forward formed them (never as exp(s - lse) from a log-normaliser, whose
// rounding at the magnitude of lse puts a row-wide error into every probability). Dropout's keep
// mask uses the same hash bits as dmd_jax.rng.HASH_IMPL: element idx of row block r (row-major
// over (rows of the block, kmax_r keys)) keeps iff mix(mix(idx ^ k0) + k1) < threshold, with (k0, k1) the block's key.
//
// The point of the kernel is the memory traffic: XLA runs every pass over a (Tq, Tk) score
// tile as its own loop, while here one query row's scores (at most a few thousand floats) stay
// in L1 from the score product to the value product, in the backward pass too. Work is split
// over (sample, head) pairs on XLA's intra-op thread pool.
//
// Layouts: q (B, Tq, H, D), k and v (B, Tk, H, D), out (B, Tq, H, D), stats (B, H, Tq, 2) =
// [m, r] per row, keys (B, H, blocks, 2) uint32; float32 throughout.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DMD_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  int64_t batch, tq, tk, heads, dim;
  int64_t row_start;
  bool masked;          // causal: key j visible to row i iff j < row_start + i + 1 + offset
  int64_t offset;
  float rate;           // dropout on the probabilities, 0 = none
  uint32_t threshold;   // keep iff bits < threshold
  std::vector<int64_t> bounds;  // row blocks [bounds[r], bounds[r + 1])
  std::vector<int64_t> kmaxs;   // keys read by each block (the dropout index's row stride)
};

inline uint32_t Mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// exp for x <= 0 in float32, written so that the compiler vectorises the loops calling it:
// 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), p a degree-7 minimax
// polynomial (Cephes' expf coefficients); about 1 ulp. Inputs below -87 return ~1e-38 rather
// than 0, which no sum of probabilities can tell apart.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Row geometry: how many keys row i reads, and its dropout block, index base and key.
struct Row {
  int64_t keys;      // visible keys [0, keys)
  int64_t block;
  uint32_t base;     // dropout index of (row i, key 0)
};

inline Row RowOf(const Problem& pb, int64_t i) {
  Row row;
  row.keys = pb.masked ? std::min(pb.tk, pb.row_start + i + 1 + pb.offset) : pb.tk;
  int64_t b = 0;
  while (i >= pb.bounds[b + 1]) ++b;
  row.block = b;
  row.base = static_cast<uint32_t>((i - pb.bounds[b]) * pb.kmaxs[b]);
  return row;
}

// Packs head h of sample b of a (B, T, H, D) array into (D, T): one contiguous row per feature.
void PackTransposed(const Problem& pb, const float* x, int64_t t, int64_t b, int64_t h,
                    float* out) {
  const int64_t d = pb.dim;
  for (int64_t j = 0; j < t; ++j) {
    const float* src = x + ((b * t + j) * pb.heads + h) * d;
    for (int64_t c = 0; c < d; ++c) out[c * t + j] = src[c];
  }
}

// s[j] = q . k_j for j < n (k given transposed, (D, Tk)).
inline void Scores(const float* q, const float* kt, int64_t d, int64_t tk, int64_t n, float* s) {
  const float q0 = q[0];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = q0 * kt[j];
  for (int64_t c = 1; c < d; ++c) {
    const float qc = q[c];
    const float* kc = kt + c * tk;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] += qc * kc[j];
  }
}

// keep[j] = 1 where dropout keeps key j of the row, else 0.
inline void KeepMask(uint32_t base, uint32_t k0, uint32_t k1, uint32_t threshold, int64_t n,
                     float* keep) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = Mix(Mix((base + static_cast<uint32_t>(j)) ^ k0) + k1);
    keep[j] = bits < threshold ? 1.0f : 0.0f;
  }
}

void ForwardPair(const Problem& pb, const float* q, const float* k, const float* v,
                 const uint32_t* keys, float* out, float* stats, int64_t b, int64_t h,
                 float* scratch) {
  const int64_t d = pb.dim, tk = pb.tk, nb = static_cast<int64_t>(pb.kmaxs.size());
  float* kt = scratch;
  float* vt = kt + d * tk;
  float* s = vt + d * tk;
  float* keep = s + tk;
  PackTransposed(pb, k, tk, b, h, kt);
  PackTransposed(pb, v, tk, b, h, vt);
  for (int64_t i = 0; i < pb.tq; ++i) {
    const Row row = RowOf(pb, i);
    const int64_t n = row.keys;
    const float* qi = q + ((b * pb.tq + i) * pb.heads + h) * d;
    Scores(qi, kt, d, tk, n, s);
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = ExpNonPositive(s[j] - m);
      total += s[j];
    }
    if (pb.rate > 0.0f) {
      const uint32_t* key = keys + ((b * pb.heads + h) * nb + row.block) * 2;
      KeepMask(row.base, key[0], key[1], pb.threshold, n, keep);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] *= keep[j];
      total *= 1.0f - pb.rate;
    }
    float* oi = out + ((b * pb.tq + i) * pb.heads + h) * d;
    const float inv = 1.0f / total;
    for (int64_t c = 0; c < d; ++c) {
      const float* vc = vt + c * tk;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) acc += s[j] * vc[j];
      oi[c] = acc * inv;
    }
    float* st = stats + ((b * pb.heads + h) * pb.tq + i) * 2;
    st[0] = m;
    st[1] = inv;
  }
}

void BackwardPair(const Problem& pb, const float* q, const float* k, const float* v,
                  const uint32_t* keys, const float* out, const float* stats, const float* dout,
                  float* dq, float* dk, float* dv, int64_t b, int64_t h, float* scratch) {
  const int64_t d = pb.dim, tk = pb.tk, nb = static_cast<int64_t>(pb.kmaxs.size());
  float* kt = scratch;
  float* vt = kt + d * tk;
  float* dkt = vt + d * tk;
  float* dvt = dkt + d * tk;
  float* p = dvt + d * tk;
  float* dp = p + tk;
  float* keep = dp + tk;
  PackTransposed(pb, k, tk, b, h, kt);
  PackTransposed(pb, v, tk, b, h, vt);
  std::fill(dkt, dkt + 2 * d * tk, 0.0f);
  const bool drop = pb.rate > 0.0f;
  for (int64_t i = 0; i < pb.tq; ++i) {
    const Row row = RowOf(pb, i);
    const int64_t n = row.keys;
    const int64_t at = ((b * pb.tq + i) * pb.heads + h) * d;
    const float* qi = q + at;
    const float* doi = dout + at;
    float delta = 0.0f;
    for (int64_t c = 0; c < d; ++c) delta += doi[c] * out[at + c];
    const float* st = stats + ((b * pb.heads + h) * pb.tq + i) * 2;
    const float m = st[0], r = st[1];
    Scores(qi, kt, d, tk, n, p);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) p[j] = ExpNonPositive(p[j] - m) * r;   // P / (1 - rate)
    Scores(doi, vt, d, tk, n, dp);                                       // dO . v_j
    if (drop) {
      const uint32_t* key = keys + ((b * pb.heads + h) * nb + row.block) * 2;
      KeepMask(row.base, key[0], key[1], pb.threshold, n, keep);
      const float scaled = (1.0f - pb.rate) * delta;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float pz = p[j] * keep[j];
        const float ds = p[j] * (keep[j] * dp[j] - scaled);   // difference first, as autodiff
        p[j] = pz;    // p now holds P * Z (for dv), dp holds ds
        dp[j] = ds;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
    }
    float* dqi = dq + at;
    for (int64_t c = 0; c < d; ++c) {
      const float* kc = kt + c * tk;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) acc += dp[j] * kc[j];
      dqi[c] = acc;
      float* dkc = dkt + c * tk;
      float* dvc = dvt + c * tk;
      const float qc = qi[c], doc = doi[c];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        dkc[j] += dp[j] * qc;
        dvc[j] += p[j] * doc;
      }
    }
  }
  for (int64_t j = 0; j < tk; ++j) {
    float* dkj = dk + ((b * tk + j) * pb.heads + h) * d;
    float* dvj = dv + ((b * tk + j) * pb.heads + h) * d;
    for (int64_t c = 0; c < d; ++c) {
      dkj[c] = dkt[c * tk + j];
      dvj[c] = dvt[c * tk + j];
    }
  }
}

#ifdef DMD_AVX2
// The same computation eight keys at a time, for head widths up to 16 (a template parameter, so
// that a row's per-feature accumulators live in registers). A head's keys and values are packed
// in panels of eight keys (see PackPadded), zero-padded to a multiple of 8; lanes past a row's
// visible keys are masked out.

constexpr int64_t kLanes = 8;
inline int64_t RoundUp8(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256i Mix8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0x846CA68Bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// All-ones lanes where key j0 + lane is visible (j < n).
inline __m256 Visible8(int64_t j0, int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i left = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(n - j0, 8)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, lane));
}

// All-ones lanes that dropout keeps: bits < threshold (unsigned, via the sign-flip trick).
inline __m256 Keep8(uint32_t index, uint32_t k0, uint32_t k1, uint32_t threshold) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(index)), lane);
  x = Mix8(_mm256_add_epi32(Mix8(_mm256_xor_si256(x, _mm256_set1_epi32(static_cast<int32_t>(k0)))),
                            _mm256_set1_epi32(static_cast<int32_t>(k1))));
  const __m256i flip = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m256i t = _mm256_set1_epi32(static_cast<int32_t>(threshold ^ 0x80000000u));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(t, _mm256_xor_si256(x, flip)));
}

inline float HorizontalSum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline float HorizontalMax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// (D, stride) transposed copy of head h of sample b, zero beyond t.
// Offset of feature 0 of key j in a panel-packed head (feature c is c * 8 further on).
inline int64_t PanelIndex(int D, int64_t j) { return (j / kLanes) * kLanes * D + j % kLanes; }

// Offset of feature c of the panel starting at key j (a multiple of 8).
inline int64_t At(int D, int64_t j, int c) { return j * D + c * kLanes; }

// Packs head h of sample b of a (B, T, H, D) array in panels of eight keys: feature c of keys
// 8m..8m+7 is the vector at out + 8m * D + 8c, so the D vectors of one panel are contiguous and
// every address in the loops below is a base pointer plus a constant. Zero beyond t.
template <int D>
void PackPadded(const Problem& pb, const float* x, int64_t t, int64_t stride, int64_t b,
                int64_t h, float* out) {
  std::fill(out + (t / kLanes) * kLanes * D, out + stride * D, 0.0f);
  for (int64_t j = 0; j < t; ++j) {
    const float* src = x + ((b * t + j) * pb.heads + h) * D;
    float* dst = out + PanelIndex(D, j);
    for (int c = 0; c < D; ++c) dst[c * kLanes] = src[c];
  }
}

template <int D>
inline __m256 Dot8(const float* x, const float* t, int64_t j) {
  const float* p = t + j * D;
  __m256 acc = _mm256_mul_ps(_mm256_set1_ps(x[0]), _mm256_loadu_ps(p));
  for (int c = 1; c < D; ++c) {
    acc = _mm256_fmadd_ps(_mm256_set1_ps(x[c]), _mm256_loadu_ps(p + c * kLanes), acc);
  }
  return acc;
}

template <int D>
void ForwardPair8(const Problem& pb, const float* q, const float* k, const float* v,
                  const uint32_t* keys, float* out, float* stats, int64_t b, int64_t h,
                  float* scratch) {
  const int64_t stride = RoundUp8(pb.tk), nb = static_cast<int64_t>(pb.kmaxs.size());
  float* kt = scratch;
  float* vt = kt + D * stride;
  float* s = vt + D * stride;
  PackPadded<D>(pb, k, pb.tk, stride, b, h, kt);
  PackPadded<D>(pb, v, pb.tk, stride, b, h, vt);
  const bool drop = pb.rate > 0.0f;
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
  for (int64_t i = 0; i < pb.tq; ++i) {
    const Row row = RowOf(pb, i);
    const int64_t n = row.keys;
    const float* qi = q + ((b * pb.tq + i) * pb.heads + h) * D;
    __m256 m8 = minus_inf;
    for (int64_t j = 0; j < n; j += kLanes) {
      __m256 sj = Dot8<D>(qi, kt, j);
      sj = _mm256_blendv_ps(minus_inf, sj, Visible8(j, n));
      _mm256_storeu_ps(s + j, sj);
      m8 = _mm256_max_ps(m8, sj);
    }
    const __m256 m = _mm256_set1_ps(HorizontalMax(m8));
    const uint32_t* key = keys + ((b * pb.heads + h) * nb + row.block) * 2;
    __m256 total8 = _mm256_setzero_ps();
    __m256 acc[D];
    for (int c = 0; c < D; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += kLanes) {
      __m256 e = _mm256_and_ps(Exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m)), Visible8(j, n));
      total8 = _mm256_add_ps(total8, e);
      if (drop) {
        e = _mm256_and_ps(e, Keep8(row.base + static_cast<uint32_t>(j), key[0], key[1],
                                   pb.threshold));
      }
      for (int c = 0; c < D; ++c) {
        acc[c] = _mm256_fmadd_ps(e, _mm256_loadu_ps(vt + At(D, j, c)), acc[c]);
      }
    }
    float total = HorizontalSum(total8);
    if (drop) total *= 1.0f - pb.rate;
    const float inv = 1.0f / total;
    float* oi = out + ((b * pb.tq + i) * pb.heads + h) * D;
    for (int c = 0; c < D; ++c) oi[c] = HorizontalSum(acc[c]) * inv;
    float* st = stats + ((b * pb.heads + h) * pb.tq + i) * 2;
    st[0] = HorizontalMax(m8);
    st[1] = inv;
  }
}

// Backward for R consecutive query rows at once (R = 1 or 2). One sweep over the keys forms
// each row's ds and P*Z eight keys at a time and adds both rows' contributions to dk and dv with
// one load and one store per feature vector (the accumulators of dk and dv live in L1, so their
// load/store traffic, not the FMAs, bounds a one-row sweep); each row's ds goes to a row buffer,
// from which a second, register-resident sweep forms dq.
template <int D, int R>
inline void BackwardRows8(const Problem& pb, const float* q, const float* out, const float* stats,
                          const float* dout, const uint32_t* keys, float* dq, int64_t b,
                          int64_t h, int64_t i0, const float* kt, const float* vt, float* dkt,
                          float* dvt, float* dsbuf, int64_t stride) {
  const int64_t nb = static_cast<int64_t>(pb.kmaxs.size());
  const bool drop = pb.rate > 0.0f;
  int64_t n[R], at[R];
  uint32_t base[R];
  const uint32_t* key[R];
  __m256 m[R], inv[R], scaled[R];
  int64_t nmax = 0;
  for (int r = 0; r < R; ++r) {
    const Row row = RowOf(pb, i0 + r);
    n[r] = row.keys;
    nmax = std::max(nmax, n[r]);
    base[r] = row.base;
    at[r] = ((b * pb.tq + i0 + r) * pb.heads + h) * D;
    float delta = 0.0f;
    for (int c = 0; c < D; ++c) delta += dout[at[r] + c] * out[at[r] + c];
    const float* st = stats + ((b * pb.heads + h) * pb.tq + i0 + r) * 2;
    m[r] = _mm256_set1_ps(st[0]);
    inv[r] = _mm256_set1_ps(st[1]);
    scaled[r] = _mm256_set1_ps(drop ? (1.0f - pb.rate) * delta : delta);
    key[r] = keys + ((b * pb.heads + h) * nb + row.block) * 2;
  }
  for (int64_t j = 0; j < nmax; j += kLanes) {
    __m256 ds[R], pz[R];
    for (int r = 0; r < R; ++r) {
      const __m256 p = _mm256_and_ps(
          _mm256_mul_ps(Exp8(_mm256_sub_ps(Dot8<D>(q + at[r], kt, j), m[r])), inv[r]),
          Visible8(j, n[r]));                                                 // P / (1 - rate)
      const __m256 dp = Dot8<D>(dout + at[r], vt, j);              // dO . v_j
      if (drop) {
        const __m256 keep = Keep8(base[r] + static_cast<uint32_t>(j), key[r][0], key[r][1],
                                  pb.threshold);
        pz[r] = _mm256_and_ps(p, keep);
        // difference first, then the scaling by p (as autodiff of softmax): where one key
        // dominates a row, dp and delta cancel and the rounding stays relative to the difference
        ds[r] = _mm256_mul_ps(p, _mm256_sub_ps(_mm256_and_ps(dp, keep), scaled[r]));
      } else {
        pz[r] = p;
        ds[r] = _mm256_mul_ps(p, _mm256_sub_ps(dp, scaled[r]));
      }
      _mm256_storeu_ps(dsbuf + r * stride + j, ds[r]);
    }
    for (int c = 0; c < D; ++c) {
      float* dkc = dkt + At(D, j, c);
      float* dvc = dvt + At(D, j, c);
      __m256 dk = _mm256_loadu_ps(dkc), dv = _mm256_loadu_ps(dvc);
      for (int r = 0; r < R; ++r) {
        dk = _mm256_fmadd_ps(ds[r], _mm256_set1_ps(q[at[r] + c]), dk);
        dv = _mm256_fmadd_ps(pz[r], _mm256_set1_ps(dout[at[r] + c]), dv);
      }
      _mm256_storeu_ps(dkc, dk);
      _mm256_storeu_ps(dvc, dv);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 acc[D];
    for (int c = 0; c < D; ++c) acc[c] = _mm256_setzero_ps();
    const float* dsr = dsbuf + r * stride;
    for (int64_t j = 0; j < n[r]; j += kLanes) {
      const __m256 d = _mm256_loadu_ps(dsr + j);
      for (int c = 0; c < D; ++c) acc[c] = _mm256_fmadd_ps(d, _mm256_loadu_ps(kt + At(D, j, c)), acc[c]);
    }
    for (int c = 0; c < D; ++c) dq[at[r] + c] = HorizontalSum(acc[c]);
  }
}

template <int D>
void BackwardPair8(const Problem& pb, const float* q, const float* k, const float* v,
                   const uint32_t* keys, const float* out, const float* stats, const float* dout,
                   float* dq, float* dk, float* dv, int64_t b, int64_t h, float* scratch) {
  const int64_t tk = pb.tk, stride = RoundUp8(tk);
  float* kt = scratch;
  float* vt = kt + D * stride;
  float* dkt = vt + D * stride;
  float* dvt = dkt + D * stride;
  float* dsbuf = dvt + D * stride;                 // two rows of ds
  PackPadded<D>(pb, k, tk, stride, b, h, kt);
  PackPadded<D>(pb, v, tk, stride, b, h, vt);
  std::fill(dkt, dkt + 2 * D * stride, 0.0f);
  int64_t i = 0;
  for (; i + 2 <= pb.tq; i += 2) {
    BackwardRows8<D, 2>(pb, q, out, stats, dout, keys, dq, b, h, i, kt, vt, dkt, dvt, dsbuf, stride);
  }
  if (i < pb.tq) {
    BackwardRows8<D, 1>(pb, q, out, stats, dout, keys, dq, b, h, i, kt, vt, dkt, dvt, dsbuf, stride);
  }
  for (int64_t j = 0; j < tk; ++j) {
    float* dkj = dk + ((b * tk + j) * pb.heads + h) * D;
    float* dvj = dv + ((b * tk + j) * pb.heads + h) * D;
    const int64_t at = PanelIndex(D, j);
    for (int c = 0; c < D; ++c) {
      dkj[c] = dkt[at + c * kLanes];
      dvj[c] = dvt[at + c * kLanes];
    }
  }
}

using ForwardFn = void (*)(const Problem&, const float*, const float*, const float*,
                           const uint32_t*, float*, float*, int64_t, int64_t, float*);
using BackwardFn = void (*)(const Problem&, const float*, const float*, const float*,
                            const uint32_t*, const float*, const float*, const float*, float*,
                            float*, float*, int64_t, int64_t, float*);

template <int... Ds>
struct Table {
  static ForwardFn Forward(int64_t d) {
    ForwardFn fn = nullptr;
    ((d == Ds ? (fn = &ForwardPair8<Ds>, 0) : 0), ...);
    return fn;
  }
  static BackwardFn Backward(int64_t d) {
    BackwardFn fn = nullptr;
    ((d == Ds ? (fn = &BackwardPair8<Ds>, 0) : 0), ...);
    return fn;
  }
};
using Widths = Table<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;
#endif  // DMD_AVX2

// Runs fn(pair, scratch) for every (sample, head) pair, on the calling thread and on up to
// num_threads - 1 tasks of the intra-op pool. The caller takes pairs too, so the call finishes
// even when the pool is busy; tasks that start after the work is gone return at once.
template <typename Fn>
void ParallelPairs(ffi::ThreadPool& pool, int64_t pairs, int64_t scratch_floats, Fn fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, pairs, scratch_floats, fn]() {
    std::vector<float> scratch(scratch_floats);
    int64_t finished = 0;
    for (int64_t i; (i = shared->next.fetch_add(1)) < pairs; ++finished) fn(i, scratch.data());
    if (finished > 0 && shared->done.fetch_add(finished) + finished == pairs) {
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), pairs) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == pairs; });
}

ffi::Error MakeProblem(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                       const ffi::Buffer<ffi::U32>& keys, int64_t row_start, int64_t offset,
                       float rate, int64_t threshold, ffi::Span<const int64_t> bounds,
                       ffi::Span<const int64_t> kmaxs, Problem* pb) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3]) {
    return ffi::Error::InvalidArgument("attention: q must be (B, Tq, H, D), k and v (B, Tk, H, D)");
  }
  pb->batch = qd[0];
  pb->tq = qd[1];
  pb->heads = qd[2];
  pb->dim = qd[3];
  pb->tk = kd[1];
  pb->row_start = row_start;
  pb->masked = offset >= 0;
  pb->offset = offset;
  pb->rate = rate;
  pb->threshold = static_cast<uint32_t>(threshold);
  pb->bounds.assign(bounds.begin(), bounds.end());
  pb->kmaxs.assign(kmaxs.begin(), kmaxs.end());
  const int64_t nb = static_cast<int64_t>(pb->kmaxs.size());
  if (nb < 1 || static_cast<int64_t>(pb->bounds.size()) != nb + 1 || pb->bounds[0] != 0 ||
      pb->bounds[nb] != pb->tq) {
    return ffi::Error::InvalidArgument("attention: row blocks must cover the query rows");
  }
  if (rate > 0.0f && static_cast<int64_t>(keys.element_count()) != pb->batch * pb->heads * nb * 2) {
    return ffi::Error::InvalidArgument("attention: keys must be (B, H, blocks, 2)");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U32> keys,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> stats,
                   int64_t row_start, int64_t offset, float rate, int64_t threshold,
                   ffi::Span<const int64_t> bounds, ffi::Span<const int64_t> kmaxs) {
  Problem pb;
  if (auto err = MakeProblem(q, k, keys, row_start, offset, rate, threshold, bounds, kmaxs, &pb);
      err.failure()) {
    return err;
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const uint32_t* kyp = keys.typed_data();
  float *op = out->typed_data(), *lp = stats->typed_data();
#ifdef DMD_AVX2
  if (ForwardFn fn = Widths::Forward(pb.dim)) {
    const int64_t scratch = (2 * pb.dim + 1) * RoundUp8(pb.tk) + 16;
    ParallelPairs(pool, pb.batch * pb.heads, scratch,
                  [&pb, fn, qp, kp, vp, kyp, op, lp](int64_t i, float* s) {
      fn(pb, qp, kp, vp, kyp, op, lp, i / pb.heads, i % pb.heads, s);
    });
    return ffi::Error::Success();
  }
#endif
  const int64_t scratch = 2 * pb.dim * pb.tk + 2 * pb.tk + 16;
  ParallelPairs(pool, pb.batch * pb.heads, scratch, [&pb, qp, kp, vp, kyp, op, lp](int64_t i, float* s) {
    ForwardPair(pb, qp, kp, vp, kyp, op, lp, i / pb.heads, i % pb.heads, s);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U32> keys,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> stats,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int64_t row_start, int64_t offset, float rate, int64_t threshold,
                    ffi::Span<const int64_t> bounds, ffi::Span<const int64_t> kmaxs) {
  Problem pb;
  if (auto err = MakeProblem(q, k, keys, row_start, offset, rate, threshold, bounds, kmaxs, &pb);
      err.failure()) {
    return err;
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = stats.typed_data(), *dop = dout.typed_data();
  const uint32_t* kyp = keys.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
#ifdef DMD_AVX2
  if (BackwardFn fn = Widths::Backward(pb.dim)) {
    const int64_t scratch = (4 * pb.dim + 2) * RoundUp8(pb.tk) + 16;
    ParallelPairs(pool, pb.batch * pb.heads, scratch,
                  [&pb, fn, qp, kp, vp, kyp, op, lp, dop, dqp, dkp, dvp](int64_t i, float* s) {
      fn(pb, qp, kp, vp, kyp, op, lp, dop, dqp, dkp, dvp, i / pb.heads, i % pb.heads, s);
    });
    return ffi::Error::Success();
  }
#endif
  const int64_t scratch = 4 * pb.dim * pb.tk + 3 * pb.tk + 16;
  ParallelPairs(pool, pb.batch * pb.heads, scratch,
                [&pb, qp, kp, vp, kyp, op, lp, dop, dqp, dkp, dvp](int64_t i, float* s) {
    BackwardPair(pb, qp, kp, vp, kyp, op, lp, dop, dqp, dkp, dvp, i / pb.heads, i % pb.heads, s);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmdAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("row_start")
                                  .Attr<int64_t>("offset")
                                  .Attr<float>("rate")
                                  .Attr<int64_t>("threshold")
                                  .Attr<ffi::Span<const int64_t>>("bounds")
                                  .Attr<ffi::Span<const int64_t>>("kmaxs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DmdAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("row_start")
                                  .Attr<int64_t>("offset")
                                  .Attr<float>("rate")
                                  .Attr<int64_t>("threshold")
                                  .Attr<ffi::Span<const int64_t>>("bounds")
                                  .Attr<ffi::Span<const int64_t>>("kmaxs"));
