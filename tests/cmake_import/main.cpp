// A downstream program: prints densegrad's version and which backends reached it through
// densegrad::densegrad's INTERFACE compile definitions. run.cmake checks the line.
#include <densegrad/version.hpp>

#include <cstdio>

#ifndef DENSEGRAD_WITH_OPENMP
#define DENSEGRAD_WITH_OPENMP 0
#endif
#ifndef DENSEGRAD_WITH_ONEDNN
#define DENSEGRAD_WITH_ONEDNN 0
#endif
#ifndef DENSEGRAD_WITH_CUDA
#define DENSEGRAD_WITH_CUDA 0
#endif

int main() {
    std::printf("densegrad %s openmp=%d onednn=%d cuda=%d\n", DENSEGRAD_VERSION,
                DENSEGRAD_WITH_OPENMP, DENSEGRAD_WITH_ONEDNN, DENSEGRAD_WITH_CUDA);
    return 0;
}
