/*
** repl.c: the `keel` executable, a script runner and REPL with the keel
** module built in and Lua 5.4 linked statically.
**
**   keel script.lua a b     run a script: arg[0] = script, arg[1..] = a b,
**                           arg[-1] = this program; `...` = a b
**   keel -e 'stmt'          run a statement (may repeat)
**   keel -l name            name = require "name" (may repeat)
**   keel -i script          run the script, then the REPL
**   keel -                  read the script from stdin
**   keel                    REPL: `keel> `, `  >> ` for an incomplete chunk
**   keel plot RUN_DIR -o f.png   draw a run's metrics.jsonl (keel.plot's main;
**                           a script named "plot" runs as `keel ./plot`)
**
** Before anything runs, the standard libraries are open, "keel.core" is
** in package.preload, <root>/bindings is on package.path (root from
** KEEL_HOME, else from /proc/self/exe = <root>/build/<cfg>/bin/keel) and
** the global `keel` holds require "keel".
**
** Errors never leave through exit(): everything runs inside one protected
** call (pmain), whose result main turns into the exit status.
*/

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <editline/readline.h>

#include "lauxlib.h"
#include "lua.h"
#include "lualib.h"

#include "keel.h"   /* KEEL_VERSION only */

int luaopen_keel_core(lua_State *L);

#define PROGNAME      "keel"
#define PROMPT        "keel> "
#define PROMPT2       "  >> "
#define HISTORY_FILE  ".keel_history"
#define HISTORY_MAX   1000
#define EOFMARK       "<eof>"

static const char *progname = PROGNAME;


/* {==================================================================
** Messages and protected calls (the lua.c pattern)
** =================================================================== */

static void print_usage(FILE *f) {
  fprintf(f,
    "usage: %s [options] [script [args]]\n"
    "Options:\n"
    "  -e stat   execute string 'stat'\n"
    "  -l name   require library 'name' into global 'name'\n"
    "  -i        enter the REPL after running the script\n"
    "  -v        show version information\n"
    "  -h        show this help\n"
    "  --        stop handling options\n"
    "  -         run the script from stdin and stop handling options\n"
    "Without a script or -e, %s starts the REPL.\n"
    "Subcommands:\n"
    "  %s plot RUN_DIR [-o out.png]   draw loss and gradient norms of a run\n",
    progname, progname, progname);
  fflush(f);
}

static void print_version(void) {
  printf("keel %s (%s)\n", KEEL_VERSION, LUA_RELEASE);
  fflush(stdout);
}

static void report_message(const char *msg) {
  fprintf(stderr, "%s: %s\n", progname, msg);
  fflush(stderr);
}

/* Prints the error on top of the stack (if any) and pops it. */
static int report(lua_State *L, int status) {
  if (status != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    if (msg == NULL) msg = "(error object is not a string)";
    report_message(msg);
    lua_pop(L, 1);
  }
  return status;
}

/* Message handler: adds a traceback to the error message. */
static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      return 1;   /* the error object's own text */
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/*
** Ctrl-C while a chunk runs: a C signal cannot change a Lua state, so the
** handler only installs a hook; the hook raises the error at the next Lua
** instruction, call or return. A second Ctrl-C gets the default action.
*/
static lua_State *running_L = NULL;

static void set_sigint(void (*handler)(int)) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
}

static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

static void on_sigint(int sig) {
  int mask = LUA_MASKCALL | LUA_MASKRET | LUA_MASKLINE | LUA_MASKCOUNT;
  (void)sig;
  set_sigint(SIG_DFL);
  if (running_L != NULL) lua_sethook(running_L, interrupt_hook, mask, 1);
}

/* Calls the function below its narg arguments, with traceback and Ctrl-C. */
static int docall(lua_State *L, int narg, int nres) {
  int status;
  int base = lua_gettop(L) - narg;
  lua_pushcfunction(L, msghandler);
  lua_insert(L, base);
  running_L = L;
  set_sigint(on_sigint);
  status = lua_pcall(L, narg, nres, base);
  set_sigint(SIG_DFL);
  running_L = NULL;
  lua_sethook(L, NULL, 0, 0);   /* a Ctrl-C that came too late to fire */
  lua_remove(L, base);
  return status;
}

/* }================================================================== */


/* {==================================================================
** Setup: arg table, keel module, package.path
** =================================================================== */

