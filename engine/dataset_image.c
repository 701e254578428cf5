/*
** dataset_image.c: PNG, JPEG and BMP images through stb_image (the one
** place that compiles it), as float32 [C, H, W] with values 0..255,
** optionally resized (bilinear, align_corners = false as torch).
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "keel_impl.h"

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wmissing-prototypes"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#endif
/* static: a C host that compiles stb_image itself links without clashes */
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STBI_NO_STDIO
#define STBI_NO_HDR
#define STBI_NO_LINEAR
#define STBI_MAX_DIMENSIONS 16384
#include <stb/stb_image.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
/* stb declares static prototypes that STBI_ONLY_* leaves undefined; GCC
** reports them at the end of the file, outside the push/pop above */
#pragma GCC diagnostic ignored "-Wunused-function"
#endif

/* Largest decoded image, in pixels: 64 Mpx. */
#define IMG_MAX_PIXELS ((int64_t)1 << 26)

static const char *base_name(const char *path) {
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

/* Bilinear resize of one channel-interleaved 8-bit image into planar f32. */
static void to_planar(const unsigned char *src, int sw, int sh, int c, float *dst, int dw, int dh) {
  int ch, y, x;
  if (sw == dw && sh == dh) {
    for (ch = 0; ch < c; ch++)
      for (y = 0; y < sh; y++)
        for (x = 0; x < sw; x++)
          dst[((size_t)ch * dh + y) * dw + x] = src[((size_t)y * sw + x) * c + ch];
    return;
  }
  for (y = 0; y < dh; y++) {
    double fy = ((double)y + 0.5) * sh / dh - 0.5;
    int y0, y1;
    double wy;
    if (fy < 0) fy = 0;
    y0 = (int)fy;
    if (y0 > sh - 1) y0 = sh - 1;
    y1 = y0 + 1 < sh ? y0 + 1 : sh - 1;
    wy = fy - y0;
    for (x = 0; x < dw; x++) {
      double fx = ((double)x + 0.5) * sw / dw - 0.5;
      int x0, x1;
      double wx;
      if (fx < 0) fx = 0;
      x0 = (int)fx;
      if (x0 > sw - 1) x0 = sw - 1;
      x1 = x0 + 1 < sw ? x0 + 1 : sw - 1;
      wx = fx - x0;
      for (ch = 0; ch < c; ch++) {
        double a = src[((size_t)y0 * sw + x0) * c + ch], b = src[((size_t)y0 * sw + x1) * c + ch];
        double d = src[((size_t)y1 * sw + x0) * c + ch], e = src[((size_t)y1 * sw + x1) * c + ch];
        double v = (a * (1 - wx) + b * wx) * (1 - wy) + (d * (1 - wx) + e * wx) * wy;
        dst[((size_t)ch * dh + y) * dw + x] = (float)v;
      }
    }
  }
}

/* stb_image allocates a PNG chunk's claimed length before reading it: the
** chunk lengths are checked against the file size first. */
static keel_status check_png(keel_ctx *ctx, const unsigned char *p, size_t n, const char *name) {
  static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  size_t pos = 8;
  int idat = 0;
  if (n < 8 || memcmp(p, sig, 8) != 0) return KEEL_OK;
  while (n - pos >= 4) {   /* stb reads a length from as few as 4 bytes */
    size_t len = (size_t)p[pos] << 24 | (size_t)p[pos + 1] << 16 | (size_t)p[pos + 2] << 8 | p[pos + 3];
    if (n - pos < 12 || len > n - pos - 12)
      return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: corrupt PNG: the chunk at byte %zu claims %zu bytes, "
                      "expected at most %zu", name, pos, len, n - pos < 12 ? 0 : n - pos - 12);
    if (memcmp(p + pos + 4, "IEND", 4) == 0) break;
    /* an empty first IDAT makes stb offset a NULL buffer (undefined) */
    if (memcmp(p + pos + 4, "IDAT", 4) == 0 && !idat++ && len == 0)
      return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: corrupt PNG: empty first IDAT chunk", name);
    pos += 12 + len;
  }
  return KEEL_OK;
}

