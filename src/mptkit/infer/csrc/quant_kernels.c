/* mptkit: the q8_0 linear of the decode step, y = x @ W^T (+ b) with W held as llama.cpp's q8_0 blocks;
 * called through ctypes by mptkit/infer/quant_kernels.py, compiled like csrc/cpu_kernels.c (-O3 -march=native).
 *
 * W (N, K): q (N, K) int8 and s (N, K/32) fp16 (IEEE binary16 bits), one scale per block of 32 weights along K;
 * the weight stands for s[n][k/32] * q[n][k]. x (M, K) fp32, b (N) fp32 or NULL, y (M, N) fp32; all row-major and
 * contiguous, K a multiple of 32. M is the decode batch (1..16): the cost is streaming q (a quarter of an fp32
 * weight's bytes), so each thread walks its own 64-row blocks of W once for all M rows of x.
 *
 * The arithmetic is the dequantise-then-matmul reference's, in fp32: every block is dequantised in registers
 * (the int8 -> fp32 conversion and the multiply by the block's scale are exact: 8 + 11 significant bits) and
 * fused-multiply-added into the row's accumulators; only the summation order differs (float rounding). One
 * accumulator per vector of a block (4 with AVX2, 2 with AVX-512) keeps the chains independent at M = 1; rows
 * of x are taken RB at a time, so an output element is the same sum whatever M is (batch-invariant).
 *
 * Paths: AVX-512F (16 lanes), AVX2 + FMA (8 lanes), and plain C for anything else (the same maths, scalar).
 */
#include <stdint.h>
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
static inline float qhsum(qvf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef QVW
#define NV (QB / QVW) /* vectors per block */

/* output rows n0..n1 for R rows of x (R a compile-time constant <= RB, so the accumulators stay in registers) */
#define Q8ROWS(R)                                                                                                \
  static void q8_rows##R(const float *x, const int8_t *q, const uint16_t *s, const float *b, float *y, long N,   \
                         long K, long n0, long n1) {                                                            \
    const long nb = K / QB;                                                                                      \
    for (long n = n0; n < n1; n++) {                                                                             \
      qvf acc[R][NV];                                                                                            \
      _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                        \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[r][v] = QZERO();                                  \
      const int8_t *qn = q + n * K;                                                                              \
      const uint16_t *sn = s + n * nb;                                                                           \
      for (long j = 0; j < nb; j++) {                                                                            \
        _mm_prefetch((const char *)(qn + j * QB + QPF), _MM_HINT_T0);                                            \
        const qvf d = QSET1(H2F(sn[j]));                                                                         \
        qvf w[NV];                                                                                               \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) w[v] = QMUL(QCVT8(qn + j * QB + v * QVW), d);       \
        const float *xj = x + j * QB;                                                                            \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)                                                      \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                                     \
          acc[r][v] = QFMA(w[v], QLD(xj + r * K + v * QVW), acc[r][v]);                                          \
      }                                                                                                          \
      _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                      \
        qvf t = acc[r][0];                                                                                       \
        for (int v = 1; v < NV; v++) t = QADD(t, acc[r][v]);                                                     \
        const float sum = qhsum(t);                                                                              \
        y[r * N + n] = b ? sum + b[n] : sum;                                                                     \
      }                                                                                                          \
    }                                                                                                            \
  }

typedef void (*q8_rows_fn)(const float *, const int8_t *, const uint16_t *, const float *, float *, long, long,
                           long, long);
#if RB == 2
Q8ROWS(1) Q8ROWS(2)
static const q8_rows_fn Q8_ROWS[RB + 1] = {0, q8_rows1, q8_rows2};
#else
Q8ROWS(1) Q8ROWS(2) Q8ROWS(3) Q8ROWS(4)
static const q8_rows_fn Q8_ROWS[RB + 1] = {0, q8_rows1, q8_rows2, q8_rows3, q8_rows4};
#endif
static void q8_rows(const float *x, const int8_t *q, const uint16_t *s, const float *b, float *y, long N, long K,
                    long n0, long n1, int R) {
  Q8_ROWS[R](x, q, s, b, y, N, K, n0, n1);
}
#else
#define RB 1
/* plain C: the same blocks, dequantised then summed in order */
static void q8_rows(const float *x, const int8_t *q, const uint16_t *s, const float *b, float *y, long N, long K,
                    long n0, long n1, int R) {
  const long nb = K / QB;
  (void)R;
  (void)N;
  for (long n = n0; n < n1; n++) {
    float acc = 0.f;
    for (long j = 0; j < nb; j++) {
      const float d = half_to_float(s[n * nb + j]);
      const int8_t *qj = q + n * K + j * QB;
      const float *xj = x + j * QB;
      for (int i = 0; i < QB; i++) acc += ((float)qj[i] * d) * xj[i];
    }
    y[n] = b ? acc + b[n] : acc;
  }
}
#endif

/* 0 on success; -1 for a bad shape (K not a multiple of 32). nthreads <= 1 runs on the calling thread. */
int mptkit_q8_linear(const float *x, const int8_t *q, const uint16_t *s, const float *b, float *y, long M, long N,
                     long K, int nthreads) {
  if (M < 1 || N < 1 || K < QB || K % QB) return -1;
  const long block = 64; /* rows of W per task: 64 x K bytes stay in L2 while every pass of x runs */
  const long tasks = (N + block - 1) / block;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
  for (long t = 0; t < tasks; t++) {
    const long n0 = t * block, n1 = n0 + block < N ? n0 + block : N;
    for (long m0 = 0; m0 < M; m0 += RB) {
      const int r = (int)(M - m0 < RB ? M - m0 : RB);
      q8_rows(x + m0 * K, q, s, b, y + m0 * N, N, K, n0, n1, r);
    }
  }
  return 0;
}

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
