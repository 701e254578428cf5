/*
** test_round.c: the operand rounding of the reduced matmul precisions
** (engine/keel_round.h), which the CPU's products, the CUDA attention
** kernels and the simulator's cuBLAS share. Not public API: the header is
** included directly, as the kernels include it. Each case is a float32 bit
** pattern and the bits expected after rounding, worked out by hand from the
** formats (TF32: 10 stored mantissa bits, float32's exponent; bfloat16: 7
** and float32's exponent; float16: 10, exponents down to -14, subnormal
** steps of 2^-24, largest 65504) with round to nearest, ties to even.
** Called from test_engine.c's main with its check function.
*/
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "keel_round.h"

typedef void (*check_fn)(int ok, const char *what, const char *detail);
void keel_test_round(check_fn check);

typedef struct round_case {
  int prec;            /* KEEL_MATMUL_* */
  uint32_t in, want;
  const char *what;
} round_case;

static const round_case CASES[] = {
  /* TF32: 13 bits dropped, half an ulp is 0x1000 */
  {KEEL_MATMUL_TF32, 0x3f801000u, 0x3f800000u, "tf32: tie, even kept part stays (1 + 2^-11 -> 1)"},
  {KEEL_MATMUL_TF32, 0x3f803000u, 0x3f804000u, "tf32: tie, odd kept part rounds up to even"},
  {KEEL_MATMUL_TF32, 0xbf803000u, 0xbf804000u, "tf32: negative tie rounds away like its magnitude"},
  {KEEL_MATMUL_TF32, 0x3f801001u, 0x3f802000u, "tf32: just above half rounds up"},
  {KEEL_MATMUL_TF32, 0x3f800fffu, 0x3f800000u, "tf32: just below half rounds down"},
  {KEEL_MATMUL_TF32, 0x3fffffffu, 0x40000000u, "tf32: carry into the exponent (2 - 2^-23 -> 2)"},
  {KEEL_MATMUL_TF32, 0x7f7fffffu, 0x7f800000u, "tf32: FLT_MAX overflows to Inf"},
  {KEEL_MATMUL_TF32, 0x7f7fefffu, 0x7f7fe000u, "tf32: below the overflow tie stays finite"},
  {KEEL_MATMUL_TF32, 0x00001000u, 0x00000000u, "tf32: float32 subnormal tie to even zero"},
  {KEEL_MATMUL_TF32, 0x7f800000u, 0x7f800000u, "tf32: +Inf kept"},
  {KEEL_MATMUL_TF32, 0xff800000u, 0xff800000u, "tf32: -Inf kept"},
  {KEEL_MATMUL_TF32, 0x7fc00001u, 0x7fc00001u, "tf32: NaN kept with its payload"},
  /* bfloat16: 16 bits dropped, half an ulp is 0x8000 */
  {KEEL_MATMUL_BF16, 0x3f808000u, 0x3f800000u, "bf16: tie, even kept part stays"},
  {KEEL_MATMUL_BF16, 0x3f818000u, 0x3f820000u, "bf16: tie, odd kept part rounds up to even"},
  {KEEL_MATMUL_BF16, 0x3f808001u, 0x3f810000u, "bf16: just above half rounds up"},
  {KEEL_MATMUL_BF16, 0x3fff8000u, 0x40000000u, "bf16: tie carries into the exponent"},
  {KEEL_MATMUL_BF16, 0x7f7f8000u, 0x7f800000u, "bf16: tie at the top overflows to Inf"},
  {KEEL_MATMUL_BF16, 0xff7f8000u, 0xff800000u, "bf16: negative overflow to -Inf"},
  {KEEL_MATMUL_BF16, 0x477ff000u, 0x47800000u, "bf16: 65520 is finite (float32's range)"},
  {KEEL_MATMUL_BF16, 0x00018000u, 0x00020000u, "bf16: float32 subnormal tie to even"},
  {KEEL_MATMUL_BF16, 0xffc00000u, 0xffc00000u, "bf16: negative NaN kept"},
  /* float16: 13 bits dropped in range, then its range and subnormals */
  {KEEL_MATMUL_F16, 0x3f801000u, 0x3f800000u, "f16: tie, even kept part stays"},
  {KEEL_MATMUL_F16, 0x3f803000u, 0x3f804000u, "f16: tie, odd kept part rounds up"},
  {KEEL_MATMUL_F16, 0x477fe000u, 0x477fe000u, "f16: 65504 (largest float16) stays"},
  {KEEL_MATMUL_F16, 0x477fefffu, 0x477fe000u, "f16: just below 65520 rounds to 65504"},
  {KEEL_MATMUL_F16, 0x477ff000u, 0x7f800000u, "f16: 65520 overflows to Inf"},
  {KEEL_MATMUL_F16, 0xc77ff000u, 0xff800000u, "f16: -65520 overflows to -Inf"},
  {KEEL_MATMUL_F16, 0x38800000u, 0x38800000u, "f16: 2^-14 (smallest normal) stays"},
  {KEEL_MATMUL_F16, 0x387fc000u, 0x387fc000u, "f16: 1023 * 2^-24 (largest subnormal) stays"},
  {KEEL_MATMUL_F16, 0x387fe000u, 0x38800000u, "f16: 1023.5 * 2^-24 ties up to 2^-14 (normal)"},
  {KEEL_MATMUL_F16, 0x387fffffu, 0x38800000u, "f16: just below 2^-14 rounds up to it"},
  {KEEL_MATMUL_F16, 0x33800000u, 0x33800000u, "f16: 2^-24 (smallest subnormal) stays"},
  {KEEL_MATMUL_F16, 0x33000000u, 0x00000000u, "f16: 2^-25 ties to even zero"},
  {KEEL_MATMUL_F16, 0xb3000000u, 0x80000000u, "f16: -2^-25 ties to -0"},
  {KEEL_MATMUL_F16, 0x33c00000u, 0x34000000u, "f16: 1.5 * 2^-24 ties up to 2 * 2^-24"},
  {KEEL_MATMUL_F16, 0x34200000u, 0x34000000u, "f16: 2.5 * 2^-24 ties down to 2 * 2^-24"},
  {KEEL_MATMUL_F16, 0x33000001u, 0x33800000u, "f16: just above 2^-25 rounds up to 2^-24"},
  {KEEL_MATMUL_F16, 0x00000001u, 0x00000000u, "f16: float32 subnormal underflows to zero"},
  {KEEL_MATMUL_F16, 0x7f800000u, 0x7f800000u, "f16: +Inf kept"},
  {KEEL_MATMUL_F16, 0x7fc00001u, 0x7fc00001u, "f16: NaN kept with its payload"},
  /* full precision: nothing changes */
  {KEEL_MATMUL_HIGHEST, 0x3f801001u, 0x3f801001u, "highest: bits unchanged"},
  {KEEL_MATMUL_HIGHEST, 0x477ff000u, 0x477ff000u, "highest: 65520 unchanged"},
};

static uint32_t bits_of(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}

static float float_of(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

void keel_test_round(check_fn check) {
  char what[160], detail[64];
  for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
    const round_case *c = &CASES[i];
    uint32_t got = bits_of(kl_round_to_precision(float_of(c->in), c->prec));
    snprintf(what, sizeof what, "round %08x: %s", (unsigned)c->in, c->what);
    snprintf(detail, sizeof detail, "got %08x, want %08x", (unsigned)got, (unsigned)c->want);
    check(got == c->want, what, got == c->want ? NULL : detail);
  }
  /* the building blocks agree with the dispatch */
  check(bits_of(kl_round_bits(float_of(0x3f803000u), 13)) == 0x3f804000u, "round: kl_round_bits(x, 13)", NULL);
  check(bits_of(kl_round_bits(float_of(0x3f818000u), 16)) == 0x3f820000u, "round: kl_round_bits(x, 16)", NULL);
  check(bits_of(kl_round_f16(float_of(0x33c00000u))) == 0x34000000u, "round: kl_round_f16 subnormal", NULL);
}
