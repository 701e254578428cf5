/*
** lkeel_summary.c: keel.core._summary, the C pieces of keel.monitor,
** keel.tensorboard, keel.progress and keel.plot.
**
**   crc32c(s [, crc])        CRC-32C of s (continuing from crc), an integer
**   crc32c_mask(crc)         TFRecord's masked form of a CRC
**   masked_crc32c(s)         crc32c_mask(crc32c(s))
**   histogram(t [, opts])    histogram in C (opts: bins = 30, edges = {...}
**                            or range = {lo, hi}) -> {count, nan, inf, below,
**                            above, min, max, sum, sumsq, lo, hi,
**                            counts = {...}, edges = {...}}; with
**                            packed = true, instead of counts and edges:
**                            limits_packed, counts_packed (little-endian
**                            doubles, TensorBoard's bucket_limit and bucket:
**                            upper edges, runs of empty buckets merged, values
**                            below/above the range in the end buckets)
**   png_encode(w, h, pixels [, comp])   PNG bytes; pixels: a string of
**                            w*h*comp bytes (comp 1..4, default from the
**                            length) or a table of w*h 0xRRGGBB integers
**   isatty(fd)               fd is a terminal
**   term_width([fd = 1])     columns of the terminal on fd, or nil
**   now()                    monotonic clock, seconds
**   wall_time()              seconds since the epoch (with fractions)
**   hostname(), pid()
**   mkdirs(path)             creates path and its missing parents (mkdir -p);
**                            returns true, or nil and a message
*/
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "lkeel.h"

static int l_crc32c(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_Integer init = luaL_optinteger(L, 2, 0);
  if (init < 0 || init > 0xffffffff)
    return luaL_error(L, "crc32c: argument #2: expected a CRC in 0..0xffffffff, got %I", init);
  lua_pushinteger(L, (lua_Integer)keel_crc32c((uint32_t)init, s, n));
  return 1;
}

static int l_crc32c_mask(lua_State *L) {
  lua_Integer c = luaL_checkinteger(L, 1);
  if (c < 0 || c > 0xffffffff)
    return luaL_error(L, "crc32c_mask: argument #1: expected a CRC in 0..0xffffffff, got %I", c);
  lua_pushinteger(L, (lua_Integer)keel_crc32c_mask((uint32_t)c));
  return 1;
}

static int l_masked_crc32c(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_pushinteger(L, (lua_Integer)keel_crc32c_mask(keel_crc32c(0, s, n)));
  return 1;
}


/* Upper edge of bucket i (0-based) of nbins. */
static double upper_edge(const keel_histogram *h, int nbins, const double *edges, int i) {
  if (edges) return edges[i + 1];
  if (i == nbins - 1) return h->hi;
  return h->lo + (h->hi - h->lo) * ((double)(i + 1) / (double)nbins);
}

static void put_double(luaL_Buffer *b, double v) {
  unsigned char bytes[8];
  uint64_t u;
  int k;
  memcpy(&u, &v, 8);
  for (k = 0; k < 8; k++) bytes[k] = (unsigned char)(u >> (8 * k));   /* little-endian on any host */
  luaL_addlstring(b, (const char *)bytes, 8);
}

/* Sets limits_packed and counts_packed in the table on top (see the
** header comment); the histogram table stays on top. */
static void push_packed(lua_State *L, const keel_histogram *h, int nbins, const double *edges, const double *counts) {
  luaL_Buffer bl, bc;
  int i = 0, n = 0;
  double first_extra = (double)h->below, last_extra = (double)h->above;
  if (h->count == 0 || !(h->lo < h->hi)) {
    /* nothing finite, or every value equal: one bucket up to max */
    luaL_buffinit(L, &bl);
    put_double(&bl, h->count ? h->max : 0.0);
    luaL_pushresult(&bl);
    lua_setfield(L, -2, "limits_packed");
    luaL_buffinit(L, &bc);
    put_double(&bc, (double)h->count);
    luaL_pushresult(&bc);
    lua_setfield(L, -2, "counts_packed");
    return;
  }
  /* two passes over the buckets: limits, then counts (one buffer at a time
  ** on the stack) */
  luaL_buffinit(L, &bl);
  for (i = 0; i < nbins; i++) {
    if (counts[i] == 0)
      while (i + 1 < nbins && counts[i + 1] == 0) i++;
    put_double(&bl, upper_edge(h, nbins, edges, i));
    n++;
  }
  luaL_pushresult(&bl);
  lua_setfield(L, -2, "limits_packed");
  luaL_buffinit(L, &bc);
  for (i = 0; i < nbins; i++) {
    double c = counts[i];
    if (c == 0)
      while (i + 1 < nbins && counts[i + 1] == 0) i++;
    n--;
    c += first_extra;   /* values below the range: the first bucket */
    first_extra = 0;
    if (n == 0) c += last_extra;   /* above: the last */
    put_double(&bc, c);
  }
  luaL_pushresult(&bc);
  lua_setfield(L, -2, "counts_packed");
}

