/* lkeel_autograd.c: placeholder replaced by the autograd area (issue 4). */
#include "lkeel.h"

void lk_open_autograd(lua_State *L, int state, int mt) { (void)L; (void)state; (void)mt; }
