// A downstream program: prints densegrad's version and which backends reached it through
// densegrad::densegrad's (and densegrad::dist's) INTERFACE compile definitions. run.cmake
// checks the line.
#include <densegrad/version.hpp>
#if defined(DENSEGRAD_WITH_MPI) && DENSEGRAD_WITH_MPI
#include <densegrad/dist/dist.hpp>
#endif

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
#ifndef DENSEGRAD_WITH_MPI
#define DENSEGRAD_WITH_MPI 0
#endif

int main() {
#if DENSEGRAD_WITH_MPI
    dg::dist::init();  // not started by mpirun: a world of one, no MPI call but MPI_Initialized
    if (dg::dist::world_size() != 1) return 1;
#endif
    std::printf("densegrad %s openmp=%d onednn=%d cuda=%d mpi=%d\n", DENSEGRAD_VERSION,
                DENSEGRAD_WITH_OPENMP, DENSEGRAD_WITH_ONEDNN, DENSEGRAD_WITH_CUDA, DENSEGRAD_WITH_MPI);
    return 0;
}
