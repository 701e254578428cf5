-- onehot(sym, L, B, C) -> float32 [L, B, C]: sym is a flat list of L * B
-- 0-based symbols in time-major order (index t * B + b + 1); the rows of
-- an identity matrix are gathered in C (keel's index_select), not built
-- element by element in Lua.
local keel = keel or require "keel"

local eyes = {}

return function(sym, L, B, C)
  local eye = eyes[C]
  if not eye then eye = keel.eye(C); eyes[C] = eye end
  local idx = {}
  for i = 1, L * B do idx[i] = sym[i] + 1 end
  return eye:index_select(1, keel.tensor(idx, {dtype = "int64"})):view(L, B, C)
end
