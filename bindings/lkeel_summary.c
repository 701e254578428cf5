/* lkeel_summary.c: placeholder replaced by the summary area (issue 4). */
#include "lkeel.h"

void lk_open_summary(lua_State *L, int state, int mt) { (void)L; (void)state; (void)mt; }
