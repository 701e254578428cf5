/*
** keel_round.h: the operand rounding of a reduced float32 matmul precision
** (keel_set_matmul_precision in keel.h), one definition for every place
** that rounds: the CPU's products (gemm.c), the CUDA attention kernels
** (kernels/attention.cu, on the device) and the simulator's cuBLAS
** (kernels/sim/sim_cublas.cpp). They must agree to the bit, so that a CPU
** run, a GPU run and a simulated one show the same numbers under autocast.
**
** Header-only and never installed: C (gcc), CUDA host and device code
** (nvcc) and C++ (g++, the simulator, where KL_HD is empty and device code
** is host code) all include it.
**
** The model is the conversion to each format: each float32 operand is
** rounded to nearest even on the dropped mantissa bits, 13 for TF32 and
** float16, 16 for bfloat16; float16 also has its range (Inf from 65520
** up, the first value that rounds past 65504) and its subnormals (steps
** of 2^-24 below 2^-14). NaN and infinities are kept. cuBLAS's FAST
** compute types do not document how tensor cores round float32 operands
** (TF32 conversion may round ties away from zero, or truncate), so a
** cuBLAS product may differ from these in the last bits of an operand;
** the three users here agree with each other exactly.
*/
#ifndef KEEL_ROUND_H
#define KEEL_ROUND_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "keel.h"

/* nvcc: callable from host and device code (inline: nvcc inlines small
** device functions; __forceinline__ would repeat the inline) */
#if defined(__CUDACC__)
#define KL_HD __host__ __device__
#else
#define KL_HD
#endif

/* x keeping all but its lowest `dropped` mantissa bits (1..22), rounded
** to nearest even on those. A carry out of the mantissa steps the
** exponent, and past the largest finite float gives Inf, as the hardware
** conversion does. */
static inline KL_HD float kl_round_bits(float x, int dropped) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;   /* Inf, NaN */
  /* adding half an ulp less one, plus the kept lowest bit, carries into
  ** the kept bits exactly when the dropped ones are above half, or at
  ** half with an odd kept part: ties to even */
  u += ((1u << (dropped - 1)) - 1u) + ((u >> dropped) & 1u);
  u &= ~((1u << dropped) - 1u);
  memcpy(&x, &u, sizeof x);
  return x;
}

/* x rounded to float16, as a float. */
static inline KL_HD float kl_round_f16(float x) {
  float a = fabsf(x);
  if (!(a < INFINITY)) return x;                      /* Inf, NaN */
  if (a >= 65520.0f) return copysignf(INFINITY, x);
  /* subnormal float16: whole multiples of 2^-24 (nearbyintf: ties to even
  ** in the default rounding mode, which nothing in keel changes) */
  if (a < 0x1p-14f) return copysignf(nearbyintf(a * 0x1p24f) * 0x1p-24f, x);
  return kl_round_bits(x, 13);
}

/* x rounded to the operand format of precision p (KEEL_MATMUL_*); any
** other p, KEEL_MATMUL_HIGHEST included, leaves it as it is. */
static inline KL_HD float kl_round_to_precision(float x, int p) {
  switch (p) {
    case KEEL_MATMUL_TF32: return kl_round_bits(x, 13);
    case KEEL_MATMUL_BF16: return kl_round_bits(x, 16);
    case KEEL_MATMUL_F16: return kl_round_f16(x);
    default: return x;
  }
}

#endif
