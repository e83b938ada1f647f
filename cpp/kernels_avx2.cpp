// AVX2 + FMA + F16C build of the hot loops (compiled with -mavx2 -mfma -mf16c; used only where the CPU has them).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define FI_KERNEL_GETTER kernels_avx2
#define FI_KERNEL_NAME "avx2"
#include "kernels_impl.inc"
