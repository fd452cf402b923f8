/* mptkit: the quantised linears of the decode step, y = x @ W^T (+ b) with W held as llama.cpp's q8_0 or q4_0
 * blocks; called through ctypes by mptkit/infer/quant_kernels.py, compiled like csrc/cpu_kernels.c
 * (-O3 -march=native).
 *
 * W (N, K), s (N, K/32) fp16 (IEEE binary16 bits), one scale per block of 32 weights along K, and
 *   q8_0: q (N, K) int8; the weight stands for s[n][k/32] * q[n][k];
 *   q4_0: q (N, K/2) uint8, 16 bytes per block, byte j holding value j (low nibble) and value j + 16 (high
 *         nibble) of the block, each 0..15; the weight stands for s[n][k/32] * (value - 8).
 * x (M, K) fp32, b (N) fp32 or NULL, y (M, N) fp32; all row-major and contiguous, K a multiple of 32. M is the
 * decode batch (1..16): the cost is streaming q (a quarter / an eighth of an fp32 weight's bytes), so each thread
 * walks its own 64-row blocks of W once for all M rows of x.
 *
 * The arithmetic is the dequantise-then-matmul reference's up to float rounding: each block's integers are
 * converted to fp32 in registers (exact), multiplied with the row of x and summed over the block, and that sum is
 * scaled once by the block's fp16 scale into the row's accumulator (s * sum(q * x) rather than sum((s * q) * x):
 * one multiply per block instead of one per vector; only the rounding of the sums differs). Two accumulators per
 * row (even / odd blocks) keep the chains independent at M = 1; rows of x are taken RB at a time, so an output
 * element is the same sum whatever M is (batch-invariant).
 *
 * Paths: AVX-512F (16 lanes), AVX2 + FMA (8 lanes), and plain C for anything else (the same maths, scalar).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QB 32 /* weights per block */
#ifndef QPF
#define QPF 768 /* bytes of q to prefetch ahead along a row */
#endif

/* IEEE binary16 -> binary32 (exact), for the scalar path and CPUs without F16C */
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalise */
      int e = -1;
      do {
        man <<= 1;
        e++;
      } while (!(man & 0x400u));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

#if defined(__F16C__) || defined(__AVX512F__)
#define H2F(h) _cvtsh_ss(h)
#else
#define H2F(h) half_to_float(h)
#endif

#if defined(__AVX512F__)
#define QVW 16
#define RB 4 /* rows of x per pass: RB * 2 accumulators + 2 weight vectors + the scale + x within 32 registers */
typedef __m512 qvf;
#define QZERO() _mm512_setzero_ps()
#define QSET1(x) _mm512_set1_ps(x)
#define QLD(p) _mm512_loadu_ps(p)
#define QFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define QMUL(a, b) _mm512_mul_ps(a, b)
#define QADD(a, b) _mm512_add_ps(a, b)
#define QCVT8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
/* one q4_0 block's 16 bytes -> 2 vectors of (value - 8) as fp32: the low nibbles (values 0..15), the high ones */
#define Q4LOAD(p, w)                                                                                             \
  do {                                                                                                           \
    const __m128i b_ = _mm_loadu_si128((const __m128i *)(p)), m_ = _mm_set1_epi8(0x0f), o_ = _mm_set1_epi8(8);   \
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(b_, m_), o_)));                    \
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b_, 4), m_), o_))); \
  } while (0)
#define Q4CORR(t, r, j) (t) /* the offset subtracted per weight in Q4LOAD */
static inline float qhsum(qvf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define QVW 8
#define RB 2 /* RB * 4 accumulators + 4 weight vectors + the scale + x: within the 16 registers */
typedef __m256 qvf;
#define QZERO() _mm256_setzero_ps()
#define QSET1(x) _mm256_set1_ps(x)
#define QLD(p) _mm256_loadu_ps(p)
#define QFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define QMUL(a, b) _mm256_mul_ps(a, b)
#define QADD(a, b) _mm256_add_ps(a, b)
#define QCVT8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
/* one q4_0 block's 16 bytes -> 4 vectors of the stored values (0..15) as fp32: values 0..7, 8..15 (low
 * nibbles), 16..31. Each 8 bytes are zero-extended to 8 int32 straight from memory (one load + one shuffle); the
 * low nibble is the lane & 15, the high one the lane >> 4 (the byte was zero-extended: nothing above it). The
 * offset of 8 is not subtracted per weight: sum((v - 8) x) = sum(v x) - 8 sum(x), and Q4CORR takes 8 sum(x) of
 * the block (computed once per call for each row of x, XS_SCALE = 8 / 8 lanes per lane) off the block's sum. */
#define Q4LOAD(p, w)                                                                                             \
  do {                                                                                                           \
    const __m256i a_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)));                             \
    const __m256i b_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)(p) + 8)));      \
    const __m256i m_ = _mm256_set1_epi32(15);                                                                   \
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(a_, m_));                                                        \
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b_, m_));                                                        \
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a_, 4));                                                        \
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b_, 4));                                                        \
  } while (0)
