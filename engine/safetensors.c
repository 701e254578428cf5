/*
** safetensors.c: reading and writing the safetensors format.
**
**   8 bytes    N, little-endian u64: the header length
**   N bytes    UTF-8 JSON: {"__metadata__": {"k": "v", ...},
**              "<name>": {"dtype": "F32", "shape": [2, 3],
**                         "data_offsets": [begin, end]}, ...}
**              padded with spaces to a multiple of 8
**   the rest   tensor data, little-endian, row-major; offsets count from
**              the first byte after the header
**
** The reader trusts nothing: the header length is bounded before any
** allocation and must lie inside the file, the JSON is parsed by a strict
** non-recursive reader for exactly this schema, and the tensors must tile
** the data area exactly (no holes, no overlaps, nothing after the last).
** The writer orders tensors as the reference writer does (by dtype
** alignment, largest first, then by name) and replaces the file
** atomically: temporary file, fsync, rename, fsync of the directory.
*/
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "keel_impl.h"

/* Larger headers are refused (the reference reader's limit). */
#define ST_MAX_HEADER ((uint64_t)100 << 20)
/* Dimensions of an empty tensor (whose size the data cannot bound). */
#define ST_MAX_EMPTY_DIM ((uint64_t)1 << 31)

/* {======================================================================
** Dtypes
** ======================================================================= */

typedef struct st_dtype {
  const char *name;
  int size;
  keel_dtype to;      /* what it loads as */
} st_dtype;

/* The first three are keel's own; the rest are converted on load. */
static const st_dtype DTYPES[] = {
  {"F32", 4, KEEL_F32}, {"F64", 8, KEEL_F64}, {"I64", 8, KEEL_I64},
  {"F16", 2, KEEL_F32}, {"BF16", 2, KEEL_F32}, {"I32", 4, KEEL_I64},
  {"I16", 2, KEEL_I64}, {"I8", 1, KEEL_I64}, {"U8", 1, KEEL_I64}, {"BOOL", 1, KEEL_I64},
};
#define ST_NDTYPES ((int)(sizeof DTYPES / sizeof DTYPES[0]))

static const char *const SAVE_NAMES[KEEL_DTYPE_COUNT] = {"F32", "F64", "I64"};
/* Order of the reference writer: larger alignment first (I64 > F64 > F32). */
static const int SAVE_RANK[KEEL_DTYPE_COUNT] = {0, 1, 2};  /* F32, F64, I64 */

static int find_dtype(const char *s, size_t n) {
  for (int i = 0; i < ST_NDTYPES; i++)
    if (strlen(DTYPES[i].name) == n && !memcmp(DTYPES[i].name, s, n)) return i;
  return -1;
}

static int little_endian(void) {
  uint16_t x = 1;
  unsigned char c;
  memcpy(&c, &x, 1);
  return c == 1;
}

static float half_to_float(uint16_t h) {
  uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ffu, bits;
  float f;
  if (e == 31) {
    bits = s | 0x7f800000u | (m << 13);
    memcpy(&f, &bits, 4);
    return f;
  }
  f = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m + 1024), (int)e - 25);
  return s ? -f : f;
}

static void convert(int src, const unsigned char *in, void *out, int64_t n) {
  const char *name = DTYPES[src].name;
  int size = DTYPES[src].size;
  float *f = (float *)out;
  int64_t *q = (int64_t *)out;
  if (!strcmp(name, "F16")) {
    for (int64_t i = 0; i < n; i++) {
      uint16_t h;
      memcpy(&h, in + i * 2, 2);
      f[i] = half_to_float(h);
    }
  } else if (!strcmp(name, "BF16")) {
    for (int64_t i = 0; i < n; i++) {
      uint32_t bits = (uint32_t)in[i * 2] << 16 | (uint32_t)in[i * 2 + 1] << 24;
      memcpy(f + i, &bits, 4);
    }
  } else if (!strcmp(name, "I32") || !strcmp(name, "I16")) {
    for (int64_t i = 0; i < n; i++) {
      int32_t v32;
      int16_t v16;
      if (size == 4) { memcpy(&v32, in + i * 4, 4); q[i] = v32; }
      else { memcpy(&v16, in + i * 2, 2); q[i] = v16; }
    }
  } else if (!strcmp(name, "I8")) {
    for (int64_t i = 0; i < n; i++) q[i] = (int8_t)in[i];
  } else if (!strcmp(name, "U8")) {
    for (int64_t i = 0; i < n; i++) q[i] = in[i];
  } else {  /* BOOL */
    for (int64_t i = 0; i < n; i++) q[i] = in[i] != 0;
  }
}

/* }====================================================================== */

/* {======================================================================
** The loaded file
** ======================================================================= */

typedef struct st_entry {
  char *name;
  size_t name_size;
  int src;                      /* index into DTYPES */
  int ndim;
  int64_t shape[KEEL_MAX_DIMS];
  uint64_t begin, end;
  keel_tensor *t;
} st_entry;

typedef struct st_meta {
  char *key, *value;
  size_t key_size, value_size;
} st_meta;

struct keel_safetensors {
  keel_ctx *ctx;
  int n, cap;
  st_entry *e;
  int nm, mcap;
  st_meta *m;
};

