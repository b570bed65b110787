// The CUDA backend as a translation unit of its own: linking this file into a program registers
// densegrad's CUDA allocator, copies and kernels at start-up (see include/densegrad/cuda.cuh),
// so the program's plain C++ files can run models on the GPU with .to(dg::Device::cuda()).
#include <densegrad/cuda.cuh>