/* stb_image 2.27 overflows a Huffman table when a JPEG DHT segment lists
** more than 256 codes (fixed in 2.28). Every FF C4 of a JPEG is checked
** as a DHT segment, the way stb reads one (missing bytes read as 0); one
** that stb could misread is refused. */
static keel_status check_jpeg(keel_ctx *ctx, const unsigned char *p, size_t n, const char *name) {
  size_t i;
  if (n < 2 || p[0] != 0xFF) return KEEL_OK;   /* stb skips FF fill bytes before SOI */
  for (i = 2; i + 1 < n; i++) {
    size_t at;
    long len;
    if (p[i] != 0xFF || p[i + 1] != 0xC4) continue;
    at = i + 2;
#define JB(k) ((k) < n ? (long)p[k] : 0L)
    len = (JB(at) << 8 | JB(at + 1)) - 2;
    at += 2;
    while (len > 0) {
      long cnt = 0;
      int k;
      for (k = 0; k < 16; k++) cnt += JB(at + 1 + (size_t)k);
      if (cnt > 256)
        return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: corrupt JPEG: a Huffman table of %ld codes, "
                        "expected at most 256", name, cnt);
      at += 17 + (size_t)cnt;
      len -= 17 + cnt;
      if (at > n) break;
    }
#undef JB
  }
  return KEEL_OK;
}

/* The size of an image, after the checks above. */
static keel_status image_info(keel_ctx *ctx, const void *data, size_t n, const char *name, int *w, int *h) {
  int c;
  if (n == 0 || n > INT32_MAX)
    return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: %zu bytes, expected a PNG, JPEG or BMP image", name, n);
  if (check_png(ctx, (const unsigned char *)data, n, name) != KEEL_OK ||
      check_jpeg(ctx, (const unsigned char *)data, n, name) != KEEL_OK)
    return KEEL_ERR_IO;
  if (!stbi_info_from_memory((const stbi_uc *)data, (int)n, w, h, &c))
    return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: not a PNG, JPEG or BMP image (%s)", name,
                    stbi_failure_reason());
  return KEEL_OK;
}

/* Decodes into dst ([channels, h, w]) or, when dst is NULL, allocates *out. */
static keel_status decode(keel_ctx *ctx, const void *data, size_t n, const char *name, int channels,
                          int h, int w, float *dst, keel_tensor **out) {
  int iw, ih, ic;
  unsigned char *px;
  if (channels != 1 && channels != 3)
    return kl_error(ctx, KEEL_ERR_ARG, "read_image: channels %d, expected 1 or 3", channels);
  if (h < 0 || w < 0 || (int64_t)h * w > IMG_MAX_PIXELS || (h == 0) != (w == 0))
    return kl_error(ctx, KEEL_ERR_ARG, "read_image: size %dx%d, expected both positive (at most 2^26 "
                    "pixels) or both 0", h, w);
  if (image_info(ctx, data, n, name, &iw, &ih) != KEEL_OK) return KEEL_ERR_IO;
  if (iw <= 0 || ih <= 0 || (int64_t)iw * ih > IMG_MAX_PIXELS)
    return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: %dx%d pixels, expected at most 2^26", name, iw, ih);
  /* no format packs more than 8 pixels a byte at deflate's 1032:1; stb
  ** would fill the missing rest of a short file with zeros */
  if ((int64_t)iw * ih > ((int64_t)n + 64) * 8256)
    return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: %dx%d pixels, more than a file of %zu bytes can hold",
                    name, iw, ih, n);
  px = stbi_load_from_memory((const stbi_uc *)data, (int)n, &iw, &ih, &ic, channels);
  if (!px)
    return kl_error(ctx, KEEL_ERR_IO, "read_image: %s: cannot decode (%s)", name, stbi_failure_reason());
  if (h == 0) { h = ih; w = iw; }
  if (!dst) {
    int64_t shape[3] = {channels, h, w};
    keel_status st = kl_new(ctx, KEEL_F32, KEEL_CPU, 3, shape, out);
    if (st != KEEL_OK) { stbi_image_free(px); return st; }
    dst = (float *)keel_tensor_data(*out);
  }
  to_planar(px, iw, ih, channels, dst, w, h);
  stbi_image_free(px);
  return KEEL_OK;
}