void keel_safetensors_free(keel_safetensors *st) {
  keel_ctx *ctx;
  if (!st) return;
  ctx = st->ctx;
  for (int i = 0; i < st->n; i++) {
    kl_free(ctx, st->e[i].name, st->e[i].name_size);
    if (st->e[i].t) keel_tensor_release(st->e[i].t);
  }
  for (int i = 0; i < st->nm; i++) {
    kl_free(ctx, st->m[i].key, st->m[i].key_size);
    kl_free(ctx, st->m[i].value, st->m[i].value_size);
  }
  kl_free(ctx, st->e, (size_t)st->cap * sizeof *st->e);
  kl_free(ctx, st->m, (size_t)st->mcap * sizeof *st->m);
  kl_free(ctx, st, sizeof *st);
}

int keel_safetensors_count(const keel_safetensors *st) { return st->n; }

const char *keel_safetensors_name(const keel_safetensors *st, int i) {
  return i >= 0 && i < st->n ? st->e[i].name : NULL;
}

keel_tensor *keel_safetensors_tensor(const keel_safetensors *st, int i) {
  return i >= 0 && i < st->n ? st->e[i].t : NULL;
}

const char *keel_safetensors_dtype(const keel_safetensors *st, int i) {
  return i >= 0 && i < st->n ? DTYPES[st->e[i].src].name : NULL;
}

int keel_safetensors_metadata_count(const keel_safetensors *st) { return st->nm; }

const char *keel_safetensors_metadata_key(const keel_safetensors *st, int i) {
  return i >= 0 && i < st->nm ? st->m[i].key : NULL;
}

const char *keel_safetensors_metadata_value(const keel_safetensors *st, int i) {
  return i >= 0 && i < st->nm ? st->m[i].value : NULL;
}

/* Grows an array of *cap elements of size sz to hold one more. */
static int grow(keel_ctx *ctx, void **arr, int *cap, int used, size_t sz) {
  int ncap;
  void *p;
  if (used < *cap) return 0;
  if (*cap > (1 << 28)) return -1;
  ncap = *cap ? 2 * *cap : 8;
  p = kl_malloc(ctx, (size_t)ncap * sz);
  if (!p) return -1;
  if (*arr) memcpy(p, *arr, (size_t)used * sz);
  kl_free(ctx, *arr, (size_t)*cap * sz);
  *arr = p;
  *cap = ncap;
  return 0;
}

/* }====================================================================== */

/* {======================================================================
** Header parsing
** ======================================================================= */

typedef struct jp {
  keel_ctx *ctx;
  const char *what;              /* file name, for messages */
  const unsigned char *start, *p, *end;
} jp;

#define FN_LOAD "safetensors_load"

static keel_status jerr(jp *j, const char *msg, const unsigned char *at) {
  return kl_error(j->ctx, KEEL_ERR_IO, FN_LOAD ": %s: corrupt header at byte %lld: %s, expected JSON of the "
                  "safetensors schema", j->what, (long long)(at - j->start), msg);
}

static void ws(jp *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int expect(jp *j, int c) {
  ws(j);
  if (j->p < j->end && *j->p == c) { j->p++; return 1; }
  return 0;
}

/* Strict UTF-8 (no overlongs, no surrogates, at most U+10FFFF). */
static int valid_utf8(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i];
    int k;
    uint32_t cp;
    if (c < 0x80) { i++; continue; }
    if (c >= 0xc2 && c <= 0xdf) { k = 1; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { k = 2; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { k = 3; cp = c & 0x07; }
    else return 0;
    if (n - i <= (size_t)k) return 0;
    for (int q = 1; q <= k; q++) {
      if ((s[i + q] & 0xc0) != 0x80) return 0;
      cp = cp << 6 | (s[i + q] & 0x3f);
    }
    if ((k == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff)))
      return 0;
    i += (size_t)k + 1;
  }
  return 1;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static int hex4(jp *j, uint32_t *v) {
  *v = 0;
  if (j->end - j->p < 4) return 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval(j->p[i]);
    if (h < 0) return 0;
    *v = *v << 4 | (uint32_t)h;
  }
  j->p += 4;
  return 1;
}

