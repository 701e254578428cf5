/* fuzz_csv.c: the numeric CSV reader. The first byte picks the options
** (bit 0: header; bits 1-2: delimiter , ; tab space); the rest is the file. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const char delims[4] = {',', ';', '\t', ' '};
  keel_tensor *t = NULL;
  if (size < 1) return 0;
  keel_read_csv_mem(fuzz_ctx(), data + 1, size - 1, "fuzz", delims[(data[0] >> 1) & 3], data[0] & 1, &t);
  fuzz_done(t, NULL);
  return 0;
}
