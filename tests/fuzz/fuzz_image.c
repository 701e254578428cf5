/* fuzz_image.c: PNG/JPEG/BMP decoding through stb_image. The first byte
** picks the options (bit 0: 1 or 3 channels; bit 1: resize to 7x5); the
** rest is the file. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  keel_tensor *t = NULL;
  int resize;
  if (size < 1) return 0;
  resize = (data[0] >> 1) & 1;
  keel_decode_image(fuzz_ctx(), data + 1, size - 1, "fuzz", (data[0] & 1) ? 3 : 1, resize ? 7 : 0,
                    resize ? 5 : 0, &t);
  fuzz_done(t, NULL);
  return 0;
}