#define Q4_XS 1            /* q4_rows read xs: per row of x and block, XS_SCALE * sum of the block's x */
#define XS_SCALE 1.0f      /* 8 (the offset) / 8 lanes */
#define Q4CORR(t, r, j) _mm256_sub_ps(t, _mm256_set1_ps(xs[(r) * nb + (j)]))
static inline float qhsum(qvf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef QVW
#define NV (QB / QVW) /* vectors per block */
#define Q8LOAD(p, w)                                                                                             \
  do {                                                                                                           \
    _Pragma("GCC unroll 8") for (int v_ = 0; v_ < NV; v_++) w[v_] = QCVT8((const int8_t *)(p) + v_ * QVW);      \
  } while (0)

/* output rows n0..n1 for R rows of x (R a compile-time constant <= RB, so the accumulators stay in registers);
 * BPB bytes of q per block, LOADW(p, w) turns one block's bytes into NV vectors of unscaled fp32 values */
#define NOCORR(t, r, j) (t)
#define QROWS(NAME, R, BPB, LOADW, CORR)                                                                         \
  static void NAME##R(const float *x, const void *q, const uint16_t *s, const float *b, float *y, long N, long K, \
                      long n0, long n1, const float *xs) {                                                       \
    const long nb = K / QB;                                                                                      \
    (void)xs;                                                                                                    \
    for (long n = n0; n < n1; n++) {                                                                             \
      qvf acc[R][2]; /* two chains (even / odd blocks), each block's sum scaled once into one of them */         \
      _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = QZERO();                       \
      const uint8_t *qn = (const uint8_t *)q + n * nb * (BPB);                                                   \
      const uint16_t *sn = s + n * nb;                                                                           \
      for (long j = 0; j < nb; j++) {                                                                            \
        _mm_prefetch((const char *)(qn + j * (BPB) + QPF), _MM_HINT_T0);                                         \
        const qvf d = QSET1(H2F(sn[j]));                                                                         \
        qvf w[NV];                                                                                               \
        LOADW(qn + j * (BPB), w);                                                                                \
        const float *xj = x + j * QB;                                                                            \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                    \
          qvf t = QMUL(w[0], QLD(xj + r * K));                                                                   \
          _Pragma("GCC unroll 8") for (int v = 1; v < NV; v++) t = QFMA(w[v], QLD(xj + r * K + v * QVW), t);     \
          acc[r][j & 1] = QFMA(d, CORR(t, r, j), acc[r][j & 1]);                                                 \
        }                                                                                                        \
      }                                                                                                          \
      _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                      \
        const qvf t = QADD(acc[r][0], acc[r][1]);                                                                \
        const float sum = qhsum(t);                                                                              \
        y[r * N + n] = b ? sum + b[n] : sum;                                                                     \
      }                                                                                                          \
    }                                                                                                            \
  }

typedef void (*q_rows_fn)(const float *, const void *, const uint16_t *, const float *, float *, long, long, long,
                          long, const float *);
#if RB == 2
QROWS(q8_rows, 1, QB, Q8LOAD, NOCORR) QROWS(q8_rows, 2, QB, Q8LOAD, NOCORR)
QROWS(q4_rows, 1, QB / 2, Q4LOAD, Q4CORR) QROWS(q4_rows, 2, QB / 2, Q4LOAD, Q4CORR)
static const q_rows_fn Q_ROWS[2][RB + 1] = {{0, q8_rows1, q8_rows2}, {0, q4_rows1, q4_rows2}};
#else
QROWS(q8_rows, 1, QB, Q8LOAD, NOCORR) QROWS(q8_rows, 2, QB, Q8LOAD, NOCORR) QROWS(q8_rows, 3, QB, Q8LOAD, NOCORR)
QROWS(q8_rows, 4, QB, Q8LOAD, NOCORR)
QROWS(q4_rows, 1, QB / 2, Q4LOAD, Q4CORR) QROWS(q4_rows, 2, QB / 2, Q4LOAD, Q4CORR)
QROWS(q4_rows, 3, QB / 2, Q4LOAD, Q4CORR) QROWS(q4_rows, 4, QB / 2, Q4LOAD, Q4CORR)
static const q_rows_fn Q_ROWS[2][RB + 1] = {{0, q8_rows1, q8_rows2, q8_rows3, q8_rows4},
                                            {0, q4_rows1, q4_rows2, q4_rows3, q4_rows4}};
