/* mptkit: the CPU kernels of the decode step (fp32), called through ctypes by mptkit/infer/kernels.py.
 *
 * 1. mptkit_smallgemm: y = x @ w^T (+ b) for a few rows of x — the decode step's linear layers.
 *    x (M, K), w (N, K) as nn.Linear stores it, b (N) or NULL, y (M, N); all row-major and contiguous.
 *    At decode time M is the number of sequences in the batch (1..8 typically) and the cost is streaming w.
 *    A BLAS GEMM at such M runs w through a blocking scheme made for large M: at M = 8 it costs well above its
 *    M = 1 time (measured: bench/results/inference.md), though the arithmetic is small next to the bytes moved.
 *    Here each thread walks its own blocks of w's rows once, for all M rows of x at a time: per step of VW
 *    floats along K it loads NB rows of w and does M x NB fused multiply-adds against x (which stays in L1/L2),
 *    prefetching w PFD (L1) and PFD2 (L2) floats ahead
 *    so the core keeps enough memory requests in flight. Blocks of x past 8 rows are done 8 at a time while
 *    the same rows of w are hot in cache. Every output element is one dot product summed in the same order
 *    whatever M is, so a sequence's result does not depend on which other sequences share the batch.
 *
 * 2. mptkit_decode_attention: one new token per cache slot — write its key/value row into the cache, then
 *    ALiBi (or plain) causal attention over the slot's own keys (see the comment at the function).
 *
 * Built with -O3 -march=native (-fopenmp): x86-64 with AVX-512F or AVX2+FMA only (anything else is refused
 * at compile time and the caller keeps torch.mm and the batched-matmul attention).
 */
#include <immintrin.h>
#include <stddef.h>
#include <string.h>

#ifndef PFD
#define PFD 1024 /* prefetch distance along a row of w, in floats, into L1 */
#endif
#ifndef PFD2
#define PFD2 4096 /* and farther ahead into L2 (kept after paired A/B runs; measured: bench/results/inference.md) */
#endif

#if defined(__AVX512F__)
#define VW 16
#define NB 2
typedef __m512 vf;
#define LD(p) _mm512_loadu_ps(p)
#define ST(p, v) _mm512_storeu_ps(p, v)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ZERO() _mm512_setzero_ps()
#define SET1(x) _mm512_set1_ps(x)
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VROUND(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2I(k) \
  _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23))
#define VABS(a) _mm512_abs_ps(a)
#define VCOPYSIGN(a, s)                                                \
  _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_and_si512(_mm512_castps_si512(s), \
                                                                               _mm512_set1_epi32((int)0x80000000))))
#define VDIV(a, b) _mm512_div_ps(a, b)
#define VKEEP_GE(v, y, t) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, t, _CMP_GE_OQ), v) /* v where y >= t, else 0 */
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define NB 1
typedef __m256 vf;
#define LD(p) _mm256_loadu_ps(p)
#define ST(p, v) _mm256_storeu_ps(p, v)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define ZERO() _mm256_setzero_ps()
#define SET1(x) _mm256_set1_ps(x)
#define VMAX(a, b) _mm256_max_ps(a, b)
#define VROUND(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2I(k) \
  _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23))
#define VABS(a) _mm256_andnot_ps(_mm256_set1_ps(-0.f), a)
#define VCOPYSIGN(a, s) _mm256_or_ps(a, _mm256_and_ps(s, _mm256_set1_ps(-0.f)))
#define VDIV(a, b) _mm256_div_ps(a, b)
#define VKEEP_GE(v, y, t) _mm256_and_ps(v, _mm256_cmp_ps(y, t, _CMP_GE_OQ))
static inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
#error "smallgemm needs AVX-512F or AVX2 with FMA"
#endif