/* A JSON string, decoded into a new NUL-terminated buffer of *size bytes
** (the decoded text never outgrows the raw one). */
static keel_status jstring(jp *j, char **out, size_t *size, size_t *len) {
  const unsigned char *start, *q;
  char *buf;
  size_t n = 0, cap;
  ws(j);
  if (j->p >= j->end || *j->p != '"') return jerr(j, "expected a string", j->p);
  start = ++j->p;
  for (q = start; q < j->end && *q != '"'; q++)
    if (*q == '\\' && q + 1 < j->end) q++;
  if (q >= j->end) return jerr(j, "unterminated string", start);
  cap = (size_t)(q - start) + 1;
  buf = (char *)kl_malloc(j->ctx, cap);
  if (!buf) return kl_error(j->ctx, KEEL_ERR_NOMEM, FN_LOAD ": out of memory");
  while (j->p < q) {
    unsigned c = *j->p++;
    if (c < 0x20) { kl_free(j->ctx, buf, cap); return jerr(j, "control character in a string", j->p); }
    if (c != '\\') { buf[n++] = (char)c; continue; }
    c = *j->p++;
    switch (c) {
    case '"': case '\\': case '/': buf[n++] = (char)c; break;
    case 'b': buf[n++] = '\b'; break;
    case 'f': buf[n++] = '\f'; break;
    case 'n': buf[n++] = '\n'; break;
    case 'r': buf[n++] = '\r'; break;
    case 't': buf[n++] = '\t'; break;
    case 'u': {
      uint32_t cp, lo;
      if (!hex4(j, &cp) || j->p > q) goto bad_escape;
      if (cp >= 0xdc00 && cp <= 0xdfff) goto bad_escape;
      if (cp >= 0xd800 && cp <= 0xdbff) {
        if (q - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u') goto bad_escape;
        j->p += 2;
        if (!hex4(j, &lo) || lo < 0xdc00 || lo > 0xdfff) goto bad_escape;
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
      }
      if (cp == 0) {
        kl_free(j->ctx, buf, cap);
        return jerr(j, "NUL character (\\u0000) in a string", j->p);
      }
      /* the UTF-8 form (<= 4 bytes) is never longer than the escape (>= 6) */
      if (cp < 0x80) buf[n++] = (char)cp;
      else if (cp < 0x800) { buf[n++] = (char)(0xc0 | cp >> 6); buf[n++] = (char)(0x80 | (cp & 0x3f)); }
      else if (cp < 0x10000) {
        buf[n++] = (char)(0xe0 | cp >> 12); buf[n++] = (char)(0x80 | (cp >> 6 & 0x3f));
        buf[n++] = (char)(0x80 | (cp & 0x3f));
      } else {
        buf[n++] = (char)(0xf0 | cp >> 18); buf[n++] = (char)(0x80 | (cp >> 12 & 0x3f));
        buf[n++] = (char)(0x80 | (cp >> 6 & 0x3f)); buf[n++] = (char)(0x80 | (cp & 0x3f));
      }
      break;
    }
    default:
    bad_escape:
      kl_free(j->ctx, buf, cap);
      return jerr(j, "invalid escape in a string", j->p);
    }
  }
  j->p = q + 1;
  buf[n] = 0;
  *out = buf;
  *size = cap;
  if (len) *len = n;
  return KEEL_OK;
}

/* A non-negative JSON integer (no sign, fraction or exponent). */
static keel_status juint(jp *j, uint64_t *v) {
  const unsigned char *s;
  ws(j);
  s = j->p;
  *v = 0;
  if (j->p >= j->end || *j->p < '0' || *j->p > '9') return jerr(j, "expected a non-negative integer", s);
  if (*j->p == '0' && j->end - j->p > 1 && j->p[1] >= '0' && j->p[1] <= '9')
    return jerr(j, "integer with a leading zero", s);
  while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
    unsigned d = *j->p++ - '0';
    if (*v > (UINT64_MAX - d) / 10) return jerr(j, "integer too large", s);
    *v = *v * 10 + d;
  }
  if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E'))
    return jerr(j, "expected an integer, got a fraction", s);
  return KEEL_OK;
}

static keel_status parse_meta(jp *j, keel_safetensors *st) {
  keel_status s;
  if (!expect(j, '{')) return jerr(j, "__metadata__ must be an object of strings", j->p);
  if (expect(j, '}')) return KEEL_OK;
  do {
    st_meta m = {0};
    if (grow(j->ctx, (void **)&st->m, &st->mcap, st->nm, sizeof *st->m))
      return kl_error(j->ctx, KEEL_ERR_NOMEM, FN_LOAD ": out of memory");
    if ((s = jstring(j, &m.key, &m.key_size, NULL)) != KEEL_OK) return s;
    st->m[st->nm++] = m;
    if (!expect(j, ':')) return jerr(j, "expected ':'", j->p);
    ws(j);
    if (j->p < j->end && *j->p != '"') return jerr(j, "__metadata__ values must be strings", j->p);
    if ((s = jstring(j, &st->m[st->nm - 1].value, &st->m[st->nm - 1].value_size, NULL)) != KEEL_OK) return s;
  } while (expect(j, ','));
  if (!expect(j, '}')) return jerr(j, "expected ',' or '}' in __metadata__", j->p);
  return KEEL_OK;
}