#endif
static void q_rows(int kind, const float *x, const void *q, const uint16_t *s, const float *b, float *y, long N,
                   long K, long n0, long n1, int R, const float *xs) {
  Q_ROWS[kind][R](x, q, s, b, y, N, K, n0, n1, xs);
}
#else
#define RB 1
/* plain C: the same blocks, dequantised then summed in order */
static void q_rows(int kind, const float *x, const void *q, const uint16_t *s, const float *b, float *y, long N,
                   long K, long n0, long n1, int R, const float *xs) {
  const long nb = K / QB;
  (void)R;
  (void)xs;
  (void)N;
  for (long n = n0; n < n1; n++) {
    float acc = 0.f;
    for (long j = 0; j < nb; j++) {
      const float d = half_to_float(s[n * nb + j]);
      const float *xj = x + j * QB;
      if (kind == 0) {
        const int8_t *qj = (const int8_t *)q + n * K + j * QB;
        for (int i = 0; i < QB; i++) acc += ((float)qj[i] * d) * xj[i];
      } else {
        const uint8_t *qj = (const uint8_t *)q + (n * nb + j) * (QB / 2);
        for (int i = 0; i < QB; i++) {
          const int v = (i < QB / 2 ? qj[i] & 0x0f : qj[i - QB / 2] >> 4) - 8;
          acc += ((float)v * d) * xj[i];
        }
      }
    }
    y[n] = b ? acc + b[n] : acc;
  }
}
#endif

static int q_linear(int kind, const float *x, const void *q, const uint16_t *s, const float *b, float *y, long M,
                    long N, long K, int nthreads) {
  if (M < 1 || N < 1 || K < QB || K % QB) return -1;
  const long block = 64; /* rows of W per task: 64 x K bytes stay in L2 while every pass of x runs */
  const long tasks = (N + block - 1) / block, nb = K / QB;
  float *xs = NULL;
#ifdef Q4_XS
  if (kind == 1) { /* per row of x and block: XS_SCALE * the block's sum, for Q4CORR */
    xs = (float *)malloc((size_t)(M * nb) * sizeof(float));
    if (!xs) return -2;
    for (long i = 0; i < M * nb; i++) {
      const float *v = x + i * QB;
      float t = 0.f;
      for (int e = 0; e < QB; e++) t += v[e];
      xs[i] = XS_SCALE * t;
    }
  }
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
  for (long t = 0; t < tasks; t++) {
    const long n0 = t * block, n1 = n0 + block < N ? n0 + block : N;
    for (long m0 = 0; m0 < M; m0 += RB) {
      const int r = (int)(M - m0 < RB ? M - m0 : RB);
      q_rows(kind, x + m0 * K, q, s, b, y + m0 * N, N, K, n0, n1, r, xs ? xs + m0 * nb : NULL);
    }
  }
  free(xs);
  return 0;
}

/* 0 on success; -1 for a bad shape (K not a multiple of 32). nthreads <= 1 runs on the calling thread. */
int mptkit_q8_linear(const float *x, const int8_t *q, const uint16_t *s, const float *b, float *y, long M, long N,
                     long K, int nthreads) {
  return q_linear(0, x, q, s, b, y, M, N, K, nthreads);
}