/* rows n0..n1 of w against M rows of x (M a compile-time constant, so the accumulators live in registers) */
#define ROWS(M)                                                                                          \
  static void rows##M(const float *x, const float *w, const float *b, float *y, long N, long K, long n0, \
                      long n1) {                                                                         \
    const long kv = K / VW * VW;                                                                         \
    long n = n0;                                                                                         \
    for (; n + NB <= n1; n += NB) {                                                                      \
      vf a[NB][M];                                                                                       \
      _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++)                                               \
      _Pragma("GCC unroll 8") for (int m = 0; m < M; m++) a[j][m] = ZERO();                              \
      const float *wn = w + n * K;                                                                       \
      for (long k = 0; k < kv; k += VW) {                                                                \
        vf u[NB];                                                                                        \
        _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) {                                           \
          u[j] = LD(wn + j * K + k);                                                                     \
          _mm_prefetch((const char *)(wn + j * K + k + PFD), _MM_HINT_T0);                               \
          _mm_prefetch((const char *)(wn + j * K + k + PFD2), _MM_HINT_T1);                              \
        }                                                                                                \
        _Pragma("GCC unroll 8") for (int m = 0; m < M; m++) {                                            \
          const vf xv = LD(x + m * K + k);                                                               \
          _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++) a[j][m] = FMA(u[j], xv, a[j][m]);         \
        }                                                                                                \
      }                                                                                                  \
      _Pragma("GCC unroll 8") for (int j = 0; j < NB; j++)                                               \
      _Pragma("GCC unroll 8") for (int m = 0; m < M; m++) {                                              \
        float s = hsum(a[j][m]);                                                                         \
        for (long k = kv; k < K; k++) s += x[m * K + k] * wn[j * K + k];                                 \
        y[m * N + n + j] = b ? s + b[n + j] : s;                                                         \
      }                                                                                                  \
    }                                                                                                    \
    for (; n < n1; n++) /* rows left over when NB does not divide the block */                          \
      for (int m = 0; m < M; m++) {                                                                      \
        vf acc = ZERO();                                                                                 \
        for (long k = 0; k < kv; k += VW) acc = FMA(LD(w + n * K + k), LD(x + m * K + k), acc);          \
        float s = hsum(acc);                                                                             \
        for (long k = kv; k < K; k++) s += x[m * K + k] * w[n * K + k];                                  \
        y[m * N + n] = b ? s + b[n] : s;                                                                 \
      }                                                                                                  \
  }

ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)

typedef void (*rows_fn)(const float *, const float *, const float *, float *, long, long, long, long);
static const rows_fn ROWS_FN[9] = {0, rows1, rows2, rows3, rows4, rows5, rows6, rows7, rows8};

/* 0 on success; -1 for a bad shape. nthreads <= 1 runs on the calling thread. */
int mptkit_smallgemm(const float *x, const float *w, const float *b, float *y, long M, long N, long K,
                     int nthreads) {
  if (M < 1 || N < 1 || K < 1) return -1;
  const long block = 64; /* rows of w per task: 64 x K floats stay in L2 while every block of x passes */
  const long tasks = (N + block - 1) / block;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
  for (long t = 0; t < tasks; t++) {
    const long n0 = t * block, n1 = n0 + block < N ? n0 + block : N;
    for (long m0 = 0; m0 < M; m0 += 8) {
      const long mb = M - m0 < 8 ? M - m0 : 8;
      ROWS_FN[mb](x + m0 * K, w, b, y + m0 * N, N, K, n0, n1);
    }
  }
  return 0;
}

int mptkit_smallgemm_vector_width(void) { return VW; }

/* ---------------------------------------------------------------------------------------------------------
 * Decode attention over the KV cache: one new token for each of n slots, in place.
 *
 * q (n, H*D), knew / vnew (n, Hkv*D): rows with strides qrow / krow / vrow (column slices of the fused Wqkv
 * output, or tensors of their own after qk_ln).
 * kc / vc: one layer of the cache, (slots, Hkv, cap, D) contiguous. pos[s]: slot s's length before this token,
 * i.e. where its new key/value row is written. out (n, H*D). slopes (H) for ALiBi, or NULL for none.
 * Query head h reads kv head h / (H / Hkv) (MHA, GQA, MQA). top > max(pos), top <= cap; scratch: n*H*top floats.
 *
 * score_j = scale * q.k_j + slope * (j - pos)  for j = 0..pos; softmax; out = sum_j p_j v_j — the arithmetic of
 * CacheAttention.attend (infer/cache_attention.py, float32), without the (n*Hkv, rep, T) batched matmuls.
 */