static keel_status parse_entry(jp *j, st_entry *e) {
  keel_status s;
  int seen_dtype = 0, seen_shape = 0, seen_off = 0;
  if (!expect(j, '{')) return jerr(j, "a tensor entry must be an object", j->p);
  if (expect(j, '}')) return jerr(j, "empty tensor entry, expected dtype, shape and data_offsets", j->p);
  do {
    char *key;
    size_t ksize, klen;
    ws(j);
    if ((s = jstring(j, &key, &ksize, &klen)) != KEEL_OK) return s;
    if (!expect(j, ':')) { kl_free(j->ctx, key, ksize); return jerr(j, "expected ':'", j->p); }
    if (!strcmp(key, "dtype") && !seen_dtype) {
      char *dt;
      size_t dsize, dlen;
      kl_free(j->ctx, key, ksize);
      seen_dtype = 1;
      if ((s = jstring(j, &dt, &dsize, &dlen)) != KEEL_OK) return s;
      e->src = find_dtype(dt, dlen);
      if (e->src < 0) {
        kl_error(j->ctx, KEEL_ERR_TYPE,
                 FN_LOAD ": %s: tensor '%.80s' has unsupported dtype %.16s, expected F32, F64, I64, F16, BF16, "
                 "I32, I16, I8, U8 or BOOL", j->what, e->name, dt);
        kl_free(j->ctx, dt, dsize);
        return KEEL_ERR_TYPE;
      }
      kl_free(j->ctx, dt, dsize);
    } else if (!strcmp(key, "shape") && !seen_shape) {
      kl_free(j->ctx, key, ksize);
      seen_shape = 1;
      if (!expect(j, '[')) return jerr(j, "shape must be an array", j->p);
      if (!expect(j, ']')) {
        do {
          uint64_t d;
          if (e->ndim >= KEEL_MAX_DIMS)
            return kl_error(j->ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s' has more than %d dimensions",
                            j->what, e->name, KEEL_MAX_DIMS);
          if ((s = juint(j, &d)) != KEEL_OK) return s;
          if (d > (uint64_t)INT64_MAX) return jerr(j, "dimension too large", j->p);
          e->shape[e->ndim++] = (int64_t)d;
        } while (expect(j, ','));
        if (!expect(j, ']')) return jerr(j, "expected ',' or ']' in shape", j->p);
      }
    } else if (!strcmp(key, "data_offsets") && !seen_off) {
      kl_free(j->ctx, key, ksize);
      seen_off = 1;
      if (!expect(j, '[')) return jerr(j, "data_offsets must be an array of two integers", j->p);
      if ((s = juint(j, &e->begin)) != KEEL_OK) return s;
      if (!expect(j, ',')) return jerr(j, "data_offsets must be an array of two integers", j->p);
      if ((s = juint(j, &e->end)) != KEEL_OK) return s;
      if (!expect(j, ']')) return jerr(j, "data_offsets must be an array of two integers", j->p);
    } else {
      kl_error(j->ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s' has %s field '%.40s', expected dtype, shape and "
               "data_offsets", j->what, e->name, (!strcmp(key, "dtype") || !strcmp(key, "shape") ||
               !strcmp(key, "data_offsets")) ? "a repeated" : "an unknown", key);
      kl_free(j->ctx, key, ksize);
      return KEEL_ERR_IO;
    }
  } while (expect(j, ','));
  if (!expect(j, '}')) return jerr(j, "expected ',' or '}' in a tensor entry", j->p);
  if (!(seen_dtype && seen_shape && seen_off))
    return kl_error(j->ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s' lacks %s", j->what, e->name,
                    !seen_dtype ? "dtype" : !seen_shape ? "shape" : "data_offsets");
  return KEEL_OK;
}

static keel_status parse_header(jp *j, keel_safetensors *st) {
  keel_status s;
  int seen_meta = 0;
  if (!valid_utf8(j->p, (size_t)(j->end - j->p)))
    return kl_error(j->ctx, KEEL_ERR_IO, FN_LOAD ": %s: the header is not valid UTF-8", j->what);
  if (!expect(j, '{')) return jerr(j, "the header must be a JSON object", j->p);
  if (!expect(j, '}')) {
    do {
      char *name;
      size_t size;
      if ((s = jstring(j, &name, &size, NULL)) != KEEL_OK) return s;
      if (!expect(j, ':')) { kl_free(j->ctx, name, size); return jerr(j, "expected ':'", j->p); }
      if (!strcmp(name, "__metadata__")) {
        kl_free(j->ctx, name, size);
        if (seen_meta) return kl_error(j->ctx, KEEL_ERR_IO, FN_LOAD ": %s: __metadata__ appears twice", j->what);
        seen_meta = 1;
        if ((s = parse_meta(j, st)) != KEEL_OK) return s;
        continue;
      }
      if (grow(j->ctx, (void **)&st->e, &st->cap, st->n, sizeof *st->e)) {
        kl_free(j->ctx, name, size);
        return kl_error(j->ctx, KEEL_ERR_NOMEM, FN_LOAD ": out of memory");
      }
      memset(&st->e[st->n], 0, sizeof st->e[0]);
      st->e[st->n].name = name;
      st->e[st->n].name_size = size;
      st->n++;
      if ((s = parse_entry(j, &st->e[st->n - 1])) != KEEL_OK) return s;
    } while (expect(j, ','));
    if (!expect(j, '}')) return jerr(j, "expected ',' or '}'", j->p);
  }
  ws(j);
  if (j->p != j->end) return jerr(j, "trailing bytes after the JSON object", j->p);
  return KEEL_OK;
}

static int cmp_name(const void *a, const void *b) {
  return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}

static int cmp_meta(const void *a, const void *b) {
  return strcmp(((const st_meta *)a)->key, ((const st_meta *)b)->key);
}

static int cmp_offsets(const void *a, const void *b) {
  const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return 0;
}