/* the same for q4_0 blocks (q: N x K/2 packed bytes) */
int mptkit_q4_linear(const float *x, const uint8_t *q, const uint16_t *s, const float *b, float *y, long M, long N,
                     long K, int nthreads) {
  return q_linear(1, x, q, s, b, y, M, N, K, nthreads);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The integer path (llama.cpp's way): each row of x is first rounded to q8_0 blocks of its own (per 32 values a
 * scale dx = max|x| / 127 in fp32 and int8 values roundf(x / dx)), then every block's dot product is computed in
 * integers (exact) and scaled by dw * dx: y[m][n] = sum_j dw[n][j] * dx[m][j] * sum_i wq[n][j][i] * xq[m][j][i].
 * Not the dequantise-then-matmul arithmetic: x carries q8_0's rounding error too (as in llama.cpp), in exchange
 * for half the instructions per weight. AVX2 (also what an AVX-512 machine runs) with _mm256_maddubs_epi16 on
 * |w| and x * sign(w); plain C elsewhere (the same integer sums).
 */

/* x (M, K) fp32 -> xq (M, K) int8 and xd (M, K/32) fp32 */
static void quantize_rows_q8(const float *x, int8_t *xq, float *xd, long M, long K) {
  const long nb = K / QB;
  for (long m = 0; m < M; m++) {
    for (long j = 0; j < nb; j++) {
      const float *v = x + m * K + j * QB;
      float amax = 0.f;
      for (int i = 0; i < QB; i++) {
        const float a = v[i] < 0 ? -v[i] : v[i];
        amax = a > amax ? a : amax;
      }
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      xd[m * nb + j] = d;
      int8_t *o = xq + m * K + j * QB;
      for (int i = 0; i < QB; i++) {
        const float t = v[i] * id;
        o[i] = (int8_t)(t < 0 ? -(int)(-t + 0.5f) : (int)(t + 0.5f));
      }
    }
  }
}

#define IRB 4 /* rows of x per pass over a weight row */

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256i load_w32(int kind, const uint8_t *p) {
  if (kind == 0) return _mm256_loadu_si256((const __m256i *)p);
  const __m128i b = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0f);
  const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
  return _mm256_sub_epi8(w, _mm256_set1_epi8(8));
}
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#define IROWS(R)                                                                                                  \
  static void irows##R(int kind, const int8_t *xq, const float *xd, const uint8_t *q, const uint16_t *s,         \
                       const float *b, float *y, long N, long K, long n0, long n1) {                              \
    const long nb = K / QB, bpb = kind == 0 ? QB : QB / 2;                                                       \
    const __m256i ones = _mm256_set1_epi16(1);                                                                   \
    for (long n = n0; n < n1; n++) {                                                                             \
      __m256 acc[R];                                                                                             \
      for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                                  \
      const uint8_t *qn = q + n * nb * bpb;                                                                      \
      const uint16_t *sn = s + n * nb;                                                                           \
      for (long j = 0; j < nb; j++) {                                                                            \
        _mm_prefetch((const char *)(qn + j * bpb + QPF), _MM_HINT_T0);                                           \
        const __m256i w = load_w32(kind, qn + j * bpb);                                                          \
        const __m256i aw = _mm256_sign_epi8(w, w);                                                               \
        const float dw = H2F(sn[j]);                                                                             \
        for (int r = 0; r < R; r++) {                                                                            \
          const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + j * QB));                         \
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);          \
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[r * nb + j]), _mm256_cvtepi32_ps(p), acc[r]);          \
        }                                                                                                        \
      }                                                                                                          \
      for (int r = 0; r < R; r++) {                                                                              \
        const float sum = hsum8(acc[r]);                                                                         \
        y[r * N + n] = b ? sum + b[n] : sum;                                                                     \
      }                                                                                                          \
    }                                                                                                            \
  }
IROWS(1) IROWS(2) IROWS(3) IROWS(4)
/* q4_0 weights: the stored values v (0..15) are already unsigned, so _mm256_maddubs_epi16 takes them as they are
 * against x's int8 values (no sign tricks; |pair| <= 2 * 15 * 127, no saturation); the offset is taken off in
 * integers: sum((v - 8) x) = sum(v x) - 8 sum(x), each of the 8 int32 lanes less sum(x) of the block (xsum). */