#include <math.h>
#ifndef APF
#define APF 32 /* keys ahead to prefetch in decode attention (the tail of a slot's rows reads past len: harmless) */
#endif

/* exp(y) for y <= 0 (Cody-Waite reduction, degree-7 Taylor on |r| <= ln2/2: relative error < 2e-8 before
 * rounding); exactly 0 below -87, where exp is under FLT_MIN: no denormal results, which cost a microcode
 * assist per operation here and in every multiply they later feed (softmax weights, erf). */
static inline vf vexp_nonpos(vf y0) {
  const vf y = VMAX(y0, SET1(-87.f));
  const vf k = VROUND(y * SET1(1.44269504088896341f));
  const vf r = y - k * SET1(0.693359375f) + k * SET1(2.12194440e-4f);
  vf p = SET1(1.f / 5040.f);
  p = p * r + SET1(1.f / 720.f);
  p = p * r + SET1(1.f / 120.f);
  p = p * r + SET1(1.f / 24.f);
  p = p * r + SET1(1.f / 6.f);
  p = p * r + SET1(0.5f);
  p = p * r + SET1(1.f);
  p = p * r + SET1(1.f);
  return VKEEP_GE(p * VPOW2I(k), y0, SET1(-87.f));
}

/* Eight sums at once: lane r of the result is the sum of the lanes of a[r] (a shared add tree instead of eight
 * separate horizontal reductions, whose shuffles dominated the score loop). */
static inline __m256 hsum8x(const vf *a) {
  __m256 y[8];
  for (int r = 0; r < 8; r++)
#if VW == 16
    y[r] = _mm256_add_ps(_mm512_castps512_ps256(a[r]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[r]), 1)));
#else
    y[r] = a[r];