/* histogram(t [, {bins = n, edges = {...}, range = {lo, hi}, packed = false}]) */
static int l_histogram(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t = lk_check_tensor(L, 1, "histogram");
  lua_Integer bins = 30;
  double lo = 0, hi = 0, *edges = NULL, *counts;
  keel_histogram h;
  int i, have_bins = 0, packed = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_argexpected(L, lua_istable(L, 2), 2, "an options table");
    lua_getfield(L, 2, "packed");
    packed = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "bins") != LUA_TNIL) {
      if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 || lua_tointeger(L, -1) > (1 << 24))
        return luaL_error(L, "histogram: option 'bins': expected an integer in 1..16777216, got %s",
                          luaL_tolstring(L, -1, NULL));
      bins = lua_tointeger(L, -1);
      have_bins = 1;
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "edges") != LUA_TNIL) {
      lua_Integer ne;
      if (!lua_istable(L, -1)) return luaL_error(L, "histogram: option 'edges': expected a list of numbers");
      ne = luaL_len(L, -1);
      if (ne < 2 || ne > (1 << 24) + 1)
        return luaL_error(L, "histogram: option 'edges': expected 2 or more edges, got %I", ne);
      if (have_bins && bins != ne - 1)
        return luaL_error(L, "histogram: %I edges make %I buckets, but bins = %I", ne, ne - 1, bins);
      bins = ne - 1;
      edges = (double *)lua_newuserdatauv(L, sizeof(double) * (size_t)ne, 0);
      for (i = 0; i < (int)ne; i++) {
        int isnum;
        lua_geti(L, -2, i + 1);
        edges[i] = lua_tonumberx(L, -1, &isnum);
        if (!isnum) return luaL_error(L, "histogram: option 'edges': entry %d is not a number", i + 1);
        lua_pop(L, 1);
      }
      lua_insert(L, -2);   /* keep the scratch below, drop the list */
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "range") != LUA_TNIL) {
      int ok1, ok2;
      if (edges) return luaL_error(L, "histogram: give 'edges' or 'range', not both");
      if (!lua_istable(L, -1)) return luaL_error(L, "histogram: option 'range': expected {lo, hi}");
      lua_geti(L, -1, 1);
      lua_geti(L, -2, 2);
      lo = lua_tonumberx(L, -2, &ok1);
      hi = lua_tonumberx(L, -1, &ok2);
      if (!ok1 || !ok2 || !(lo < hi))
        return luaL_error(L, "histogram: option 'range': expected {lo, hi} with lo < hi");
      lua_pop(L, 2);
    }
    lua_pop(L, 1);
  }
  counts = (double *)lua_newuserdatauv(L, sizeof(double) * (size_t)bins, 0);
  lk_check_as(L, S, keel_histogram_compute(S->ctx, t, (int)bins, edges, lo, hi, counts, &h), "histogram");
  lua_createtable(L, 0, 13);
  lk_setint(L, "count", h.count);
  lk_setint(L, "nan", h.nan);
  lk_setint(L, "inf", h.inf);
  lk_setint(L, "below", h.below);
  lk_setint(L, "above", h.above);
  lk_setnum(L, "min", h.min);
  lk_setnum(L, "max", h.max);
  lk_setnum(L, "sum", h.sum);
  lk_setnum(L, "sumsq", h.sumsq);
  lk_setnum(L, "lo", h.lo);
  lk_setnum(L, "hi", h.hi);
  if (packed) {
    push_packed(L, &h, (int)bins, edges, counts);
    return 1;
  }
  lua_createtable(L, (int)bins, 0);
  for (i = 0; i < (int)bins; i++) {
    lua_pushinteger(L, (lua_Integer)counts[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "counts");
  lua_createtable(L, (int)bins + 1, 0);
  for (i = 0; i <= (int)bins; i++) {
    /* uniform edges from the range; the last is hi exactly */
    double e = edges ? edges[i] : (i == bins ? h.hi : h.lo + (h.hi - h.lo) * ((double)i / (double)bins));
    lua_pushnumber(L, e);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "edges");
  return 1;
}

/* {======================================================================
** PNG
** ======================================================================= */

typedef struct png_buf {
  unsigned char *p;
  size_t n, cap;
} png_buf;

/* Collects the encoder's bytes in malloc'd memory: a Lua allocation here
** could raise an error through the encoder's frames and leak its buffers. */
static int png_collect(void *ud, const void *data, size_t n) {
  png_buf *b = (png_buf *)ud;
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    unsigned char *q;
    while (cap < b->n + n) cap *= 2;
    q = (unsigned char *)realloc(b->p, cap);
    if (!q) return 1;
    b->p = q;
    b->cap = cap;
  }
  memcpy(b->p + b->n, data, n);
  b->n += n;
  return 0;
}

static int png_buf_gc(lua_State *L) {
  png_buf *b = (png_buf *)lua_touserdata(L, 1);
  free(b->p);
  b->p = NULL;
  return 0;
}