keel_status keel_decode_image(keel_ctx *ctx, const void *data, size_t n, const char *name, int channels,
                              int h, int w, keel_tensor **out) {
  *out = NULL;
  return decode(ctx, data, n, name ? name : "<memory>", channels, h, w, NULL, out);
}

static keel_status slurp(keel_ctx *ctx, const char *path, unsigned char **buf, size_t *n) {
  FILE *f = fopen(path, "rb");
  long sz;
  *buf = NULL;
  if (!f) return kl_error(ctx, KEEL_ERR_IO, "read_image: cannot open %s", path);
  if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 || sz > INT32_MAX) {
    fclose(f);
    return kl_error(ctx, KEEL_ERR_IO, "read_image: cannot read %s, expected a regular file under 2 GiB", path);
  }
  *buf = (unsigned char *)malloc(sz > 0 ? (size_t)sz : 1);
  if (!*buf) { fclose(f); return kl_error(ctx, KEEL_ERR_NOMEM, "read_image: out of memory reading %s", path); }
  if (sz > 0 && fread(*buf, 1, (size_t)sz, f) != (size_t)sz) {
    fclose(f);
    free(*buf);
    *buf = NULL;
    return kl_error(ctx, KEEL_ERR_IO, "read_image: cannot read %s", path);
  }
  fclose(f);
  *n = (size_t)sz;
  return KEEL_OK;
}

keel_status keel_read_image(keel_ctx *ctx, const char *path, int channels, int h, int w,
                            keel_tensor **out) {
  unsigned char *buf;
  size_t n;
  keel_status st;
  *out = NULL;
  if ((st = slurp(ctx, path, &buf, &n)) != KEEL_OK) return st;
  st = decode(ctx, buf, n, path, channels, h, w, NULL, out);
  free(buf);
  return st;
}

keel_status keel_read_images(keel_ctx *ctx, const char *const *paths, int npaths, int channels, int h,
                             int w, keel_tensor **out) {
  int i;
  keel_status st = KEEL_OK;
  keel_tensor *first = NULL;
  *out = NULL;
  if (!paths || npaths < 1)
    return kl_error(ctx, KEEL_ERR_ARG, "read_images: %d files, expected at least 1", npaths);
  if (h == 0) {   /* every image must have the first one's size */
    if ((st = keel_read_image(ctx, paths[0], channels, 0, 0, &first)) != KEEL_OK) return st;
    h = (int)keel_tensor_shape(first)[1];
    w = (int)keel_tensor_shape(first)[2];
  }
  {
    int64_t shape[4] = {npaths, channels, h, w};
    if ((int64_t)npaths * channels * h * w > ((int64_t)1 << 31)) {
      keel_tensor_release(first);
      return kl_error(ctx, KEEL_ERR_ARG, "read_images: %d images of %dx%dx%d, expected at most 2^31 values",
                      npaths, channels, h, w);
    }
    if ((st = kl_new(ctx, KEEL_F32, KEEL_CPU, 4, shape, out)) != KEEL_OK) {
      if (first) keel_tensor_release(first);
      return st;
    }
  }
  for (i = 0; i < npaths && st == KEEL_OK; i++) {
    float *dst = (float *)keel_tensor_data(*out) + (size_t)i * channels * h * w;
    unsigned char *buf;
    size_t n;
    int iw, ih;
    if (i == 0 && first) {
      memcpy(dst, keel_tensor_data(first), sizeof(float) * (size_t)channels * h * w);
      continue;
    }
    if ((st = slurp(ctx, paths[i], &buf, &n)) != KEEL_OK) break;
    if (first && (st = image_info(ctx, buf, n, paths[i], &iw, &ih)) != KEEL_OK) {
      /* named by image_info */
    } else if (first && (iw != w || ih != h))
      st = kl_error(ctx, KEEL_ERR_SHAPE, "read_images: %s is %dx%d, expected %dx%d as %s (or give a size)",
                    paths[i], ih, iw, h, w, base_name(paths[0]));
    else
      st = decode(ctx, buf, n, paths[i], channels, h, w, dst, NULL);
    free(buf);
  }
  if (first) keel_tensor_release(first);
  if (st != KEEL_OK) {
    keel_tensor_release(*out);
    *out = NULL;
  }
  return st;
}