/* Sizes, offsets, tiling and names: everything but the bytes. */
static keel_status validate(keel_ctx *ctx, const char *what, keel_safetensors *st, uint64_t data_len) {
  const st_entry **order;
  uint64_t pos = 0;
  for (int i = 0; i < st->n; i++) {
    st_entry *e = &st->e[i];
    uint64_t numel = 1, nbytes;
    for (int d = 0; d < e->ndim; d++) {
      uint64_t s = (uint64_t)e->shape[d];
      if (s != 0 && numel > UINT64_MAX / s) {
        return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s': the shape overflows", what, e->name);
      }
      numel *= s;
    }
    if (numel == 0)
      for (int d = 0; d < e->ndim; d++)
        if ((uint64_t)e->shape[d] > ST_MAX_EMPTY_DIM)
          return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s': dimension %d is too large (%lld)",
                          what, e->name, d + 1, (long long)e->shape[d]);
    if (numel > UINT64_MAX / (uint64_t)DTYPES[e->src].size)
      return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s': the shape overflows", what, e->name);
    nbytes = numel * (uint64_t)DTYPES[e->src].size;
    if (e->end < e->begin)
      return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s': data_offsets [%llu, %llu] end before they "
                      "begin", what, e->name, (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->end - e->begin != nbytes)
      return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s': data_offsets [%llu, %llu] span %llu bytes, "
                      "expected %llu for its shape and dtype %s", what, e->name, (unsigned long long)e->begin,
                      (unsigned long long)e->end, (unsigned long long)(e->end - e->begin),
                      (unsigned long long)nbytes, DTYPES[e->src].name);
    if (e->end > data_len)
      return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s': data_offsets [%llu, %llu] run past the end "
                      "of the data (%llu bytes)", what, e->name, (unsigned long long)e->begin,
                      (unsigned long long)e->end, (unsigned long long)data_len);
  }
  if (st->n > 1) qsort(st->e, (size_t)st->n, sizeof *st->e, cmp_name);
  for (int i = 1; i < st->n; i++)
    if (!strcmp(st->e[i - 1].name, st->e[i].name))
      return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor name '%.80s' appears twice", what, st->e[i].name);
  if (st->nm > 1) qsort(st->m, (size_t)st->nm, sizeof *st->m, cmp_meta);
  for (int i = 1; i < st->nm; i++)
    if (!strcmp(st->m[i - 1].key, st->m[i].key))
      return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: __metadata__ key '%.80s' appears twice", what, st->m[i].key);
  if (st->n == 0) {
    if (data_len != 0)
      return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: %llu bytes of data after a header with no tensors", what,
                      (unsigned long long)data_len);
    return KEEL_OK;
  }
  order = (const st_entry **)kl_malloc(ctx, (size_t)st->n * sizeof *order);
  if (!order) return kl_error(ctx, KEEL_ERR_NOMEM, FN_LOAD ": out of memory");
  for (int i = 0; i < st->n; i++) order[i] = &st->e[i];
  qsort(order, (size_t)st->n, sizeof *order, cmp_offsets);
  for (int i = 0; i < st->n; i++) {
    const st_entry *e = order[i];
    if (e->begin != pos) {
      keel_status r = kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: tensor '%.80s' %s at byte %llu of the data, "
                               "expected %llu (tensors must tile the data without holes or overlaps)", what, e->name,
                               e->begin < pos ? "overlaps the previous one" : "leaves a hole: it starts",
                               (unsigned long long)e->begin, (unsigned long long)pos);
      kl_free(ctx, order, (size_t)st->n * sizeof *order);
      return r;
    }
    pos = e->end;
  }
  kl_free(ctx, order, (size_t)st->n * sizeof *order);
  if (pos != data_len)
    return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: %llu bytes of data after the last tensor", what,
                    (unsigned long long)(data_len - pos));
  return KEEL_OK;
}

/* }====================================================================== */

/* {======================================================================
** Loading
** ======================================================================= */

typedef struct st_src {
  FILE *f;
  const unsigned char *buf;
  uint64_t size;
} st_src;

static int src_read(st_src *s, uint64_t off, void *dst, size_t n) {
  if (n == 0) return 0;
  if (off > s->size || n > s->size - off) return -1;
  if (s->buf) { memcpy(dst, s->buf + off, n); return 0; }
  if (fseeko(s->f, (off_t)off, SEEK_SET) != 0) return -1;
  return fread(dst, 1, n, s->f) == n ? 0 : -1;
}

static keel_status load_src(keel_ctx *ctx, const char *what, st_src *src, keel_safetensors **out) {
  unsigned char lenb[8];
  uint64_t hlen = 0, data_len;
  unsigned char *hdr = NULL;
  keel_safetensors *st;
  keel_status s = KEEL_OK;
  jp j;
  *out = NULL;
  if (!little_endian())
    return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": big-endian hosts are not supported");
  if (src->size < 8 || src_read(src, 0, lenb, 8))
    return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: file too short (%llu bytes), expected at least the 8-byte "
                    "header length", what, (unsigned long long)src->size);
  for (int i = 7; i >= 0; i--) hlen = hlen << 8 | lenb[i];
  if (hlen > ST_MAX_HEADER)
    return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: header length %llu exceeds the limit of %llu bytes", what,
                    (unsigned long long)hlen, (unsigned long long)ST_MAX_HEADER);
  if (hlen > src->size - 8)
    return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: header length %llu runs past the end of the file (%llu bytes "
                    "after the length field)", what, (unsigned long long)hlen, (unsigned long long)(src->size - 8));
  if (hlen < 2)
    return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: header length %llu, expected a JSON object", what,
                    (unsigned long long)hlen);
  data_len = src->size - 8 - hlen;
  hdr = (unsigned char *)kl_malloc(ctx, (size_t)hlen);
  st = (keel_safetensors *)kl_malloc(ctx, sizeof *st);
  if (!hdr || !st) {
    kl_free(ctx, hdr, (size_t)hlen);
    kl_free(ctx, st, sizeof *st);
    return kl_error(ctx, KEEL_ERR_NOMEM, FN_LOAD ": out of memory for a %llu-byte header", (unsigned long long)hlen);
  }
  memset(st, 0, sizeof *st);
  st->ctx = ctx;
  if (src_read(src, 8, hdr, (size_t)hlen)) {
    s = kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: cannot read the header: %s", what, strerror(errno));
    goto done;
  }
  j.ctx = ctx;
  j.what = what;
  j.start = j.p = hdr;
  j.end = hdr + hlen;
  if ((s = parse_header(&j, st)) != KEEL_OK) goto done;
  if ((s = validate(ctx, what, st, data_len)) != KEEL_OK) goto done;
  for (int i = 0; i < st->n; i++) {
    st_entry *e = &st->e[i];
    const st_dtype *dt = &DTYPES[e->src];
    size_t nbytes = (size_t)(e->end - e->begin);
    if ((s = kl_new(ctx, dt->to, KEEL_CPU, e->ndim, e->shape, &e->t)) != KEEL_OK) goto done;
    if (!strcmp(dt->name, SAVE_NAMES[dt->to])) {
      if (src_read(src, 8 + hlen + e->begin, keel_tensor_data(e->t), nbytes)) {
        s = kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: cannot read tensor '%.80s'", what, e->name);
        goto done;
      }
    } else if (nbytes > 0) {
      unsigned char *tmp = (unsigned char *)kl_malloc(ctx, nbytes);
      if (!tmp) { s = kl_error(ctx, KEEL_ERR_NOMEM, FN_LOAD ": out of memory"); goto done; }
      if (src_read(src, 8 + hlen + e->begin, tmp, nbytes)) {
        kl_free(ctx, tmp, nbytes);
        s = kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s: cannot read tensor '%.80s'", what, e->name);
        goto done;
      }
      convert(e->src, tmp, keel_tensor_data(e->t), keel_tensor_numel(e->t));
      kl_free(ctx, tmp, nbytes);
    }
  }
