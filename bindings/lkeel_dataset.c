/*
** lkeel_dataset.c: the dataset readers of keel.core._data, which
** bindings/keel/data.lua wraps (keel.data.mnist, cifar10, csv, chars,
** image_folder), plus a sorted directory listing for the image folder.
*/
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "lkeel.h"

#define LK_MAX_FILES (1 << 24)

/* read_idx(path) -> tensor */
static int l_read_idx(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t;
  lk_check(L, S, keel_read_idx(S->ctx, luaL_checkstring(L, 1), &t));
  lk_push(L, S, t);
  return 1;
}

/* The strings of the array at i, in a userdata kept on the stack. */
static const char **check_paths(lua_State *L, int i, const char *fn, int *n) {
  lua_Integer k, len;
  const char **v;
  luaL_checktype(L, i, LUA_TTABLE);
  len = luaL_len(L, i);
  if (len < 1 || len > LK_MAX_FILES) luaL_error(L, "%s: expected 1 to 2^24 file names, got %d", fn, (int)len);
  v = (const char **)lua_newuserdatauv(L, sizeof *v * (size_t)len, 0);
  for (k = 1; k <= len; k++) {
    if (lua_geti(L, i, k) != LUA_TSTRING) luaL_error(L, "%s: file name %d is not a string", fn, (int)k);
    v[k - 1] = lua_tostring(L, -1);
    lua_pop(L, 1);   /* still referenced by the table */
  }
  *n = (int)len;
  return v;
}

/* read_cifar10({paths}) -> images, labels */
static int l_read_cifar10(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *x, *y;
  int n;
  const char **paths = check_paths(L, 1, "read_cifar10", &n);
  lk_check(L, S, keel_read_cifar10(S->ctx, paths, n, &x, &y));
  lk_push(L, S, x);
  lk_push(L, S, y);
  return 2;
}

/* read_csv(path, delimiter, header) -> float64 [rows, cols] */
static int l_read_csv(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t;
  size_t dl;
  const char *path = luaL_checkstring(L, 1);
  const char *d = luaL_optlstring(L, 2, ",", &dl);
  if (dl != 1) luaL_error(L, "read_csv: delimiter '%s', expected one character", d);
  lk_check(L, S, keel_read_csv(S->ctx, path, (unsigned char)d[0], lua_toboolean(L, 3), &t));
  lk_push(L, S, t);
  return 1;
}

/* read_images({paths}, channels, h, w) -> [N, C, H, W] (h = w = 0: native) */
static int l_read_images(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t;
  int n;
  const char **paths = check_paths(L, 1, "read_images", &n);
  int c = (int)luaL_checkinteger(L, 2), h = (int)luaL_optinteger(L, 3, 0), w = (int)luaL_optinteger(L, 4, 0);
  lk_check(L, S, keel_read_images(S->ctx, paths, n, c, h, w, &t));
  lk_push(L, S, t);
  return 1;
}

/* encode_bytes(s, ids) -> int64 [#s]; ids maps one-character strings to ids */
static int l_encode_bytes(lua_State *L) {
  lk_state *S = lk_S(L);
  keel_tensor *t;
  size_t n;
  int64_t map[256];
  int b;
  const char *s = luaL_checklstring(L, 1, &n);
  luaL_checktype(L, 2, LUA_TTABLE);
  for (b = 0; b < 256; b++) {
    char ch = (char)b;
    lua_pushlstring(L, &ch, 1);
    map[b] = lua_gettable(L, 2) == LUA_TNUMBER ? (int64_t)lua_tointeger(L, -1) : -1;
    lua_pop(L, 1);
  }
  if (keel_encode_bytes(S->ctx, s, n, map, &t) != KEEL_OK) {
    /* name the character, in the user's terms */
    size_t i;
    for (i = 0; i < n && map[(unsigned char)s[i]] >= 0; i++) {}
    if (i < n) {
      unsigned char c = (unsigned char)s[i];
      if (c >= 32 && c < 127)
        return luaL_error(L, "encode: character '%c' at position %d is not in the vocabulary", c, (int)i + 1);
      return luaL_error(L, "encode: byte %d at position %d is not in the vocabulary", c, (int)i + 1);
    }
    lk_check(L, S, KEEL_ERR_NOMEM);
  }
  lk_push(L, S, t);
  return 1;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* list_dir(path) -> sorted array of {name = , dir = bool}, no dot files */
static int l_list_dir(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  DIR *d = opendir(path);
  struct dirent *e;
  char **names = NULL;
  size_t n = 0, cap = 0, i;
  if (!d) return luaL_error(L, "list_dir: cannot open directory %s", path);
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    if (n == cap) {
      char **nn;
      cap = cap ? 2 * cap : 64;
      nn = (char **)realloc(names, cap * sizeof *names);
      if (!nn) goto nomem;
      names = nn;
    }
    if ((names[n] = strdup(e->d_name)) == NULL) goto nomem;
    n++;
  }
  closedir(d);
  if (n) qsort(names, n, sizeof *names, cmp_str);
  lua_createtable(L, (int)n, 0);
  for (i = 0; i < n; i++) {
    struct stat st;
    lua_createtable(L, 0, 2);
    lua_pushstring(L, names[i]);
    lua_setfield(L, -2, "name");
    lua_pushfstring(L, "%s/%s", path, names[i]);
    lua_pushboolean(L, stat(lua_tostring(L, -1), &st) == 0 && S_ISDIR(st.st_mode));
    lua_setfield(L, -3, "dir");
    lua_pop(L, 1);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
    free(names[i]);
  }
  free(names);
  return 1;
nomem:
  closedir(d);
  for (i = 0; i < n; i++) free(names[i]);
  free(names);
  return luaL_error(L, "list_dir: out of memory listing %s", path);
}

static const luaL_Reg dataset_fns[] = {
  {"read_idx", l_read_idx},
  {"read_cifar10", l_read_cifar10},
  {"read_csv", l_read_csv},
  {"read_images", l_read_images},
  {"encode_bytes", l_encode_bytes},
  {"list_dir", l_list_dir},
  {NULL, NULL}
};

void lk_open_dataset(lua_State *L, int state, int mt) {
  lk_register(L, state, mt, dataset_fns);
}
