// The CPU's float32 multiply-add peak: every thread runs twelve independent chains of vector
// FMAs (enough to cover the FMA latency on both pipes), and the best of five rounds is printed.
// It bounds what any direct convolution can reach on the machine; see README.md (run X).
//
//   gcc -O2 -march=native -fopenmp fma_peak.c -o fma_peak && ./fma_peak
//
// With -march=native the vectors are 512-bit where the CPU has AVX-512, else 256-bit (AVX2).
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define FMA _mm512_fmadd_ps
#define SET1 _mm512_set1_ps
#define ISA "AVX-512"
#else
typedef __m256 vec;
#define LANES 8
#define FMA _mm256_fmadd_ps
#define SET1 _mm256_set1_ps
#define ISA "AVX2"
#endif

#define CHAINS 12
static volatile float sink;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const long per_thread = 100000000;
  double best = 0;
  int threads = 1;
  for (int round = 0; round < 5; round++) {
    double start = now();
#pragma omp parallel
    {
#pragma omp single
      threads = omp_get_num_threads();
      const vec scale = SET1(0.999999f), shift = SET1(1e-7f);
      vec a0 = SET1(1.0f), a1 = SET1(1.1f), a2 = SET1(1.2f), a3 = SET1(1.3f), a4 = SET1(1.4f),
          a5 = SET1(1.5f), a6 = SET1(1.6f), a7 = SET1(1.7f), a8 = SET1(1.8f), a9 = SET1(1.9f),
          a10 = SET1(2.0f), a11 = SET1(2.1f);
      for (long i = 0; i < per_thread; i++) {
        a0 = FMA(a0, scale, shift), a1 = FMA(a1, scale, shift), a2 = FMA(a2, scale, shift);
        a3 = FMA(a3, scale, shift), a4 = FMA(a4, scale, shift), a5 = FMA(a5, scale, shift);
        a6 = FMA(a6, scale, shift), a7 = FMA(a7, scale, shift), a8 = FMA(a8, scale, shift);
        a9 = FMA(a9, scale, shift), a10 = FMA(a10, scale, shift), a11 = FMA(a11, scale, shift);
        // Keeps the compiler from merging the chains or computing them ahead of time.
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
        __asm__ volatile("" : "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
      }
      vec all[CHAINS] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};
      float total = 0;
      for (int c = 0; c < CHAINS; c++) total += ((float *)&all[c])[0];
      sink = total;
    }
    double gflops = (double)per_thread * threads * CHAINS * LANES * 2 / (now() - start) / 1e9;
    if (gflops > best) best = gflops;
  }
  printf("%s FMA peak, %d threads: %.1f GFLOP/s\n", ISA, threads, best);
  return 0;
}