#define IROWS4(R)                                                                                                 \
  static void irows_q4_##R(const int8_t *xq, const float *xd, const int32_t *xsum, const uint8_t *q,             \
                           const uint16_t *s, const float *b, float *y, long N, long K, long n0, long n1) {      \
    const long nb = K / QB;                                                                                      \
    const __m256i ones = _mm256_set1_epi16(1);                                                                   \
    const __m128i m4 = _mm_set1_epi8(0x0f);                                                                      \
    for (long n = n0; n < n1; n++) {                                                                             \
      __m256 acc[R][2];                                                                                          \
      for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                                   \
      const uint8_t *qn = q + n * nb * (QB / 2);                                                                 \
      const uint16_t *sn = s + n * nb;                                                                           \
      for (long j = 0; j < nb; j++) {                                                                            \
        _mm_prefetch((const char *)(qn + j * (QB / 2) + QPF), _MM_HINT_T0);                                      \
        const __m128i bq = _mm_loadu_si128((const __m128i *)(qn + j * (QB / 2)));                               \
        const __m256i wu = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bq, 4), m4), _mm_and_si128(bq, m4));    \
        const float dw = H2F(sn[j]);                                                                             \
        for (int r = 0; r < R; r++) {                                                                            \
          const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + j * QB));                         \
          __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), ones);                                     \
          p = _mm256_sub_epi32(p, _mm256_set1_epi32(xsum[r * nb + j]));                                          \
          acc[r][j & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[r * nb + j]), _mm256_cvtepi32_ps(p),             \
                                          acc[r][j & 1]);                                                        \
        }                                                                                                        \
      }                                                                                                          \
      for (int r = 0; r < R; r++) {                                                                              \
        const float sum = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));                                            \
        y[r * N + n] = b ? sum + b[n] : sum;                                                                     \
      }                                                                                                          \
    }                                                                                                            \
  }
IROWS4(1) IROWS4(2) IROWS4(3) IROWS4(4)
/* Eight rows of W at a time (q4_0 as stored, no repacking): each pair of rows (p, p + 4) shares one vector (row
 * p's 16 bytes of the block in the low half, row p + 4's in the high half) against x's block broadcast to both
 * halves (values 0..15 against the low nibbles, 16..31 against the high ones), so one load + unpack serves two
 * rows and the activation block is read once for eight; three horizontal adds leave the eight rows' block sums
 * in the eight lanes of one vector (rows in order), which one FMA scales by the eight rows' fp16 scales (read
 * 8 blocks x 8 rows at a time and transposed in registers) times x's scale. One accumulator chain per row of
 * x: the FMA's latency is hidden by the eight rows' work per block. */
static inline void scales8x8(const uint16_t *s, long nb, __m256 d[8]) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i * nb)));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; i++) {
    d[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    d[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
/* the next group's bytes, in order (one stream, which the hardware prefetchers follow; eight rows' streams
 * rb bytes apart stall this CPU's loads): 2 lines of q per block (8 rows x 16 bytes), 2 of the scales per tile
 * of 8 blocks; none past the matrix's last group (nq / ns NULL) */
#define PF8(nq, ns, j, t, j0)                                                                                     \
  do {                                                                                                           \
    if (nq) {                                                                                                    \
      _mm_prefetch((const char *)(nq) + (j) * 128, _MM_HINT_T0);                                                 \
      _mm_prefetch((const char *)(nq) + (j) * 128 + 64, _MM_HINT_T0);                                            \
      if ((t) == 0) {                                                                                            \
        _mm_prefetch((const char *)((ns) + (j0) * 8), _MM_HINT_T0);                                              \
        _mm_prefetch((const char *)((ns) + (j0) * 8) + 64, _MM_HINT_T0);                                         \
      }                                                                                                          \
    }                                                                                                            \
  } while (0)
#define IROWS4X8(R)                                                                                               \
  static void irows_q4x8_##R(const int8_t *xq, const float *xd, const int32_t *xsum, const uint8_t *q,           \
                             const uint16_t *s, const float *b, float *y, long N, long K, long n0, long n1) {    \
    const long nb = K / QB, rb = nb * (QB / 2);                                                                  \
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0f);                                      \
    for (long n = n0; n + 8 <= n1; n += 8) {                                                                     \
      const uint8_t *qn = q + n * rb;                                                                            \
      const uint16_t *sn = s + n * nb;                                                                           \
      const uint8_t *nq = n + 16 <= N ? qn + 8 * rb : NULL;                                                      \
      const uint16_t *ns = n + 16 <= N ? sn + 8 * nb : NULL;                                                     \
      __m256 acc[R];                                                                                             \
      for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                                  \
      for (long j0 = 0; j0 < nb; j0 += 8) {                                                                      \
        const int nbk = nb - j0 < 8 ? (int)(nb - j0) : 8;                                                        \
        __m256 d8[8];                                                                                            \
        if (nbk == 8) {                                                                                          \
          scales8x8(sn + j0, nb, d8);                                                                            \
        } else {                                                                                                 \
          for (int t = 0; t < nbk; t++) {                                                                        \
            float v[8];                                                                                          \
            for (int i = 0; i < 8; i++) v[i] = H2F(sn[i * nb + j0 + t]);                                         \
            d8[t] = _mm256_loadu_ps(v);                                                                          \
          }                                                                                                      \
        }                                                                                                        \
        for (int t = 0; t < nbk; t++) {                                                                          \
          const long j = j0 + t;                                                                                 \
          const uint8_t *qj = qn + j * (QB / 2);                                                                 \
          PF8(nq, ns, j, t, j0);                                                                                 \
          __m256i lo[4], hi[4];                                                                                  \
          for (int p = 0; p < 4; p++) {                                                                          \
            const __m256i v = _mm256_inserti128_si256(                                                           \
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(qj + p * rb))),                         \
                _mm_loadu_si128((const __m128i *)(qj + (p + 4) * rb)), 1);                                       \
            lo[p] = _mm256_and_si256(v, m4);                                                                     \
            hi[p] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);                                               \
          }                                                                                                      \
          for (int r = 0; r < R; r++) {                                                                          \
            const int8_t *xj = xq + r * K + j * QB;                                                              \
            const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xj));                \
            const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xj + 16)));         \
            __m256i P[4];                                                                                        \
            for (int p = 0; p < 4; p++)                                                                          \
              P[p] = _mm256_madd_epi16(                                                                          \
                  _mm256_add_epi16(_mm256_maddubs_epi16(lo[p], xl), _mm256_maddubs_epi16(hi[p], xh)), ones);     \
            __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(P[0], P[1]), _mm256_hadd_epi32(P[2], P[3]));         \
            h = _mm256_sub_epi32(h, _mm256_set1_epi32(8 * xsum[r * nb + j]));                                    \
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(d8[t], _mm256_set1_ps(xd[r * nb + j])), \
                                     acc[r]);                                                                    \
          }                                                                                                      \
        }                                                                                                        \
      }                                                                                                          \
      for (int r = 0; r < R; r++)                                                                                \
        _mm256_storeu_ps(y + r * N + n, b ? _mm256_add_ps(acc[r], _mm256_loadu_ps(b + n)) : acc[r]);             \
    }                                                                                                            \
  }