#endif
  const __m256 s01 = _mm256_hadd_ps(y[0], y[1]), s23 = _mm256_hadd_ps(y[2], y[3]);
  const __m256 s45 = _mm256_hadd_ps(y[4], y[5]), s67 = _mm256_hadd_ps(y[6], y[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  /* s0123 = [a0 a1 a2 a3 (lanes 0-3) | a0 a1 a2 a3 (lanes 4-7)], the same for s4567 */
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

/* Prefetch `bytes` bytes from p into L1, one request per cache line. */
static inline void prefetch_span(const void *p, long bytes) {
  for (long o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + o, _MM_HINT_T0);
}

static inline void prefetch_span_l2(const void *p, long bytes) {
  for (long o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + o, _MM_HINT_T1);
}

/* ALiBi with a steep slope makes far keys irrelevant, exactly: a key j gets softmax weight exp(s_j - max) with
 * s_j - max <= s_j - s_pos = scale * q.(k_j - k_pos) - slope * (pos - j) <= 2 * scale * |q| * kmax - slope * (pos - j),
 * kmax bounding every |k| of the slot's kv head (kept as keys are written). Where that is below -88 the
 * kernel's exp (vexp_nonpos: exactly 0 below -87) gives 0, and a 0 weight adds nothing to the sum or the
 * output (x + 0 = x, 0 * v = 0 for finite v): such keys need not be read. The first key to read, rounded down to
 * the vector width and never past the vector part (lv) — so every key skipped would have gone through
 * vexp_nonpos and every key kept is computed in the same blocks, sums and order as without skipping: the
 * result is bitwise the same. StoryWriter-length contexts (84k) read a fraction of the keys this way. */
static inline long skip_keys(const float *qh, long D, float kmax, float slope, float scale, long pos, long lv) {
  if (!(slope > 0.f) || !(kmax >= 0.f) || !isfinite(kmax)) return 0;
  double qn = 0.0;
  for (long c = 0; c < D; c++) qn += (double)qh[c] * qh[c];
  qn = sqrt(qn) * (1.0 + 1e-5);
  const double reach = (2.0 * fabs((double)scale) * qn * (double)kmax * (1.0 + 1e-5) + 88.0) / (double)slope;
  if (!(reach < (double)pos)) return 0;
  long cut = pos - (long)ceil(reach) - 1; /* keys j < cut: slope * (pos - j) > reach * slope */
  if (cut > lv) cut = lv;
  return cut > 0 ? cut / VW * VW : 0;
}

/* The kernel once per K/V storage type: NAME, the element type KT, LDK (VW elements -> vf), TOF / FROMF (one
 * element to / from float).
 * Scores: keys in blocks of 8 — eight independent dot-product chains, reduced together by hsum8x — with every
 * cache line of the rows APF keys ahead prefetched (a row of D = 64 fp32 is four lines); the values: two keys per
 * iteration into two sets of accumulators (the FMA latency chains of one set alone bound the loop). */
#define DECODE_ATTENTION(NAME, KT, LDK, TOF, FROMF) \
static inline float dot_##NAME(const float *a, const KT *b, long d) {                                              \
  const long dv = d / VW * VW;                                                                                     \
  vf acc = ZERO();                                                                                                 \
  for (long c = 0; c < dv; c += VW) acc = FMA(LD(a + c), LDK(b + c), acc);                                         \
  float s = hsum(acc);                                                                                             \
  for (long c = dv; c < d; c++) s += a[c] * TOF(b[c]);                                                             \
  return s;                                                                                                        \
}                                                                                                                  \
                                                                                                                   \
static int attention_##NAME(const float *q, const float *knew, const float *vnew, long qrow, long krow, long vrow, \
                            KT *kc, KT *vc, float *kmax, const long *pos, long top, float *out, float *scratch,    \
                            long n, long H, long Hkv, long D, long cap, const float *slopes, float scale,           \
                            int nthreads) {                                                                        \
  if (n < 1 || H < 1 || Hkv < 1 || H % Hkv || D < 1 || top > cap) return -1;                                       \
  for (long s = 0; s < n; s++) /* pos < 0: an idle slot (no write, zero output); scratch holds `top` scores */      \
    if (pos[s] >= top) return -2;                                                                                  \
  const long rep = H / Hkv, tmax = top;                                                                            \
  for (long s = 0; s < n; s++) /* write the new rows first: every head of the slot reads them */                   \
    for (long g = 0; g < Hkv && pos[s] >= 0; g++) {                                                               \
      KT *kd = kc + ((s * Hkv + g) * cap + pos[s]) * D, *vd = vc + ((s * Hkv + g) * cap + pos[s]) * D;             \
      float kn = 0.f;                                                                                              \
      for (long c = 0; c < D; c++) {                                                                               \
        kd[c] = FROMF(knew[s * krow + g * D + c]);                                                                 \
        vd[c] = FROMF(vnew[s * vrow + g * D + c]);                                                                 \
        kn += TOF(kd[c]) * TOF(kd[c]);                                                                             \
      }                                                                                                            \
      if (kmax) {                                                                                                  \
        kn = sqrtf(kn);                                                                                            \
        if (kn > kmax[s * Hkv + g]) kmax[s * Hkv + g] = kn;                                                        \
      }                                                                                                            \
    }                                                                                                              \
  const long tasks = n * H, rowb = D * (long)sizeof(KT), dv = D / VW * VW;                                         \
  _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && tasks > 1)")            \
  for (long t = 0; t < tasks; t++) {                                                                               \
    const long s = t / H, h = t % H, g = h / rep, len = pos[s] + 1;                                                \
    const float *qh = q + s * qrow + h * D;                                                                        \
    const KT *K = kc + (s * Hkv + g) * cap * D, *V = vc + (s * Hkv + g) * cap * D;                                 \
    float *p = scratch + t * tmax, *o = out + s * H * D + h * D;                                                   \
    if (len <= 0) { /* an idle slot */                                                                             \
      for (long c = 0; c < D; c++) o[c] = 0.f;                                                                     \
      continue;                                                                                                    \
    }                                                                                                              \
    const float slope = slopes ? slopes[h] : 0.f;                                                                  \
    const long lv = len / VW * VW;                                                                                 \
    const long j0 = kmax ? skip_keys(qh, D, kmax[s * Hkv + g], slope, scale, pos[s], lv) : 0;                       \
    prefetch_span(K + j0 * D, (len - j0 < APF ? len - j0 : APF) * rowb);                                           \
    float mx = -INFINITY;                                                                                          \
    long j = j0;                                                                                                   \
    if (len - j0 >= 8) {                                                                                           \
      __m256 vmx = _mm256_set1_ps(-INFINITY);                                                                      \
      const __m256 iota = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);                                  \
      for (; j + 8 <= len; j += 8) {                                                                               \
        if (j + APF < len) prefetch_span(K + (j + APF) * D, 8 * rowb);                                             \
        prefetch_span_l2(V + j * D, 8 * rowb); /* the values are read next: start them coming */                   \
        vf a[8];                                                                                                   \
        for (int r = 0; r < 8; r++) a[r] = ZERO();                                                                 \
        for (long c = 0; c < dv; c += VW) {                                                                        \
          const vf qv = LD(qh + c);                                                                                \
          for (int r = 0; r < 8; r++) a[r] = FMA(qv, LDK(K + (j + r) * D + c), a[r]);                              \
        }                                                                                                          \
        __m256 sc = hsum8x(a);                                                                                     \
        if (dv < D) { /* head dimension not a multiple of the vector width: the rest one by one */                 \
          float tail[8];                                                                                           \
          for (int r = 0; r < 8; r++) {                                                                            \
            float x = 0.f;                                                                                         \
            for (long c = dv; c < D; c++) x += qh[c] * TOF(K[(j + r) * D + c]);                                    \
            tail[r] = x;                                                                                           \
          }                                                                                                        \
          sc = _mm256_add_ps(sc, _mm256_loadu_ps(tail));                                                           \
        }                                                                                                          \
        const __m256 rel = _mm256_add_ps(iota, _mm256_set1_ps((float)(j - pos[s])));                               \
        sc = _mm256_fmadd_ps(_mm256_set1_ps(slope), rel, _mm256_mul_ps(_mm256_set1_ps(scale), sc));                \
        _mm256_storeu_ps(p + j, sc);                                                                               \
        vmx = _mm256_max_ps(vmx, sc);                                                                              \
      }                                                                                                            \
      float m8[8];                                                                                                 \
      _mm256_storeu_ps(m8, vmx);                                                                                   \
      for (int r = 0; r < 8; r++) mx = m8[r] > mx ? m8[r] : mx;                                                    \
    }                                                                                                              \
    for (; j < len; j++) {                                                                                         \
      const float v = scale * dot_##NAME(qh, K + j * D, D) + slope * (float)(j - pos[s]);                          \
      p[j] = v;                                                                                                    \
      mx = v > mx ? v : mx;                                                                                        \
    }                                                                                                              \
    float sum = 0.f; /* exp(score - max), vectorised (score - max <= 0) */                                         \
    vf vsum = ZERO();                                                                                              \
    const vf vmxv = SET1(mx);                                                                                      \
    for (long i = j0; i < lv; i += VW) {                                                                           \
      const vf e = vexp_nonpos(LD(p + i) - vmxv);                                                                  \
      ST(p + i, e);                                                                                                \
      vsum = vsum + e;                                                                                             \
    }                                                                                                              \
    sum = hsum(vsum);                                                                                              \
    for (long i = lv; i < len; i++) {                                                                              \
      p[i] = expf(p[i] - mx);                                                                                      \
      sum += p[i];                                                                                                 \
    }                                                                                                              \
    const float inv = 1.f / sum;                                                                                   \
    const vf vinv = SET1(inv);                                                                                     \
    long c = 0;                                                                                                    \
    for (; c + 4 * VW <= dv; c += 4 * VW) { /* four vectors of the head dimension per pass over the values */      \
      vf a0 = ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO();                                                       \
      vf b0 = ZERO(), b1 = ZERO(), b2 = ZERO(), b3 = ZERO();                                                       \
      long i = j0;                                                                                                 \
      for (; i + 2 <= len; i += 2) {                                                                               \
        prefetch_span(V + (i + APF) * D + c, 2 * 4 * VW * (long)sizeof(KT));                                       \
        const vf pi = SET1(p[i]), pk = SET1(p[i + 1]);                                                             \
        const KT *vi = V + i * D + c, *vk = vi + D;                                                                \
        a0 = FMA(pi, LDK(vi), a0);                                                                                 \
        a1 = FMA(pi, LDK(vi + VW), a1);                                                                            \
        a2 = FMA(pi, LDK(vi + 2 * VW), a2);                                                                        \
        a3 = FMA(pi, LDK(vi + 3 * VW), a3);                                                                        \
        b0 = FMA(pk, LDK(vk), b0);                                                                                 \
        b1 = FMA(pk, LDK(vk + VW), b1);                                                                            \
        b2 = FMA(pk, LDK(vk + 2 * VW), b2);                                                                        \
        b3 = FMA(pk, LDK(vk + 3 * VW), b3);                                                                        \
      }                                                                                                            \
      if (i < len) {                                                                                               \
        const vf pi = SET1(p[i]);                                                                                  \
        const KT *vi = V + i * D + c;                                                                              \
        a0 = FMA(pi, LDK(vi), a0);                                                                                 \
        a1 = FMA(pi, LDK(vi + VW), a1);                                                                            \
        a2 = FMA(pi, LDK(vi + 2 * VW), a2);                                                                        \
        a3 = FMA(pi, LDK(vi + 3 * VW), a3);                                                                        \
      }                                                                                                            \
      ST(o + c, (a0 + b0) * vinv);                                                                                 \
      ST(o + c + VW, (a1 + b1) * vinv);                                                                            \
      ST(o + c + 2 * VW, (a2 + b2) * vinv);                                                                        \
      ST(o + c + 3 * VW, (a3 + b3) * vinv);                                                                        \
    }                                                                                                              \
    for (; c < dv; c += VW) {                                                                                      \
      vf acc = ZERO();                                                                                             \
      for (long i = j0; i < len; i++) acc = FMA(SET1(p[i]), LDK(V + i * D + c), acc);                              \
      ST(o + c, acc * vinv);                                                                                       \
    }                                                                                                              \
    for (long cc = dv; cc < D; cc++) {                                                                             \
      float a = 0.f;                                                                                               \
      for (long i = j0; i < len; i++) a += p[i] * TOF(V[i * D + cc]);                                              \
      o[cc] = a * inv;                                                                                             \
    }                                                                                                              \
  }                                                                                                                \
  return 0;                                                                                                        \
}                                                                                                                  \

