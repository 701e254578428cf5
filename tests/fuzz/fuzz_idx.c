/* fuzz_idx.c: the IDX reader (raw and gzip) on arbitrary bytes. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  keel_tensor *t = NULL;
  keel_read_idx_mem(fuzz_ctx(), data, size, "fuzz", &t);
  fuzz_done(t, NULL);
  return 0;
}