IROWS4X8(1) IROWS4X8(2) IROWS4X8(3) IROWS4X8(4)
typedef void (*irows_fn)(int, const int8_t *, const float *, const uint8_t *, const uint16_t *, const float *,
                         float *, long, long, long, long);
typedef void (*irows4_fn)(const int8_t *, const float *, const int32_t *, const uint8_t *, const uint16_t *,
                          const float *, float *, long, long, long, long);
static const irows_fn IROWS_FN[IRB + 1] = {0, irows1, irows2, irows3, irows4};
static const irows4_fn IROWS4_FN[IRB + 1] = {0, irows_q4_1, irows_q4_2, irows_q4_3, irows_q4_4};
static const irows4_fn IROWS4X8_FN[IRB + 1] = {0, irows_q4x8_1, irows_q4x8_2, irows_q4x8_3, irows_q4x8_4};
#define QI_XSUM 1 /* the q4_0 rows read the blocks' sums of x */
static void irows(int kind, const int8_t *xq, const float *xd, const int32_t *xsum, const uint8_t *q,
                  const uint16_t *s, const float *b, float *y, long N, long K, long n0, long n1, int R) {
  if (kind == 1) {
    const long n8 = n0 + (n1 - n0) / 8 * 8; /* groups of eight rows, then the rest one by one */
    if (n8 > n0) IROWS4X8_FN[R](xq, xd, xsum, q, s, b, y, N, K, n0, n8);
    if (n1 > n8) IROWS4_FN[R](xq, xd, xsum, q, s, b, y, N, K, n8, n1);
  } else
    IROWS_FN[R](kind, xq, xd, q, s, b, y, N, K, n0, n1);
}
#define QI_VECTOR 1
#else
static void irows(int kind, const int8_t *xq, const float *xd, const int32_t *xsum, const uint8_t *q,
                  const uint16_t *s, const float *b, float *y, long N, long K, long n0, long n1, int R) {
  const long nb = K / QB;
  (void)xsum;
  for (long n = n0; n < n1; n++) {
    for (int r = 0; r < R; r++) {
      float acc = 0.f;
      for (long j = 0; j < nb; j++) {
        const int8_t *xj = xq + r * K + j * QB;
        int dot = 0;
        if (kind == 0) {
          const int8_t *qj = (const int8_t *)q + n * K + j * QB;
          for (int i = 0; i < QB; i++) dot += (int)qj[i] * xj[i];
        } else {
          const uint8_t *qj = q + (n * nb + j) * (QB / 2);
          for (int i = 0; i < QB / 2; i++) dot += ((qj[i] & 0x0f) - 8) * xj[i] + ((qj[i] >> 4) - 8) * xj[i + QB / 2];
        }
        acc += half_to_float(s[n * nb + j]) * xd[r * nb + j] * (float)dot;
      }
      y[r * N + n] = b ? acc + b[n] : acc;
    }
  }
}
#define QI_VECTOR 0
#endif