done:
  kl_free(ctx, hdr, (size_t)hlen);
  if (s != KEEL_OK) {
    kl_err_saved keep;
    kl_err_save(ctx, &keep);
    keel_safetensors_free(st);
    kl_err_restore(ctx, &keep);
    return s;
  }
  *out = st;
  return KEEL_OK;
}

keel_status keel_safetensors_load(keel_ctx *ctx, const char *path, keel_safetensors **out) {
  st_src src = {0};
  struct stat sb;
  keel_status s;
  *out = NULL;
  if (!path) return kl_error(ctx, KEEL_ERR_ARG, FN_LOAD ": path is NULL, expected a file name");
  src.f = fopen(path, "rb");
  if (!src.f) return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": cannot open %s: %s", path, strerror(errno));
  if (fstat(fileno(src.f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
    fclose(src.f);
    return kl_error(ctx, KEEL_ERR_IO, FN_LOAD ": %s is not a regular file", path);
  }
  src.size = (uint64_t)sb.st_size;
  s = load_src(ctx, path, &src, out);
  fclose(src.f);
  return s;
}

keel_status keel_safetensors_load_buffer(keel_ctx *ctx, const void *buf, size_t size, keel_safetensors **out) {
  st_src src = {0};
  *out = NULL;
  if (!buf && size) return kl_error(ctx, KEEL_ERR_ARG, FN_LOAD ": buffer is NULL, expected bytes");
  src.buf = (const unsigned char *)buf;
  src.size = size;
  return load_src(ctx, "(buffer)", &src, out);
}

/* }====================================================================== */

/* {======================================================================
** Saving
** ======================================================================= */

#define FN_SAVE "safetensors_save"

typedef struct sbuf {
  keel_ctx *ctx;
  char *p;
  size_t n, cap;
  int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->cap - b->n < n + 1) {
    size_t ncap = b->cap ? b->cap : 256;
    char *np;
    while (ncap - b->n < n + 1) ncap *= 2;
    np = (char *)kl_malloc(b->ctx, ncap);
    if (!np) { b->oom = 1; return; }
    if (b->p) memcpy(np, b->p, b->n);
    kl_free(b->ctx, b->p, b->cap);
    b->p = np;
    b->cap = ncap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* A JSON string, escaped as serde_json does. */
static void sb_json(sbuf *b, const char *s) {
  sb_put(b, "\"", 1);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    char esc[8];
    switch (c) {
    case '"': sb_put(b, "\\\"", 2); break;
    case '\\': sb_put(b, "\\\\", 2); break;
    case '\b': sb_put(b, "\\b", 2); break;
    case '\f': sb_put(b, "\\f", 2); break;
    case '\n': sb_put(b, "\\n", 2); break;
    case '\r': sb_put(b, "\\r", 2); break;
    case '\t': sb_put(b, "\\t", 2); break;
    default:
      if (c < 0x20) {
        snprintf(esc, sizeof esc, "\\u%04x", c);
        sb_put(b, esc, 6);
      } else {
        sb_put(b, (const char *)&c, 1);
      }
    }
  }
  sb_put(b, "\"", 1);
}

typedef struct save_order {
  const char *const *names;
  keel_tensor *const *tensors;
} save_order;

static int cmp_save(const void *a, const void *b, void *ud) {
  const save_order *o = (const save_order *)ud;
  int i = *(const int *)a, k = *(const int *)b;
  int ri = SAVE_RANK[keel_tensor_dtype(o->tensors[i])], rk = SAVE_RANK[keel_tensor_dtype(o->tensors[k])];
  if (ri != rk) return rk - ri;
  return strcmp(o->names[i], o->names[k]);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Checks the arguments; fills order (tensors in file order) and mord
** (metadata in key order). */
static keel_status check_save(keel_ctx *ctx, int n, const char *const *names, keel_tensor *const *tensors,
                              int n_meta, const char *const *keys, const char *const *values, int *order,
                              int *mord) {
  keel_status st;
  for (int i = 0; i < n; i++) {
    if (!names[i] || !tensors[i])
      return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": entry %d has no %s", i + 1, names[i] ? "tensor" : "name");
    if (!valid_utf8((const unsigned char *)names[i], strlen(names[i])))
      return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": tensor name %d is not valid UTF-8", i + 1);
    if (!strcmp(names[i], "__metadata__"))
      return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": '__metadata__' is reserved, expected another tensor name");
    if ((st = kl_check_same_ctx(ctx, FN_SAVE, tensors[i]))) return st;
    if ((int)keel_tensor_dtype(tensors[i]) < 0 || keel_tensor_dtype(tensors[i]) >= KEEL_DTYPE_COUNT)
      return kl_error(ctx, KEEL_ERR_TYPE, FN_SAVE ": tensor '%.80s' has an unknown dtype", names[i]);
    order[i] = i;
  }
  {
    save_order o;
    o.names = names;
    o.tensors = tensors;
    if (n > 1) qsort_r(order, (size_t)n, sizeof *order, cmp_save, &o);
  }
  {
    const char **tmp = (const char **)kl_malloc(ctx, (size_t)(n > 0 ? n : 1) * sizeof *tmp);
    if (!tmp) return kl_error(ctx, KEEL_ERR_NOMEM, FN_SAVE ": out of memory");
    for (int i = 0; i < n; i++) tmp[i] = names[i];
    if (n > 1) qsort(tmp, (size_t)n, sizeof *tmp, cmp_str);
    for (int i = 1; i < n; i++)
      if (!strcmp(tmp[i - 1], tmp[i])) {
        keel_status s = kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": tensor name '%.80s' appears twice", tmp[i]);
        kl_free(ctx, (void *)tmp, (size_t)(n > 0 ? n : 1) * sizeof *tmp);
        return s;
      }
    kl_free(ctx, (void *)tmp, (size_t)(n > 0 ? n : 1) * sizeof *tmp);
  }
  for (int i = 0; i < n_meta; i++) {
    if (!keys[i] || !values[i])
      return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": metadata entry %d has no %s", i + 1, keys[i] ? "value" : "key");
    if (!valid_utf8((const unsigned char *)keys[i], strlen(keys[i])) ||
        !valid_utf8((const unsigned char *)values[i], strlen(values[i])))
      return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": metadata entry '%.80s' is not valid UTF-8", keys[i]);
    mord[i] = i;
  }
  for (int i = 1; i < n_meta; i++) {  /* insertion sort: metadata is small */
    int v = mord[i], k = i - 1;
    while (k >= 0 && strcmp(keys[mord[k]], keys[v]) > 0) { mord[k + 1] = mord[k]; k--; }
    mord[k + 1] = v;
  }
  for (int i = 1; i < n_meta; i++)
    if (!strcmp(keys[mord[i - 1]], keys[mord[i]]))
      return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": metadata key '%.80s' appears twice", keys[mord[i]]);
  return KEEL_OK;
}

