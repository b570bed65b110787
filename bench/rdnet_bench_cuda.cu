// rdnet_bench_cuda.cu: rdnet_bench with the CUDA backend. nvcc compiles this file, whose first
// include fills densegrad's device kernel table, so --device cuda works; the program itself is
// rdnet_bench.cpp, unchanged (it tests __CUDACC__ where the two builds differ).
#include <densegrad/cuda.cuh>

#include "rdnet_bench.cpp"