/* the integer path; xq (M, K) int8 and xd (M, K/32) fp32 are the caller's work buffers. 0 on success. */
int mptkit_qi_linear(int kind, const float *x, const uint8_t *q, const uint16_t *s, const float *b, float *y,
                     int8_t *xq, float *xd, long M, long N, long K, int nthreads) {
  if (M < 1 || N < 1 || K < QB || K % QB || kind < 0 || kind > 1) return -1;
  quantize_rows_q8(x, xq, xd, M, K);
  const long block = 64;
  const long tasks = (N + block - 1) / block;
  const long nb = K / QB;
  int32_t *xsum = NULL;
#ifdef QI_XSUM
  if (kind == 1) { /* per row of x and block: the sum of its int8 values (exact) */
    xsum = (int32_t *)malloc((size_t)(M * nb) * sizeof(int32_t));
    if (!xsum) return -2;
    for (long i = 0; i < M * nb; i++) {
      int32_t t = 0;
      for (int e = 0; e < QB; e++) t += xq[i * QB + e];
      xsum[i] = t;
    }
  }
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
  for (long t = 0; t < tasks; t++) {
    const long n0 = t * block, n1 = n0 + block < N ? n0 + block : N;
    for (long m0 = 0; m0 < M; m0 += IRB) {
      const int r = (int)(M - m0 < IRB ? M - m0 : IRB);
      irows(kind, xq + m0 * K, xd + m0 * nb, xsum ? xsum + m0 * nb : NULL, q, s, b, y + m0 * N, N, K, n0, n1, r);
    }
  }
  free(xsum);
  return 0;
}

/* The integer path with the fp32 path's signature (csrc/cpu_kernels.c's mptkit_qlinear: the whole-block decode
 * kernel calls either through one pointer): the activations' q8_0 buffers malloc'd for the call (a few KB at
 * decode sizes; negligible beside the linear). -2 when that allocation fails. */
static int qi_linear_buffered(int kind, const float *x, const void *q, const uint16_t *s, const float *b, float *y,
                              long M, long N, long K, int nthreads) {
  if (M < 1 || K < QB || K % QB) return -1;
  int8_t *xq = (int8_t *)malloc((size_t)(M * K));
  float *xd = (float *)malloc((size_t)(M * K / QB) * sizeof(float));
  int rc = -2;
  if (xq && xd) rc = mptkit_qi_linear(kind, x, (const uint8_t *)q, s, b, y, xq, xd, M, N, K, nthreads);
  free(xq);
  free(xd);
  return rc;
}

int mptkit_q8i_linear(const float *x, const void *q, const uint16_t *s, const float *b, float *y, long M, long N,
                      long K, int nthreads) {
  return qi_linear_buffered(0, x, q, s, b, y, M, N, K, nthreads);
}

int mptkit_q4i_linear(const float *x, const void *q, const uint16_t *s, const float *b, float *y, long M, long N,
                      long K, int nthreads) {
  return qi_linear_buffered(1, x, q, s, b, y, M, N, K, nthreads);
}

/* 1 when the integer path is vectorised (AVX2), 0 for plain C */
int mptkit_qi_vectorised(void) { return QI_VECTOR; }

/* lanes of the path compiled in: 16 (AVX-512F), 8 (AVX2 + FMA), 1 (plain C) */
int mptkit_q8_vector_width(void) {
#ifdef QVW
  return QVW;
#else
  return 1;
#endif
}

/* fp16 bits -> fp32 through the path's conversion (tests compare it with the portable one) */
float mptkit_q8_half_to_float(uint16_t h) { return H2F(h); }