#define F32_LDK(p) LD(p)
#define F32_TOF(x) (x)
DECODE_ATTENTION(f32, float, F32_LDK, F32_TOF, F32_TOF)
#if defined(__F16C__) || defined(__AVX512F__)
#define HAVE_F16 1
#if defined(__AVX512F__)
#define F16_LDK(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#else
#define F16_LDK(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#endif
#define F16_TOF(x) _cvtsh_ss(x)
#define F16_FROMF(x) _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)
DECODE_ATTENTION(f16, unsigned short, F16_LDK, F16_TOF, F16_FROMF)
#else
#define HAVE_F16 0
#endif

int mptkit_has_f16(void) { return HAVE_F16; }

/* kv_half: the cache stores IEEE fp16 (converted on write and on read; compute stays fp32). -4 when this build
 * has no fp16 conversions. */
int mptkit_decode_attention(const float *q, const float *knew, const float *vnew, long qrow, long krow, long vrow,
                            void *kc, void *vc, int kv_half, float *kmax, const long *pos, long top, float *out,
                            float *scratch, long n, long H, long Hkv, long D, long cap, const float *slopes,
                            float scale, int nthreads) {
  if (!kv_half)
    return attention_f32(q, knew, vnew, qrow, krow, vrow, (float *)kc, (float *)vc, kmax, pos, top, out, scratch, n,
                         H, Hkv, D, cap, slopes, scale, nthreads);
#if HAVE_F16
  return attention_f16(q, knew, vnew, qrow, krow, vrow, (unsigned short *)kc, (unsigned short *)vc, kmax, pos, top,
                       out, scratch, n, H, Hkv, D, cap, slopes, scale, nthreads);
#else
  return -4;
#endif
}