/*
** arg[0] = script, arg[1..] = its arguments, the program and options at
** negative indices (arg[-1] is the program for `keel script.lua`).
** Without a script, arg[0] is the program.
*/
static void create_arg_table(lua_State *L, char **argv, int argc, int script) {
  int i;
  if (script == argc) script = 0;
  lua_createtable(L, argc - script - 1, script + 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}

/* Pushes the repository root: $KEEL_HOME, else /proc/self/exe minus
** /build/<cfg>/bin/keel. Pushes nil when neither works. */
static void push_root(lua_State *L) {
  char buf[4096];
  const char *home = getenv("KEEL_HOME");
  ssize_t n;
  int i;
  if (home != NULL && home[0] != '\0') {
    lua_pushstring(L, home);
    return;
  }
  n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) { lua_pushnil(L); return; }
  buf[n] = '\0';
  for (i = 0; i < 4; i++) {   /* drop keel, bin, <cfg>, build */
    char *slash = strrchr(buf, '/');
    if (slash == NULL) { lua_pushnil(L); return; }
    *slash = '\0';
  }
  lua_pushstring(L, buf[0] ? buf : "/");
}

static int setup_keel(lua_State *L) {
  /* package.preload["keel.core"] = luaopen_keel_core */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_keel_core);
  lua_setfield(L, -2, "keel.core");
  lua_pop(L, 1);
  /* package.path = <root>/bindings/?.lua;<root>/bindings/?/init.lua;... */
  push_root(L);
  if (!lua_isnil(L, -1)) {
    const char *root = lua_tostring(L, -1);
    lua_getfield(L, -2, "path");
    lua_pushfstring(L, "%s/bindings/?.lua;%s/bindings/?/init.lua;%s",
                    root, root, luaL_optstring(L, -1, ""));
    lua_setfield(L, -4, "path");
    lua_pop(L, 1);
  }
  lua_pop(L, 2);   /* root, package */
  /* keel = require "keel" */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "keel");
  if (report(L, docall(L, 1, 1)) != LUA_OK) {
    report_message("cannot load the keel module (is KEEL_HOME right?)");
    return 0;
  }
  lua_setglobal(L, "keel");
  return 1;
}

/* }================================================================== */


/* {==================================================================
** Running chunks
** =================================================================== */

static int dochunk(lua_State *L, int status) {
  if (status == LUA_OK) status = docall(L, 0, 0);
  return report(L, status);
}

static int dostring(lua_State *L, const char *s, const char *name) {
  return dochunk(L, luaL_loadbuffer(L, s, strlen(s), name));
}

/* name = require "name" */
static int dolibrary(lua_State *L, const char *name) {
  int status;
  lua_getglobal(L, "require");
  lua_pushstring(L, name);
  status = docall(L, 1, 1);
  if (status == LUA_OK) lua_setglobal(L, name);
  return report(L, status);
}

/* Runs the script argv[script] (NULL name for "-": stdin) with the
** remaining arguments as `...`. */
static int doscript(lua_State *L, char **argv, int argc, int script) {
  const char *fname = argv[script];
  int status, i, n;
  if (strcmp(fname, "-") == 0 && strcmp(argv[script - 1], "--") != 0)
    fname = NULL;   /* stdin */
  status = luaL_loadfile(L, fname);
  if (status == LUA_OK) {
    n = argc - script - 1;
    luaL_checkstack(L, n + 3, "too many arguments to script");
    for (i = script + 1; i < argc; i++) lua_pushstring(L, argv[i]);
    status = docall(L, n, 0);
  }
  return report(L, status);
}

/* }================================================================== */


/* {==================================================================
** REPL
** =================================================================== */

typedef struct Repl {
  int interactive;        /* stdin is a terminal: libedit, prompts */
  char history[4096];     /* history file path, "" for none */
  char *line;             /* getline buffer (non-interactive) */
  size_t cap;
} Repl;

/* Ctrl-C at the prompt: libedit's readline returns NULL, and this flag
** tells that apart from end of input. */
static volatile sig_atomic_t prompt_interrupted = 0;

static void on_sigint_prompt(int sig) {
  (void)sig;
  prompt_interrupted = 1;
}

/* Reads one line without its newline and pushes it: returns 1, or 0 at
** end of input, or -1 when Ctrl-C cancelled the line (nothing pushed). */
static int read_line(lua_State *L, Repl *r, int first) {
  if (r->interactive) {
    char *s;
    size_t len;
    prompt_interrupted = 0;
    set_sigint(on_sigint_prompt);   /* no SA_RESTART: read() returns */
    s = readline(first ? PROMPT : PROMPT2);
    set_sigint(SIG_DFL);
    if (s == NULL) {
      if (!prompt_interrupted) return 0;
      fputc('\n', stdout);
      fflush(stdout);
      return -1;
    }
    len = strlen(s);
    if (len > 0 && s[len - 1] == '\n') s[--len] = '\0';
    if (len > 0) add_history(s);
    lua_pushlstring(L, s, len);
    free(s);
    return 1;
  } else {
    ssize_t len = getline(&r->line, &r->cap, stdin);
    if (len < 0) return 0;
    if (len > 0 && r->line[len - 1] == '\n') r->line[--len] = '\0';
    if (len > 0 && r->line[len - 1] == '\r') r->line[--len] = '\0';
    lua_pushlstring(L, r->line, (size_t)len);
    return 1;
  }
}

