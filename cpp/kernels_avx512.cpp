// AVX-512 build of the hot loops (compiled with -mavx512f and friends; used only where the CPU has AVX-512F).
#if !defined(__AVX512F__)
#error "kernels_avx512.cpp must be compiled with -mavx512f"
#endif
#define FI_KERNEL_GETTER kernels_avx512
#define FI_KERNEL_NAME "avx512"
#include "kernels_impl.inc"