/* ---------------------------------------------------------------------------------------------------------
 * A whole MPT block for one decode step, in one call (without the per-op dispatch of a Python step):
 *
 *   x += out_proj(attention(clip(Wqkv(LN1(x)))))        (the new K/V rows written into the cache)
 *   x += down_proj(gelu(up_proj(LN2(x))))               (GELU exact, as MPTMLP)
 *
 * x (n, d) in place. LayerNorms: weight, bias or NULL, eps. Linear weights (out, in) with bias or NULL.
 * clip <= 0: no clipping. ws: workspace of n * (d + 2*Hkv*D + d + ffn) + n * H * top floats. */
static void layer_norm_rows(const float *x, float *y, const float *w, const float *b, float eps, long n, long d) {
  for (long r = 0; r < n; r++) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    float mean = 0.f, var = 0.f;
    for (long c = 0; c < d; c++) mean += xr[c];
    mean /= (float)d;
    for (long c = 0; c < d; c++) var += (xr[c] - mean) * (xr[c] - mean);
    const float rstd = 1.f / sqrtf(var / (float)d + eps);
    for (long c = 0; c < d; c++) yr[c] = (xr[c] - mean) * rstd * w[c] + (b ? b[c] : 0.f);
  }
}

/* GELU (exact form, 0.5 x (1 + erf(x / sqrt 2))) in place. erf by Abramowitz & Stegun 7.1.26 (absolute error
 * <= 1.5e-7), the same formula PyTorch's vectorised CPU erf uses; the scalar tail uses libm's erff. */