static int incomplete(lua_State *L, int status) {
  if (status == LUA_ERRSYNTAX) {
    size_t lmsg;
    const char *msg = lua_tolstring(L, -1, &lmsg);
    size_t lmark = sizeof(EOFMARK) - 1;
    if (msg != NULL && lmsg >= lmark && strcmp(msg + lmsg - lmark, EOFMARK) == 0) {
      lua_pop(L, 1);
      return 1;
    }
  }
  return 0;
}

/* Line on top: tries to compile `return <line>`; on success replaces the
** line with the function, else leaves the line and returns non-OK. */
static int try_return(lua_State *L) {
  const char *line = lua_tostring(L, -1);
  const char *code = lua_pushfstring(L, "return %s;", line);
  int status = luaL_loadbuffer(L, code, strlen(code), "=stdin");
  lua_remove(L, -2);   /* code */
  if (status == LUA_OK) lua_remove(L, -2);   /* line */
  else lua_pop(L, 1);  /* error */
  return status;
}

#define CHUNK_EOF        (-1)   /* input ended inside a chunk */
#define CHUNK_CANCELLED  (-2)   /* Ctrl-C at the continuation prompt */

/* Line on top: compiles it as a statement, reading continuation lines
** while the chunk is incomplete. Leaves the function (or an error
** message) on top and returns the status, or pops the source and
** returns CHUNK_EOF / CHUNK_CANCELLED. */
static int load_statement(lua_State *L, Repl *r) {
  for (;;) {
    size_t len;
    const char *chunk = lua_tolstring(L, -1, &len);
    int status = luaL_loadbuffer(L, chunk, len, "=stdin");
    int got;
    if (!incomplete(L, status)) {
      lua_remove(L, -2);   /* the source */
      return status;
    }
    got = read_line(L, r, 0);
    if (got <= 0) {
      lua_pop(L, 1);
      return got == 0 ? CHUNK_EOF : CHUNK_CANCELLED;
    }
    lua_pushliteral(L, "\n");
    lua_insert(L, -2);
    lua_concat(L, 3);
  }
}

/* Prints every value on the stack with tostring, tab-separated. */
static int print_results(lua_State *L) {
  int n = lua_gettop(L), i;
  for (i = 1; i <= n; i++) {
    size_t len;
    const char *s = luaL_tolstring(L, i, &len);
    if (i > 1) fputc('\t', stdout);
    fwrite(s, 1, len, stdout);
    lua_pop(L, 1);
  }
  fputc('\n', stdout);
  fflush(stdout);
  return 0;
}

static void repl_history_init(Repl *r) {
  const char *home = getenv("HOME");
  r->history[0] = '\0';
  if (home == NULL || home[0] == '\0') return;
  if (snprintf(r->history, sizeof r->history, "%s/%s", home, HISTORY_FILE)
      >= (int)sizeof r->history) {
    r->history[0] = '\0';
    return;
  }
  using_history();
  stifle_history(HISTORY_MAX);
  read_history(r->history);   /* a missing file is fine */
}

static void repl_history_save(Repl *r) {
  if (r->history[0] != '\0') write_history(r->history);
}

static void doREPL(lua_State *L) {
  Repl r;
  memset(&r, 0, sizeof r);
  r.interactive = isatty(STDIN_FILENO);
  if (r.interactive) {
    print_version();
    printf("Ctrl-D exits, Ctrl-C interrupts a running chunk. `keel` is loaded.\n");
    fflush(stdout);
    repl_history_init(&r);
  }
  lua_settop(L, 0);
  for (;;) {
    int status, got = read_line(L, &r, 1);
    if (got == 0) break;
    if (got < 0) continue;   /* Ctrl-C: a fresh prompt */
    status = try_return(L);
    if (status != LUA_OK) {
      status = load_statement(L, &r);
      if (status == CHUNK_CANCELLED) continue;
      if (status == CHUNK_EOF) {
        report_message("unexpected end of input");
        break;
      }
    }
    if (status == LUA_OK) status = docall(L, 0, LUA_MULTRET);
    if (status == LUA_OK && lua_gettop(L) > 0) {
      lua_pushcfunction(L, print_results);
      lua_insert(L, 1);
      status = docall(L, lua_gettop(L) - 1, 0);
    }
    report(L, status);
    lua_settop(L, 0);
  }
  lua_settop(L, 0);
  if (r.interactive) {
    fputc('\n', stdout);
    fflush(stdout);
    repl_history_save(&r);
  }
  free(r.line);
}

