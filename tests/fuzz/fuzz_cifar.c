/* fuzz_cifar.c: the CIFAR-10 binary reader on arbitrary bytes. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  keel_tensor *x = NULL, *y = NULL;
  keel_read_cifar10_mem(fuzz_ctx(), data, size, "fuzz", &x, &y);
  fuzz_done(x, y);
  return 0;
}