void mptkit_gelu(float *u, long count) {
  const long cv = count / VW * VW;
  for (long i = 0; i < cv; i += VW) {
    const vf x = LD(u + i), z = x * SET1(0.70710678118654752440f), a = VABS(z);
    const vf t = VDIV(SET1(1.f), SET1(1.f) + SET1(0.3275911f) * a);
    vf p = SET1(1.061405429f);
    p = p * t + SET1(-1.453152027f);
    p = p * t + SET1(1.421413741f);
    p = p * t + SET1(-0.284496736f);
    p = p * t + SET1(0.254829592f);
    const vf erf_abs = SET1(1.f) - p * t * vexp_nonpos(ZERO() - a * a);
    ST(u + i, SET1(0.5f) * x * (SET1(1.f) + VCOPYSIGN(erf_abs, z)));
  }
  for (long i = cv; i < count; i++) u[i] = 0.5f * u[i] * (1.f + erff(u[i] * 0.70710678118654752440f));
}

/* A linear of a block held as quantised blocks (mptkit/infer/csrc/quant_kernels.c: q8_0 / q4_0, fp32 or integer dot
 * products): y (M, N) = x (M, K) @ W^T (+ b), W's block values at w and its fp16 scales at s. The pointer comes from
 * the quantised-kernel library (mptkit_q8_linear & co., the same signature); NULL: W is fp32 (mptkit_smallgemm). */
typedef int (*mptkit_qlinear)(const float *x, const void *w, const unsigned short *s, const float *b, float *y, long M,
                              long N, long K, int nthreads);

typedef struct {
  const float *ln1_w, *ln1_b, *wqkv, *bqkv, *wout, *bout, *ln2_w, *ln2_b, *wup, *bup, *wdown, *bdown;
  void *kc, *vc;
  float *kmax; /* the cache's |k| bound per slot and kv head (decode attention skips keys it proves irrelevant) */
  float eps1, eps2, clip, scale;
  long n_heads, ffn;
  /* quantised linears (NULL: fp32, the w* pointers are fp32 weights): kernel and fp16 scales per linear */
  mptkit_qlinear fqkv, fout, fup, fdown;
  const unsigned short *sqkv, *sout, *sup, *sdown;
} mptkit_layer;

static inline int block_linear(mptkit_qlinear f, const float *x, const float *w, const unsigned short *s,
                               const float *b, float *y, long M, long N, long K, int nthreads) {
  return f ? f(x, (const void *)w, s, b, y, M, N, K, nthreads) : mptkit_smallgemm(x, w, b, y, M, N, K, nthreads);
}

