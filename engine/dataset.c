/*
** dataset.c: readers for dataset files (IDX, CIFAR-10 binary, numeric CSV)
** and byte-to-id encoding for character-level text.
**
** Every reader parses a buffer in memory (the *_mem functions, which the
** fuzz harnesses in tests/fuzz/ call directly); the path functions read the
** file whole and hand it over. Input is hostile: every size read from a
** file is bounded before anything is allocated, and no read goes past the
** end of the buffer. gzip input (IDX) is inflated as a stream straight into
** the output tensor, and its claimed size is bounded by the deflate ratio
** first, so a tiny file cannot ask for gigabytes.
*/
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "keel_impl.h"

/* Largest file read whole: an IDX payload of 4 GiB plus its header. */
#define DS_MAX_FILE ((size_t)4 << 30 | 64)
/* deflate never expands more than 1032:1 */
#define DS_DEFLATE_RATIO 1032u

/* The last path component, for messages. */
static const char *base_name(const char *path) {
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

/* {======================================================================
** Whole files
** ======================================================================= */

/* Reads path into a malloc'ed buffer (*buf, *n); fn names the caller. */
static keel_status read_file(keel_ctx *ctx, const char *fn, const char *path,
                             unsigned char **buf, size_t *n) {
  FILE *f;
  long sz;
  unsigned char *p;
  *buf = NULL;
  *n = 0;
  f = fopen(path, "rb");
  if (!f) return kl_error(ctx, KEEL_ERR_IO, "%s: cannot open %s: %s", fn, path, strerror(errno));
  if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
    fclose(f);
    return kl_error(ctx, KEEL_ERR_IO, "%s: cannot read %s: not a regular file", fn, path);
  }
  if ((unsigned long)sz > DS_MAX_FILE) {
    fclose(f);
    return kl_error(ctx, KEEL_ERR_IO, "%s: %s is too large (%ld bytes), expected at most %zu",
                    fn, path, sz, DS_MAX_FILE);
  }
  p = (unsigned char *)malloc(sz > 0 ? (size_t)sz : 1);
  if (!p) {
    fclose(f);
    return kl_error(ctx, KEEL_ERR_NOMEM, "%s: out of memory reading %s (%ld bytes)", fn, path, sz);
  }
  if (sz > 0 && fread(p, 1, (size_t)sz, f) != (size_t)sz) {
    free(p);
    fclose(f);
    return kl_error(ctx, KEEL_ERR_IO, "%s: cannot read %s: %s", fn, path, strerror(errno));
  }
  fclose(f);
  *buf = p;
  *n = (size_t)sz;
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** A byte source: a buffer, raw or gzip (inflated on the fly)
** ======================================================================= */

typedef struct ds_src {
  const unsigned char *p;
  size_t n, pos;       /* raw: position in p */
  int gz, zinit, zend;
  z_stream zs;
} ds_src;

static int is_gzip(const unsigned char *p, size_t n) {
  return n >= 2 && p[0] == 0x1f && p[1] == 0x8b;
}

static keel_status src_open(keel_ctx *ctx, const char *fn, const char *name, ds_src *s,
                            const unsigned char *p, size_t n) {
  memset(s, 0, sizeof *s);
  s->p = p;
  s->n = n;
  s->gz = is_gzip(p, n);
  if (s->gz) {
    if (n > UINT_MAX)
      return kl_error(ctx, KEEL_ERR_IO, "%s: %s: gzip file too large", fn, name);
    if (inflateInit2(&s->zs, 15 + 16) != Z_OK)
      return kl_error(ctx, KEEL_ERR_NOMEM, "%s: %s: cannot start zlib", fn, name);
    s->zinit = 1;
    s->zs.next_in = (Bytef *)p;
    s->zs.avail_in = (uInt)n;
  }
  return KEEL_OK;
}

static void src_close(ds_src *s) {
  if (s->zinit) inflateEnd(&s->zs);
  s->zinit = 0;
}

/* Upper bound of the bytes the source can still give. */
static uint64_t src_max_left(const ds_src *s) {
  if (!s->gz) return s->n - s->pos;
  return (uint64_t)s->zs.avail_in * DS_DEFLATE_RATIO + 1024;
}

/* Reads up to want bytes into dst; *got gets the count (short at the end). */
static keel_status src_read(keel_ctx *ctx, const char *fn, const char *name, ds_src *s,
                            void *dst, size_t want, size_t *got) {
  if (!s->gz) {
    size_t k = s->n - s->pos < want ? s->n - s->pos : want;
    memcpy(dst, s->p + s->pos, k);
    s->pos += k;
    *got = k;
    return KEEL_OK;
  }
  *got = 0;
  while (*got < want && !s->zend) {
    int rc;
    size_t chunk = want - *got > (1u << 30) ? (1u << 30) : want - *got;
    s->zs.next_out = (Bytef *)dst + *got;
    s->zs.avail_out = (uInt)chunk;
    rc = inflate(&s->zs, Z_NO_FLUSH);
    *got += chunk - s->zs.avail_out;
    if (rc == Z_STREAM_END) {
      s->zend = 1;
      if (s->zs.avail_in != 0)
        return kl_error(ctx, KEEL_ERR_IO, "%s: %s: %u bytes of trailing data after the gzip stream",
                        fn, name, s->zs.avail_in);
    } else if (rc == Z_BUF_ERROR) {
      if (s->zs.avail_in == 0) break;    /* input ended: truncated stream */
    } else if (rc != Z_OK) {
      return kl_error(ctx, KEEL_ERR_IO, "%s: %s: corrupt gzip data (%s)", fn, name,
                      s->zs.msg ? s->zs.msg : "inflate failed");
    }
  }
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** IDX
** ======================================================================= */

static uint32_t be32(const unsigned char *b) {
  return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

/* Converts k big-endian elements of type code tc from src to dst. */
static void idx_convert(int tc, const unsigned char *src, size_t k, void *dst, size_t at) {
  size_t i;
  if (tc == 0x0C || tc == 0x0E) {
    double *d = (double *)dst + at;
    for (i = 0; i < k; i++) {
      if (tc == 0x0C) {
        d[i] = (double)(int32_t)be32(src + 4 * i);
      } else {
        uint64_t u = (uint64_t)be32(src + 8 * i) << 32 | be32(src + 8 * i + 4);
        double v;
        memcpy(&v, &u, sizeof v);
        d[i] = v;
      }
    }
    return;
  }
  {
    float *f = (float *)dst + at;
    for (i = 0; i < k; i++) {
      switch (tc) {
        case 0x08: f[i] = (float)src[i]; break;
        case 0x09: f[i] = (float)(int8_t)src[i]; break;
        case 0x0B: f[i] = (float)(int16_t)(uint16_t)(src[2 * i] << 8 | src[2 * i + 1]); break;
        default: {
          uint32_t u = be32(src + 4 * i);
          float v;
          memcpy(&v, &u, sizeof v);
          f[i] = v;
        }
      }
    }
  }
}

keel_status keel_read_idx_mem(keel_ctx *ctx, const void *data, size_t n, const char *name,
                              keel_tensor **out) {
  static const char *fn = "read_idx";
  const unsigned char *p = (const unsigned char *)data;
  unsigned char hdr[4 + 4 * 4], chunk[1 << 16];
  ds_src s;
  size_t got, esize = 0, done = 0;
  int tc, nd, i;
  int64_t shape[4];
  uint64_t numel = 1, bound = 1, nbytes;
  keel_tensor *t = NULL;
  keel_status st;
  *out = NULL;
  if (!name) name = "<memory>";
  if ((st = src_open(ctx, fn, name, &s, p, n)) != KEEL_OK) return st;
  if ((st = src_read(ctx, fn, name, &s, hdr, 4, &got)) != KEEL_OK) goto done;
  if (got < 4 || hdr[0] != 0 || hdr[1] != 0) {
    st = kl_error(ctx, KEEL_ERR_IO, "%s: %s is not an IDX file: bad magic number, expected 00 00 <type> <ndims>",
                  fn, name);
    goto done;
  }
  tc = hdr[2];
  nd = hdr[3];
  switch (tc) {
    case 0x08: case 0x09: esize = 1; break;
    case 0x0B: esize = 2; break;
    case 0x0C: case 0x0D: esize = 4; break;
    case 0x0E: esize = 8; break;
    default:
      st = kl_error(ctx, KEEL_ERR_IO, "%s: %s: unknown IDX element type 0x%02X, expected 08, 09, 0B, 0C, 0D or 0E",
                    fn, name, tc);
      goto done;
  }
  if (nd < 1 || nd > 4) {
    st = kl_error(ctx, KEEL_ERR_IO, "%s: %s: %d dimensions, expected 1 to 4", fn, name, nd);
    goto done;
  }
  if ((st = src_read(ctx, fn, name, &s, hdr + 4, 4 * (size_t)nd, &got)) != KEEL_OK) goto done;
  if (got < 4 * (size_t)nd) {
    st = kl_error(ctx, KEEL_ERR_IO, "%s: %s is truncated: the header ends early", fn, name);
    goto done;
  }
  for (i = 0; i < nd; i++) {
    shape[i] = be32(hdr + 4 + 4 * i);
    /* the product with zeros counted as ones is bounded too: strides of
    ** an empty [0, 2^32-1, 2^32-1, ...] tensor would overflow */
    bound *= shape[i] ? (uint64_t)shape[i] : 1;   /* each factor < 2^32: no overflow */
    numel *= (uint64_t)shape[i];
    if (bound > ((uint64_t)1 << 31)) {
      st = kl_error(ctx, KEEL_ERR_IO, "%s: %s: dimensions too large (more than 2^31 elements)", fn, name);
      goto done;
    }
  }
  nbytes = numel * esize;
  if (nbytes > ((uint64_t)4 << 30)) {
    st = kl_error(ctx, KEEL_ERR_IO, "%s: %s: payload too large (%llu bytes), expected at most 4 GiB", fn,
                  name, (unsigned long long)nbytes);
    goto done;
  }
  if (nbytes > src_max_left(&s)) {
    if (s.gz)
      st = kl_error(ctx, KEEL_ERR_IO, "%s: %s is truncated: expected %llu bytes of data, the gzip stream "
                    "holds at most %llu", fn, name, (unsigned long long)nbytes,
                    (unsigned long long)src_max_left(&s));
    else
      st = kl_error(ctx, KEEL_ERR_IO, "%s: %s is truncated: expected %llu bytes of data, got %llu", fn, name,
                    (unsigned long long)nbytes, (unsigned long long)(s.n - s.pos));
    goto done;
  }
  st = kl_new(ctx, (tc == 0x0C || tc == 0x0E) ? KEEL_F64 : KEEL_F32, KEEL_CPU, nd, shape, &t);
  if (st != KEEL_OK) goto done;
  while (done < numel) {
    size_t k = (sizeof chunk) / esize;
    if (k > numel - done) k = (size_t)(numel - done);
    if ((st = src_read(ctx, fn, name, &s, chunk, k * esize, &got)) != KEEL_OK) goto done;
    if (got < k * esize) {
      st = kl_error(ctx, KEEL_ERR_IO, "%s: %s is truncated: expected %llu bytes of data, got %llu", fn, name,
                    (unsigned long long)nbytes, (unsigned long long)(done * esize + got));
      goto done;
    }
    idx_convert(tc, chunk, k, keel_tensor_data(t), done);
    done += k;
  }
  /* nothing may follow the payload */
  if ((st = src_read(ctx, fn, name, &s, chunk, 1, &got)) != KEEL_OK) goto done;
  if (got != 0 || (s.gz && !s.zend)) {
    if (got != 0)
      st = kl_error(ctx, KEEL_ERR_IO, "%s: %s: trailing data after the %llu bytes of payload", fn, name,
                    (unsigned long long)nbytes);
    else
      st = kl_error(ctx, KEEL_ERR_IO, "%s: %s: the gzip stream is truncated", fn, name);
    goto done;
  }
  *out = t;
  t = NULL;
done:
  src_close(&s);
  if (t) keel_tensor_release(t);
  return st;
}

keel_status keel_read_idx(keel_ctx *ctx, const char *path, keel_tensor **out) {
  unsigned char *buf;
  size_t n;
  keel_status st;
  *out = NULL;
  if (!path) return kl_error(ctx, KEEL_ERR_ARG, "read_idx: path is NULL, expected a file name");
  if ((st = read_file(ctx, "read_idx", path, &buf, &n)) != KEEL_OK) return st;
  st = keel_read_idx_mem(ctx, buf, n, base_name(path), out);
  free(buf);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** CIFAR-10 binary batches: records of 1 label byte + 3 * 32 * 32 pixels
** ======================================================================= */

#define CIFAR_REC 3073
#define CIFAR_PIX 3072

static keel_status cifar_check(keel_ctx *ctx, const char *name, size_t n) {
  if (n == 0 || n % CIFAR_REC != 0)
    return kl_error(ctx, KEEL_ERR_IO,
                    "read_cifar10: %s: size %zu is not a positive multiple of %d, expected whole records "
                    "(1 label byte + 3072 pixels)", name, n, CIFAR_REC);
  return KEEL_OK;
}

static keel_status cifar_decode(keel_ctx *ctx, const char *name, const unsigned char *p, size_t n,
                                float *img, int64_t *lab, int base) {
  size_t r, i, recs = n / CIFAR_REC;
  for (r = 0; r < recs; r++) {
    const unsigned char *rec = p + r * CIFAR_REC;
    if (rec[0] > 9)
      return kl_error(ctx, KEEL_ERR_IO, "read_cifar10: %s: record %zu has label %d, expected 0 to 9",
                      name, r + 1, rec[0]);
    lab[r] = rec[0] + base;
    for (i = 0; i < CIFAR_PIX; i++) img[r * CIFAR_PIX + i] = (float)rec[1 + i];
  }
  return KEEL_OK;
}

static keel_status cifar_alloc(keel_ctx *ctx, int64_t n, keel_tensor **images, keel_tensor **labels) {
  int64_t ishape[4] = {n, 3, 32, 32};
  keel_status st = kl_new(ctx, KEEL_F32, KEEL_CPU, 4, ishape, images);
  if (st != KEEL_OK) return st;
  st = kl_new(ctx, KEEL_I64, KEEL_CPU, 1, &n, labels);
  if (st != KEEL_OK) {
    keel_tensor_release(*images);
    *images = NULL;
  }
  return st;
}

keel_status keel_read_cifar10_mem(keel_ctx *ctx, const void *data, size_t n, const char *name,
                                  keel_tensor **images, keel_tensor **labels) {
  keel_status st;
  *images = *labels = NULL;
  if (!name) name = "<memory>";
  if ((st = cifar_check(ctx, name, n)) != KEEL_OK) return st;
  if ((st = cifar_alloc(ctx, (int64_t)(n / CIFAR_REC), images, labels)) != KEEL_OK) return st;
  st = cifar_decode(ctx, name, (const unsigned char *)data, n, (float *)keel_tensor_data(*images),
                    (int64_t *)keel_tensor_data(*labels), keel_index_base(ctx));
  if (st != KEEL_OK) {
    keel_tensor_release(*images);
    keel_tensor_release(*labels);
    *images = *labels = NULL;
  }
  return st;
}

keel_status keel_read_cifar10(keel_ctx *ctx, const char *const *paths, int npaths,
                              keel_tensor **images, keel_tensor **labels) {
  int64_t total = 0, at = 0;
  int i;
  keel_status st;
  *images = *labels = NULL;
  if (!paths || npaths < 1)
    return kl_error(ctx, KEEL_ERR_ARG, "read_cifar10: %d files, expected at least 1", npaths);
  for (i = 0; i < npaths; i++) {     /* sizes first: one allocation */
    FILE *f = fopen(paths[i], "rb");
    long sz;
    if (!f)
      return kl_error(ctx, KEEL_ERR_IO, "read_cifar10: cannot open %s: %s", paths[i], strerror(errno));
    sz = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    fclose(f);
    if (sz < 0) return kl_error(ctx, KEEL_ERR_IO, "read_cifar10: cannot read %s", paths[i]);
    if ((st = cifar_check(ctx, base_name(paths[i]), (size_t)sz)) != KEEL_OK) return st;
    total += sz / CIFAR_REC;
    if (total > ((int64_t)1 << 24))
      return kl_error(ctx, KEEL_ERR_IO, "read_cifar10: more than 2^24 records, expected fewer");
  }
  if ((st = cifar_alloc(ctx, total, images, labels)) != KEEL_OK) return st;
  for (i = 0; i < npaths && st == KEEL_OK; i++) {
    unsigned char *buf;
    size_t n;
    if ((st = read_file(ctx, "read_cifar10", paths[i], &buf, &n)) != KEEL_OK) break;
    if ((st = cifar_check(ctx, base_name(paths[i]), n)) == KEEL_OK) {
      if (at + (int64_t)(n / CIFAR_REC) > total)
        st = kl_error(ctx, KEEL_ERR_IO, "read_cifar10: %s changed size while being read", paths[i]);
      else
        st = cifar_decode(ctx, base_name(paths[i]), buf, n,
                          (float *)keel_tensor_data(*images) + at * CIFAR_PIX,
                          (int64_t *)keel_tensor_data(*labels) + at, keel_index_base(ctx));
    }
    at += (int64_t)(n / CIFAR_REC);
    free(buf);
  }
  if (st == KEEL_OK && at != total)
    st = kl_error(ctx, KEEL_ERR_IO, "read_cifar10: the files changed size while being read");
  if (st != KEEL_OK) {
    keel_tensor_release(*images);
    keel_tensor_release(*labels);
    *images = *labels = NULL;
  }
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Numeric CSV
** ======================================================================= */

#define CSV_MAX_FIELD 128

/* One pass over the rows. parse == 0 counts rows and checks the column
** count; parse == 1 also converts every field into dst. */
static keel_status csv_pass(keel_ctx *ctx, const char *name, const unsigned char *p, size_t n,
                            int delim, int header, int parse, double *dst, int64_t *rows_out,
                            int64_t *cols_out) {
  size_t pos = 0;
  int64_t line = 0, rows = 0, cols = parse ? *cols_out : -1, first_line = 1;
  while (pos < n) {
    size_t end = pos, e;
    int64_t c = 0;
    line++;
    while (end < n && p[end] != '\n') end++;
    e = end;
    if (e > pos && p[e - 1] == '\r') e--;
    if (line == 1 && header) { pos = end + 1; continue; }
    {   /* a blank line (only spaces) is skipped */
      size_t k = pos;
      while (k < e && (p[k] == ' ' || p[k] == '\t')) k++;
      if (k == e) { pos = end + 1; continue; }
    }
    for (;;) {   /* fields of [pos, e) */
      size_t fs = pos, fe;
      while (pos < e && p[pos] != (unsigned char)delim) pos++;
      fe = pos;
      c++;
      if (parse && c <= cols) {
        char buf[CSV_MAX_FIELD + 1], *stop;
        size_t a = fs, b = fe;
        double v;
        while (a < b && (p[a] == ' ' || p[a] == '\t')) a++;
        while (b > a && (p[b - 1] == ' ' || p[b - 1] == '\t')) b--;
        if (a == b)
          return kl_error(ctx, KEEL_ERR_IO, "read_csv: %s:%lld:%lld: empty field, expected a number",
                          name, (long long)line, (long long)c);
        if (b - a > CSV_MAX_FIELD)
          return kl_error(ctx, KEEL_ERR_IO, "read_csv: %s:%lld:%lld: field longer than %d characters, "
                          "expected a number", name, (long long)line, (long long)c, CSV_MAX_FIELD);
        memcpy(buf, p + a, b - a);
        buf[b - a] = 0;
        errno = 0;
        v = strtod(buf, &stop);
        if (stop == buf || *stop != 0) {
          size_t k;
          for (k = 0; buf[k]; k++)  /* keep the message printable */
            if ((unsigned char)buf[k] < 32 || (unsigned char)buf[k] > 126) buf[k] = '?';
          if (b - a > 40) strcpy(buf + 37, "...");
          return kl_error(ctx, KEEL_ERR_IO, "read_csv: %s:%lld:%lld: bad number '%s', expected a number",
                          name, (long long)line, (long long)c, buf);
        }
        dst[rows * cols + (c - 1)] = v;
      }
      if (pos >= e) break;
      pos++;    /* past the delimiter */
    }
    if (cols < 0) {
      cols = c;
      first_line = line;
    } else if (c != cols) {
      return kl_error(ctx, KEEL_ERR_IO, "read_csv: %s:%lld: %lld columns, expected %lld (as on line %lld)",
                      name, (long long)line, (long long)c, (long long)cols, (long long)first_line);
    }
    rows++;
    pos = end + 1;
  }
  *rows_out = rows;
  *cols_out = cols < 0 ? 0 : cols;
  return KEEL_OK;
}

keel_status keel_read_csv_mem(keel_ctx *ctx, const void *data, size_t n, const char *name,
                              int delimiter, int header, keel_tensor **out) {
  const unsigned char *p = (const unsigned char *)data;
  int64_t rows, cols, shape[2];
  keel_status st;
  keel_tensor *t;
  *out = NULL;
  if (!name) name = "<memory>";
  if (delimiter <= 0 || delimiter > 255 || delimiter == '\n' || delimiter == '\r' || delimiter == '.' ||
      delimiter == '-' || delimiter == '+' || (delimiter >= '0' && delimiter <= '9'))
    return kl_error(ctx, KEEL_ERR_ARG, "read_csv: bad delimiter %d, expected a separator character", delimiter);
  if ((st = csv_pass(ctx, name, p, n, delimiter, header, 0, NULL, &rows, &cols)) != KEEL_OK) return st;
  if (rows == 0)
    return kl_error(ctx, KEEL_ERR_IO, "read_csv: %s has no data rows, expected at least one", name);
  shape[0] = rows;
  shape[1] = cols;
  if ((st = kl_new(ctx, KEEL_F64, KEEL_CPU, 2, shape, &t)) != KEEL_OK) return st;
  /* the fields are now known to fit: rows * cols matches what pass 0 saw */
  {
    int64_t r2, c2 = cols;
    st = csv_pass(ctx, name, p, n, delimiter, header, 1, (double *)keel_tensor_data(t), &r2, &c2);
  }
  if (st != KEEL_OK) {
    keel_tensor_release(t);
    return st;
  }
  *out = t;
  return KEEL_OK;
}

keel_status keel_read_csv(keel_ctx *ctx, const char *path, int delimiter, int header,
                          keel_tensor **out) {
  unsigned char *buf;
  size_t n;
  keel_status st;
  *out = NULL;
  if (!path) return kl_error(ctx, KEEL_ERR_ARG, "read_csv: path is NULL, expected a file name");
  if ((st = read_file(ctx, "read_csv", path, &buf, &n)) != KEEL_OK) return st;
  st = keel_read_csv_mem(ctx, buf, n, base_name(path), delimiter, header, out);
  free(buf);
  return st;
}

/* }====================================================================== */

/* {======================================================================
** Bytes to ids (character-level text)
** ======================================================================= */

keel_status keel_encode_bytes(keel_ctx *ctx, const void *data, size_t n, const int64_t map[256],
                              keel_tensor **out) {
  const unsigned char *p = (const unsigned char *)data;
  int64_t len = (int64_t)n;
  int64_t *d;
  size_t i;
  keel_status st;
  *out = NULL;
  if (n > ((size_t)1 << 40))
    return kl_error(ctx, KEEL_ERR_ARG, "encode_bytes: %zu bytes, expected at most 2^40", n);
  for (i = 0; i < n; i++)
    if (map[p[i]] < 0)
      return kl_error(ctx, KEEL_ERR_ARG, "encode_bytes: byte %d at position %zu is not in the vocabulary",
                      p[i], i + 1);
  if ((st = kl_new(ctx, KEEL_I64, KEEL_CPU, 1, &len, out)) != KEEL_OK) return st;
  d = (int64_t *)keel_tensor_data(*out);
  for (i = 0; i < n; i++) d[i] = map[p[i]];
  return KEEL_OK;
}

/* }====================================================================== */