static keel_status build_header(keel_ctx *ctx, sbuf *b, int n, const char *const *names,
                                keel_tensor *const *tensors, const int *order, int n_meta,
                                const char *const *keys, const char *const *values, const int *mord) {
  uint64_t pos = 0;
  int first = 1;
  char num[64];
  sb_str(b, "{");
  if (n_meta > 0) {
    sb_str(b, "\"__metadata__\":{");
    for (int i = 0; i < n_meta; i++) {
      if (i) sb_str(b, ",");
      sb_json(b, keys[mord[i]]);
      sb_str(b, ":");
      sb_json(b, values[mord[i]]);
    }
    sb_str(b, "}");
    first = 0;
  }
  for (int i = 0; i < n; i++) {
    keel_tensor *t = tensors[order[i]];
    int nd = keel_tensor_ndim(t);
    const int64_t *shape = keel_tensor_shape(t);
    uint64_t nbytes = (uint64_t)keel_tensor_numel(t) * keel_dtype_size(keel_tensor_dtype(t));
    if (!first) sb_str(b, ",");
    first = 0;
    sb_json(b, names[order[i]]);
    sb_str(b, ":{\"dtype\":\"");
    sb_str(b, SAVE_NAMES[keel_tensor_dtype(t)]);
    sb_str(b, "\",\"shape\":[");
    for (int d = 0; d < nd; d++) {
      snprintf(num, sizeof num, "%s%lld", d ? "," : "", (long long)shape[d]);
      sb_str(b, num);
    }
    snprintf(num, sizeof num, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)pos,
             (unsigned long long)(pos + nbytes));
    sb_str(b, num);
    pos += nbytes;
  }
  sb_str(b, "}");
  while (!b->oom && b->n % 8) sb_str(b, " ");
  if (b->oom) return kl_error(ctx, KEEL_ERR_NOMEM, FN_SAVE ": out of memory for the header");
  if ((uint64_t)b->n > ST_MAX_HEADER)
    return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": the header would take %llu bytes, more than the %llu readers "
                    "accept", (unsigned long long)b->n, (unsigned long long)ST_MAX_HEADER);
  return KEEL_OK;
}