/* }================================================================== */


/* {==================================================================
** main
** =================================================================== */

enum { HAS_ERROR = 1, HAS_I = 2, HAS_V = 4, HAS_E = 8, HAS_H = 16 };

/*
** Scans the options. Sets *first to the index of the script (argc when
** there is none) and returns the HAS_* flags.
*/
static int collect_args(char **argv, int argc, int *first) {
  int flags = 0, i;
  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    *first = i;
    if (a[0] != '-') return flags;   /* the script */
    switch (a[1]) {
      case '-':
        if (a[2] != '\0') return flags | HAS_ERROR;
        *first = i + 1;
        return flags;
      case '\0': return flags;        /* "-": script from stdin */
      case 'i': case 'v': case 'h':
        if (a[2] != '\0') return flags | HAS_ERROR;
        flags |= (a[1] == 'i') ? HAS_I : (a[1] == 'v') ? HAS_V : HAS_H;
        break;
      case 'e':
        flags |= HAS_E;
        /* fall through */
      case 'l':
        if (a[2] == '\0') {   /* argument in the next word */
          i++;
          if (i >= argc || argv[i] == NULL || argv[i][0] == '-')
            { *first = i - 1; return flags | HAS_ERROR; }
        }
        break;
      default:
        return flags | HAS_ERROR;
    }
  }
  *first = argc;
  return flags;
}

/* Runs -e and -l in the order given. Returns 1 when all succeeded. */
static int run_args(lua_State *L, char **argv, int n) {
  int i;
  for (i = 1; i < n; i++) {
    char opt = argv[i][1];
    if (argv[i][0] != '-' || (opt != 'e' && opt != 'l')) continue;
    {
      const char *extra = argv[i] + 2;
      if (*extra == '\0') extra = argv[++i];
      if ((opt == 'e' ? dostring(L, extra, "=(command line)")
                      : dolibrary(L, extra)) != LUA_OK)
        return 0;
    }
  }
  return 1;
}

/* `keel plot ARGS...`: require("keel.plot").main({ARGS...}). */
static int run_plot(lua_State *L, char **argv, int argc) {
  int i;
  luaL_openlibs(L);
  create_arg_table(L, argv, argc, 1);
  if (!setup_keel(L)) return 0;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "keel.plot");
  if (report(L, docall(L, 1, 1)) != LUA_OK) return 0;
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc - 2, 0);
  for (i = 2; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - 1);
  }
  if (report(L, docall(L, 1, 0)) != LUA_OK) return 0;
  lua_pushboolean(L, 1);
  return 1;
}

static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = (char **)lua_touserdata(L, 2);
  int script = argc;
  int flags;
  if (argc >= 2 && strcmp(argv[1], "plot") == 0) return run_plot(L, argv, argc);
  flags = collect_args(argv, argc, &script);
  luaL_checkversion(L);
  if (flags & HAS_ERROR) {
    if (script < argc) fprintf(stderr, "%s: bad option '%s'\n", progname, argv[script]);
    print_usage(stderr);
    return 0;
  }
  if (flags & HAS_H) {
    print_usage(stdout);
    lua_pushboolean(L, 1);
    return 1;
  }
  if (flags & HAS_V) print_version();
  luaL_openlibs(L);
  create_arg_table(L, argv, argc, script);
  if (!setup_keel(L)) return 0;
  if (!run_args(L, argv, script)) return 0;
  if (script < argc && doscript(L, argv, argc, script) != LUA_OK) return 0;
  if (flags & HAS_I)
    doREPL(L);
  else if (script == argc && !(flags & (HAS_E | HAS_V)))
    doREPL(L);
  lua_pushboolean(L, 1);
  return 1;
}

int main(int argc, char **argv) {
  int status, ok;
  lua_State *L;
  if (argv[0] != NULL && argv[0][0] != '\0') {
    const char *base = strrchr(argv[0], '/');
    progname = base ? base + 1 : argv[0];
  }
  L = luaL_newstate();
  if (L == NULL) {
    report_message("cannot create Lua state: not enough memory");
    return EXIT_FAILURE;
  }
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  status = lua_pcall(L, 2, 1, 0);
  ok = lua_toboolean(L, -1);
  report(L, status);
  lua_close(L);
  return (status == LUA_OK && ok) ? EXIT_SUCCESS : EXIT_FAILURE;
}

/* }================================================================== */
