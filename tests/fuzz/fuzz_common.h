/*
** fuzz_common.h: what the libFuzzer harnesses share: one engine context
** for the whole run, released tensors after every input (so that leaks
** on the error paths show up), and memory trimmed now and then.
*/
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include "keel.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static keel_ctx *fuzz_ctx(void) {
  static keel_ctx *ctx;
  if (!ctx && keel_ctx_new(&ctx, NULL, NULL) != KEEL_OK) abort();
  return ctx;
}

static void fuzz_done(keel_tensor *a, keel_tensor *b) {
  if (a) keel_tensor_release(a);
  if (b) keel_tensor_release(b);
  keel_memory_trim(fuzz_ctx());
}

#endif
