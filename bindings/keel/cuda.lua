-- keel.cuda: the GPU, when there is one. The CUDA backend is a plugin
-- (libkeel_cuda.so) that the engine opens on first use; without it, or
-- without a driver or a device, is_available() says false and why, and
-- every CUDA request fails with that reason. Tensors move with
-- t:to("cuda"), t:cuda(), t:cpu(); models with model:to("cuda").
--
--   keel.cuda.is_available()      true, or false and the reason
--   keel.cuda.why_unavailable()   the reason, or nil
--   keel.cuda.device_count()      devices CUDA sees (0 when unavailable)
--   keel.cuda.get_device_name(i)  name of device i (CUDA ordinal, default 0)
--   keel.cuda.memory_stats()      the caching allocator's counters, and the host<->device
--                                 copies (zeros until used)
--   keel.cuda.empty_cache()       gives cached blocks back to the device
--   keel.cuda.synchronize()       waits for queued GPU work
--   keel.cuda.mem_get_info()      free, total bytes of the device
--   keel.cuda.load(path)          opens that plugin now (default: the usual search)
--   keel.cuda.plugin()            path and description of the open plugin, or nil
--   keel.cuda.is_built()          whether a plugin file is where keel looks first (not
--                                 opened), and its path

local core = require "keel.core"
local C = core._cuda

local cuda = {}
for k, v in pairs(C) do cuda[k] = v end

return cuda