/* png_encode(w, h, pixels [, comp]) -> string */
static int l_png_encode(lua_State *L) {
  lk_state *S = lk_S(L);
  lua_Integer w = luaL_checkinteger(L, 1), h = luaL_checkinteger(L, 2), comp;
  const unsigned char *px;
  png_buf *b;
  keel_status st;
  if (w < 1 || h < 1 || w > 16384 || h > 16384)
    return luaL_error(L, "png_encode: size %Ix%I, expected 1..16384 on each side", w, h);
  if (lua_type(L, 3) == LUA_TSTRING) {
    size_t n;
    px = (const unsigned char *)lua_tolstring(L, 3, &n);
    comp = luaL_optinteger(L, 4, (lua_Integer)(n / (size_t)(w * h)));
    if (comp < 1 || comp > 4 || n != (size_t)(w * h * comp))
      return luaL_error(L, "png_encode: %d bytes of pixels for %Ix%I, expected w*h*channels (channels 1..4)",
                        (int)n, w, h);
  } else if (lua_type(L, 3) == LUA_TTABLE) {
    unsigned char *q;
    lua_Integer k, n = w * h;
    comp = 3;
    q = (unsigned char *)lua_newuserdatauv(L, (size_t)(n * 3), 0);
    for (k = 0; k < n; k++) {
      lua_Integer v;
      if (lua_rawgeti(L, 3, k + 1) != LUA_TNUMBER || !lua_isinteger(L, -1))
        return luaL_error(L, "png_encode: pixel %I is not an integer 0xRRGGBB", k + 1);
      v = lua_tointeger(L, -1);
      lua_pop(L, 1);
      q[3 * k] = (unsigned char)((v >> 16) & 0xff);
      q[3 * k + 1] = (unsigned char)((v >> 8) & 0xff);
      q[3 * k + 2] = (unsigned char)(v & 0xff);
    }
    px = q;
  } else {
    return luaL_error(L, "png_encode: argument #3: expected a string of pixel bytes or a table of 0xRRGGBB, got %s",
                      luaL_typename(L, 3));
  }
  b = (png_buf *)lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, png_buf_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  st = keel_png_encode(S->ctx, (int)w, (int)h, (int)comp, px, png_collect, b);
  lk_check(L, S, st);
  lua_pushlstring(L, (const char *)b->p, b->n);
  free(b->p);
  b->p = NULL;
  return 1;
}

/* }====================================================================== */

/* {======================================================================
** Terminal, clocks, identity
** ======================================================================= */

static int l_isatty(lua_State *L) {
  lua_Integer fd = luaL_optinteger(L, 1, 1);
  lua_pushboolean(L, fd >= 0 && fd <= 0x7fffffff && isatty((int)fd));
  return 1;
}

static int l_term_width(lua_State *L) {
  lua_Integer fd = luaL_optinteger(L, 1, 1);
  struct winsize ws;
  if (fd >= 0 && fd <= 0x7fffffff && ioctl((int)fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
    lua_pushinteger(L, ws.ws_col);
  else
    lua_pushnil(L);
  return 1;
}

static int l_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec * 1e-9);
  return 1;
}

static int l_wall_time(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + ts.tv_nsec * 1e-9);
  return 1;
}

static int l_hostname(lua_State *L) {
  char buf[256];
  if (gethostname(buf, sizeof buf - 1) != 0) strcpy(buf, "localhost");
  buf[sizeof buf - 1] = '\0';
  lua_pushstring(L, buf);
  return 1;
}

static int l_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

/* mkdir -p: each prefix that ends at a '/' , then the whole path. */
static int l_mkdirs(lua_State *L) {
  size_t n, i;
  const char *path = luaL_checklstring(L, 1, &n);
  char *buf;
  struct stat st;
  if (n == 0) return luaL_error(L, "mkdirs: argument #1: expected a directory name, got an empty string");
  buf = (char *)lua_newuserdatauv(L, n + 1, 0);
  memcpy(buf, path, n + 1);
  for (i = 1; i <= n; i++) {
    if (i < n && buf[i] != '/') continue;
    buf[i] = '\0';
    if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
      lua_pushnil(L);
      lua_pushfstring(L, "%s: %s", buf, strerror(errno));
      return 2;
    }
    if (i < n) buf[i] = '/';
  }
  if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: not a directory", path);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* }====================================================================== */

static const luaL_Reg summary_fns[] = {
  {"crc32c", l_crc32c}, {"crc32c_mask", l_crc32c_mask}, {"masked_crc32c", l_masked_crc32c},
  {"histogram", l_histogram}, {"png_encode", l_png_encode},
  {"isatty", l_isatty}, {"term_width", l_term_width}, {"now", l_now}, {"wall_time", l_wall_time},
  {"hostname", l_hostname}, {"pid", l_pid}, {"mkdirs", l_mkdirs},
  {NULL, NULL}
};

void lk_open_summary(lua_State *L, int state, int mt) {
  lk_register(L, state, mt, summary_fns);
}
