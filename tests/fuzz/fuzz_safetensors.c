/* fuzz_safetensors.c: the safetensors reader (keel_safetensors_load_buffer);
** the input is the whole file. Every tensor it returns is read in full so
** that a bad size or offset shows up under the sanitizers. */
#include <string.h>
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  keel_safetensors *st = NULL;
  if (keel_safetensors_load_buffer(fuzz_ctx(), data, size, &st) == KEEL_OK) {
    volatile unsigned char sink = 0;
    for (int i = 0; i < keel_safetensors_count(st); i++) {
      keel_tensor *t = keel_safetensors_tensor(st, i);
      const unsigned char *p = (const unsigned char *)keel_tensor_data(t);
      size_t n = (size_t)keel_tensor_numel(t) * keel_dtype_size(keel_tensor_dtype(t));
      for (size_t k = 0; k < n; k++) sink ^= p[k];
      sink ^= (unsigned char)strlen(keel_safetensors_name(st, i));
    }
    for (int i = 0; i < keel_safetensors_metadata_count(st); i++)
      sink ^= (unsigned char)(strlen(keel_safetensors_metadata_key(st, i)) +
                              strlen(keel_safetensors_metadata_value(st, i)));
    (void)sink;
  }
  keel_safetensors_free(st);
  fuzz_done(NULL, NULL);
  return 0;
}