static int decode_block_impl(float *x, long n, long d, const mptkit_layer *L, int kv_half, const long *pos, long top,
                             long cap, long Hkv, long D, const float *slopes, float *ws, int nthreads) {
  const long H = L->n_heads, ffn = L->ffn, kvd = Hkv * D, qkvd = H * D + 2 * kvd;
  const float clip = L->clip;
  if (H * D != d) return -3;
  float *h = ws, *qkv = h + n * d, *o = qkv + n * qkvd, *u = o + n * d, *sc = u + n * ffn;
  layer_norm_rows(x, h, L->ln1_w, L->ln1_b, L->eps1, n, d);
  int rc = block_linear(L->fqkv, h, L->wqkv, L->sqkv, L->bqkv, qkv, n, qkvd, d, nthreads);
  if (rc) return rc;
  if (clip > 0.f)
    for (long i = 0; i < n * qkvd; i++) qkv[i] = qkv[i] < -clip ? -clip : (qkv[i] > clip ? clip : qkv[i]);
  rc = mptkit_decode_attention(qkv, qkv + d, qkv + d + kvd, qkvd, qkvd, qkvd, L->kc, L->vc, kv_half, L->kmax, pos, top,
                               o, sc, n, H, Hkv, D, cap, slopes, L->scale, nthreads);
  if (rc) return rc;
  rc = block_linear(L->fout, o, L->wout, L->sout, L->bout, h, n, d, d, nthreads); /* h <- attention projected */
  if (rc) return rc;
  for (long i = 0; i < n * d; i++) x[i] += h[i];
  layer_norm_rows(x, h, L->ln2_w, L->ln2_b, L->eps2, n, d);
  rc = block_linear(L->fup, h, L->wup, L->sup, L->bup, u, n, ffn, d, nthreads);
  if (rc) return rc;
  mptkit_gelu(u, n * ffn);
  rc = block_linear(L->fdown, u, L->wdown, L->sdown, L->bdown, h, n, d, ffn, nthreads);
  if (rc) return rc;
  for (long i = 0; i < n * d; i++) x[i] += h[i];
  return 0;
}

int mptkit_decode_block(float *x, long n, long d, const float *ln1_w, const float *ln1_b, float eps1,
                        const float *wqkv, const float *bqkv, float clip, void *kc, void *vc, int kv_half, float *kmax,
                        const long *pos,
                        long top, long cap, long H, long Hkv, long D, const float *slopes, float scale,
                        const float *wout, const float *bout, const float *ln2_w, const float *ln2_b, float eps2,
                        const float *wup, const float *bup, long ffn, const float *wdown, const float *bdown,
                        float *ws, int nthreads) {
  mptkit_layer L;
  memset(&L, 0, sizeof L);
  L.ln1_w = ln1_w, L.ln1_b = ln1_b, L.wqkv = wqkv, L.bqkv = bqkv, L.wout = wout, L.bout = bout;
  L.ln2_w = ln2_w, L.ln2_b = ln2_b, L.wup = wup, L.bup = bup, L.wdown = wdown, L.bdown = bdown;
  L.kc = kc, L.vc = vc, L.kmax = kmax, L.eps1 = eps1, L.eps2 = eps2, L.clip = clip, L.scale = scale;
  L.n_heads = H, L.ffn = ffn;
  return decode_block_impl(x, n, d, &L, kv_half, pos, top, cap, Hkv, D, slopes, ws, nthreads);
}

/* ---------------------------------------------------------------------------------------------------------
 * The blocks of a whole decode step in one call: every layer's mptkit_decode_block in order, on x in place.
 * One foreign call per step instead of one per layer: the Python thread that serves HTTP then gets the GIL once
 * per step, not at every layer boundary (and the per-call argument marshalling is paid once). */

int mptkit_decode_layers(float *x, long n, long d, const mptkit_layer *layers, long n_layers, int kv_half,
                         const long *pos, long top, long cap, long Hkv, long D, const float *slopes, float *ws,
                         int nthreads) {
  for (long i = 0; i < n_layers; i++) {
    const int rc = decode_block_impl(x, n, d, layers + i, kv_half, pos, top, cap, Hkv, D, slopes, ws, nthreads);
    if (rc) return rc;
  }
  return 0;
}
