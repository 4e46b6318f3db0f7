/* Peak multiply-add rate of this CPU's vector units: the ceiling no float32 (or bf16) kernel can
 * pass, used by roof.py to say whether a speed goal is physically reachable.
 *
 *   fma_peak THREADS ITERATIONS KIND      KIND: fp32 (vfmadd, widest vector the build targets)
 *                                               bf16 (vdpbf16ps; AVX512-BF16 builds only)
 * prints GFLOP/s over all threads (an FMA counts 2 FLOP per float32 lane; a vdpbf16ps 4: two
 * bf16 products and their sum added to each float32 lane).
 *
 * ACCUMULATORS independent chains per thread hide the FMA latency (4 cycles on current x86, two
 * pipes: 8 chains are enough) and must stay in registers (the loop is unrolled). AVX-512 has 32
 * vector registers, so 16 chains leave slack; AVX2 has 16, and 16 chains plus the two constants
 * spilled to the stack: half the rate (58 instead of 100 GFLOP/s on one Zen 3 core), so AVX2
 * builds use 12.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__)
#define ACCUMULATORS 16
#else
#define ACCUMULATORS 12
#endif

static long iterations;
static int bf16;
static volatile float sink; /* keeps the compiler from dropping the loop */

static void *run(void *unused) {
  (void)unused;
  float total = 0.0f;
#if defined(__AVX512F__)
  __m512 acc[ACCUMULATORS];
  for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_set1_ps((float)i);
  if (!bf16) {
    const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(1e-7f);
    for (long n = 0; n < iterations; n++) {
#pragma GCC unroll 16
      for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_fmadd_ps(a, acc[i], b);
    }
  } else {
#if defined(__AVX512BF16__)
    const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80); /* bf16 1.0 */
    for (long n = 0; n < iterations; n++) {
#pragma GCC unroll 16
      for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], x, x);
    }
#endif
  }
  for (int i = 0; i < ACCUMULATORS; i++) total += _mm512_reduce_add_ps(acc[i]);
#else
  __m256 acc[ACCUMULATORS];
  const __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(1e-7f);
  float lanes[8];
  for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm256_set1_ps((float)i);
  for (long n = 0; n < iterations; n++) {
#pragma GCC unroll 16
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm256_fmadd_ps(a, acc[i], b);
  }
  for (int i = 0; i < ACCUMULATORS; i++) {
    _mm256_storeu_ps(lanes, acc[i]);
    for (int j = 0; j < 8; j++) total += lanes[j];
  }
#endif
  sink = total;
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s THREADS ITERATIONS fp32|bf16\n", argv[0]);
    return 2;
  }
  int threads = atoi(argv[1]);
  iterations = atol(argv[2]);
  bf16 = strcmp(argv[3], "bf16") == 0;
#if !defined(__AVX512BF16__)
  if (bf16) {
    fprintf(stderr, "bf16: this build has no AVX512-BF16\n");
    return 2;
  }
#endif
  if (threads < 1 || threads > 256 || iterations < 1) {
    fprintf(stderr, "THREADS must be 1..256 and ITERATIONS positive\n");
    return 2;
  }
  pthread_t handles[256];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < threads; i++) pthread_create(&handles[i], NULL, run, NULL);
  for (int i = 0; i < threads; i++) pthread_join(handles[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
#if defined(__AVX512F__)
  const double lanes = 16.0;
#else
  const double lanes = 8.0;
#endif
  const double flop_per_instruction = (bf16 ? 4.0 : 2.0) * lanes;
  const double flops = threads * (double)iterations * ACCUMULATORS * flop_per_instruction;
  printf("%.3f\n", flops / seconds / 1e9);
  return 0;
}
