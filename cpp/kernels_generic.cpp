// Portable build of the hot loops (baseline flags: SSE2 on x86-64, NEON on arm64).
#define FI_KERNEL_GETTER kernels_generic
#define FI_KERNEL_NAME "generic"
#include "kernels_impl.inc"
