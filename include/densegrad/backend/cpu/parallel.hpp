// densegrad/backend/cpu/parallel.hpp: the OpenMP vocabulary every CPU kernel shares, and the
// loop-unrolling pragma. Compiles to plain serial code when DENSEGRAD_WITH_OPENMP is not defined.
#pragma once

#ifdef DENSEGRAD_WITH_OPENMP
#include <omp.h>
#endif

/// DENSEGRAD_OMP(parallel for ...): `#pragma omp parallel for ...` in an OpenMP build,
/// nothing otherwise.
#define DENSEGRAD_OMP_STR_(...) #__VA_ARGS__
#ifdef DENSEGRAD_WITH_OPENMP
#define DENSEGRAD_OMP(...) _Pragma(DENSEGRAD_OMP_STR_(omp __VA_ARGS__))
#else
#define DENSEGRAD_OMP(...)
#endif

/// DENSEGRAD_UNROLL(n): unroll the next loop n times (`#pragma GCC unroll`, which GCC and Clang
/// read); nothing under nvcc, whose front end does not know the pragma (no CPU kernel is
/// instantiated in CUDA files).
#if defined(__CUDACC__)
#define DENSEGRAD_UNROLL(n)
#else
#define DENSEGRAD_UNROLL(n) _Pragma(DENSEGRAD_OMP_STR_(GCC unroll n))
#endif

namespace dg::cpu {

/// Threads a parallel region may use (1 without OpenMP).
inline int max_threads() {
#ifdef DENSEGRAD_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// This thread's index inside a parallel region (0 without OpenMP).
inline int thread_num() {
#ifdef DENSEGRAD_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace dg::cpu