static keel_status write_all(keel_ctx *ctx, FILE *f, const char *tmp, const void *p, size_t n) {
  if (n && fwrite(p, 1, n, f) != n)
    return kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": cannot write %s: %s", tmp, strerror(errno));
  return KEEL_OK;
}

static keel_status write_file(keel_ctx *ctx, FILE *f, const char *tmp, const sbuf *b, int n,
                              keel_tensor *const *tensors, const int *order) {
  unsigned char lenb[8];
  uint64_t hlen = b->n;
  keel_status s;
  for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)(hlen >> (8 * i));
  if ((s = write_all(ctx, f, tmp, lenb, 8)) != KEEL_OK) return s;
  if ((s = write_all(ctx, f, tmp, b->p, b->n)) != KEEL_OK) return s;
  for (int i = 0; i < n; i++) {
    keel_tensor *t = tensors[order[i]], *c = NULL;
    size_t nbytes = (size_t)keel_tensor_numel(t) * keel_dtype_size(keel_tensor_dtype(t));
    if (nbytes == 0) continue;
    /* a device tensor comes over one at a time: the host holds at most
    ** one tensor's copy while the file is written */
    if (t->storage->device != KEEL_CPU) {
      if ((s = kl_transfer(ctx, t, KEEL_CPU, t->dtype, &c)) != KEEL_OK) return s;
      t = c;
    } else if (!keel_tensor_is_contiguous(t)) {
      if ((s = keel_contiguous(ctx, t, &c)) != KEEL_OK) return s;
      t = c;
    }
    s = write_all(ctx, f, tmp, keel_tensor_data(t), nbytes);
    if (c) keel_tensor_release(c);
    if (s != KEEL_OK) return s;
  }
  if (fflush(f) != 0)
    return kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": cannot write %s: %s", tmp, strerror(errno));
  if (fsync(fileno(f)) != 0)
    return kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": cannot sync %s: %s", tmp, strerror(errno));
  return KEEL_OK;
}

/* Syncs the directory holding path so that the rename is durable. Some
** file systems cannot sync a directory: that is not an error. */
static void sync_dir(keel_ctx *ctx, const char *path) {
  const char *slash = strrchr(path, '/');
  size_t n = slash ? (size_t)(slash - path) : 0;
  char *dir = (char *)kl_malloc(ctx, n + 2);
  int fd;
  if (!dir) return;
  if (!slash) strcpy(dir, ".");
  else if (n == 0) strcpy(dir, "/");
  else { memcpy(dir, path, n); dir[n] = 0; }
  fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)fsync(fd);
    close(fd);
  }
  kl_free(ctx, dir, n + 2);
}

keel_status keel_safetensors_save(keel_ctx *ctx, const char *path, int n, const char *const *names,
                                  keel_tensor *const *tensors, int n_meta, const char *const *meta_keys,
                                  const char *const *meta_values) {
  sbuf b = {0};
  int *order = NULL, *mord = NULL, fd;
  size_t osize = (size_t)(n > 0 ? n : 1) * sizeof(int), msize = (size_t)(n_meta > 0 ? n_meta : 1) * sizeof(int);
  size_t tsize = 0;
  char *tmp = NULL;
  FILE *f = NULL;
  keel_status s;
  if (!little_endian()) return kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": big-endian hosts are not supported");
  if (!path || !*path) return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": expected a file name");
  if (n < 0 || n_meta < 0 || (n > 0 && (!names || !tensors)) || (n_meta > 0 && (!meta_keys || !meta_values)))
    return kl_error(ctx, KEEL_ERR_ARG, FN_SAVE ": bad counts or arrays, expected n >= 0 entries");
  b.ctx = ctx;
  order = (int *)kl_malloc(ctx, osize);
  mord = (int *)kl_malloc(ctx, msize);
  tsize = strlen(path) + 32;
  tmp = (char *)kl_malloc(ctx, tsize);
  if (!order || !mord || !tmp) { s = kl_error(ctx, KEEL_ERR_NOMEM, FN_SAVE ": out of memory"); goto done; }
  if ((s = check_save(ctx, n, names, tensors, n_meta, meta_keys, meta_values, order, mord)) != KEEL_OK) goto done;
  if ((s = build_header(ctx, &b, n, names, tensors, order, n_meta, meta_keys, meta_values, mord)) != KEEL_OK)
    goto done;
  snprintf(tmp, tsize, "%s.tmp.%ld", path, (long)getpid());
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0666);
  if (fd < 0) {
    s = kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": cannot create %s: %s", tmp, strerror(errno));
    goto done;
  }
  f = fdopen(fd, "wb");
  if (!f) {
    s = kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": cannot open %s: %s", tmp, strerror(errno));
    close(fd);
    unlink(tmp);
    goto done;
  }
  s = write_file(ctx, f, tmp, &b, n, tensors, order);
  if (fclose(f) != 0 && s == KEEL_OK)
    s = kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": cannot write %s: %s", tmp, strerror(errno));
  if (s == KEEL_OK && rename(tmp, path) != 0)
    s = kl_error(ctx, KEEL_ERR_IO, FN_SAVE ": cannot rename %s to %s: %s", tmp, path, strerror(errno));
  if (s != KEEL_OK) unlink(tmp);
  else sync_dir(ctx, path);
done:
  kl_free(ctx, b.p, b.cap);
  kl_free(ctx, order, osize);
  kl_free(ctx, mord, msize);
  kl_free(ctx, tmp, tsize);
  return s;
}

/* }====================================================================== */
