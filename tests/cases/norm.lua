-- Gradcheck cases of the norm area (loaded by tests/autograd_spec.lua): one
-- entry per op name, each a list of {label, fn, inputs-builder [, opts]}.
local env = ...
local T, i64, keel = env.T, env.i64, env.keel
local F = require("keel.core")._nn

local function f64(d) return keel.tensor(d, { dtype = "float64" }) end

-- Fixed running statistics (buffers: no requires_grad).
local function stats(c, seed)
  return T({ c }, -0.5, 0.5, seed, { requires_grad = false }), T({ c }, 0.5, 2, seed + 1, { requires_grad = false })
end

return {
  batch_norm = {
    { "training [N,C] with affine", function(x, w, b) return F.batch_norm(x, nil, nil, w, b, true) end,
      function() return { T({ 5, 3 }, -2, 2, 301), T({ 3 }, 0.5, 1.5, 302), T({ 3 }, -0.5, 0.5, 303) } end },
    { "training [N,C,L] without affine, running stats updated", function(x)
        local rm, rv = stats(2, 304)
        return F.batch_norm(x, rm, rv, nil, nil, true, 0.1, 1e-5)
      end, function() return { T({ 3, 2, 4 }, -1, 3, 306) } end },
    { "training [N,C,H,W] with affine", function(x, w, b) return F.batch_norm(x, nil, nil, w, b, true, 0.1, 1e-3) end,
      function() return { T({ 2, 3, 2, 3 }, -2, 2, 307), T({ 3 }, 0.5, 1.5, 308), T({ 3 }, -0.5, 0.5, 309) } end },
    { "training [N,C,H,W] without affine", function(x) return F.batch_norm(x, nil, nil, nil, nil, true) end,
      function() return { T({ 3, 2, 2, 2 }, -2, 2, 310) } end },
    { "eval [N,C,H,W] with affine", function(x, w, b)
        local rm, rv = stats(3, 311)
        return F.batch_norm(x, rm, rv, w, b, false)
      end, function() return { T({ 2, 3, 2, 2 }, -2, 2, 313), T({ 3 }, 0.5, 1.5, 314), T({ 3 }, -0.5, 0.5, 315) } end },
    { "eval [N,C] without affine", function(x)
        local rm, rv = stats(4, 316)
        return F.batch_norm(x, rm, rv, nil, nil, false)
      end, function() return { T({ 3, 4 }, -2, 2, 318) } end },
    { "weight only, transposed input", function(x, w)
        return F.batch_norm(x:transpose(1, 2), nil, nil, w, nil, true)
      end, function() return { T({ 3, 4 }, -2, 2, 319), T({ 3 }, 0.5, 1.5, 320) } end },
  },
  layer_norm = {
    { "over 1 dim with affine", function(x, w, b) return F.layer_norm(x, 5, w, b) end,
      function() return { T({ 3, 5 }, -2, 2, 321), T({ 5 }, 0.5, 1.5, 322), T({ 5 }, -0.5, 0.5, 323) } end },
    { "over 2 dims with affine", function(x, w, b) return F.layer_norm(x, { 3, 4 }, w, b, 1e-5) end,
      function() return { T({ 2, 3, 4 }, -2, 2, 324), T({ 3, 4 }, 0.5, 1.5, 325), T({ 3, 4 }, -0.5, 0.5, 326) } end },
    { "over 1 dim without affine", function(x) return F.layer_norm(x, { 6 }) end,
      function() return { T({ 2, 2, 6 }, -2, 2, 327) } end },
    { "over all dims, bias only", function(x, b) return F.layer_norm(x, { 2, 3 }, nil, b) end,
      function() return { T({ 2, 3 }, -2, 2, 328), T({ 2, 3 }, -0.5, 0.5, 329) } end },
  },
  group_norm = {
    { "3 groups of 2 channels with affine", function(x, w, b) return F.group_norm(x, 3, w, b) end,
      function() return { T({ 2, 6, 4 }, -2, 2, 331), T({ 6 }, 0.5, 1.5, 332), T({ 6 }, -0.5, 0.5, 333) } end },
    { "2 groups [N,C,H,W] without affine", function(x) return F.group_norm(x, 2, nil, nil, 1e-5) end,
      function() return { T({ 2, 4, 2, 2 }, -2, 2, 334) } end },
    { "1 group (layer norm over C,L) with affine", function(x, w, b) return F.group_norm(x, 1, w, b) end,
      function() return { T({ 2, 3, 3 }, -2, 2, 335), T({ 3 }, 0.5, 1.5, 336), T({ 3 }, -0.5, 0.5, 337) } end },
    { "2 groups on [N,C] (no spatial dims) with affine", function(x, w, b) return F.group_norm(x, 2, w, b) end,
      function() return { T({ 3, 6 }, -2, 2, 340), T({ 6 }, 0.5, 1.5, 345), T({ 6 }, -0.5, 0.5, 346) } end },
    { "groups = channels (instance norm)", function(x, w) return F.group_norm(x, 4, w) end,
      function() return { T({ 2, 4, 3 }, -2, 2, 338), T({ 4 }, 0.5, 1.5, 339) } end },
  },
  dropout = {
    -- the seed fixes the mask, so every evaluation draws the same one
    { "p = 0.3, fixed seed", function(x)
        keel.manual_seed(1234)
        return F.dropout(x, 0.3, true)
      end, function() return { T({ 4, 5 }, -2, 2, 341) } end },
    { "p = 0.5 on a transposed input", function(x)
        keel.manual_seed(99)
        return F.dropout(x:t(), 0.5) * 2
      end, function() return { T({ 3, 4 }, -2, 2, 342) } end },
    { "p = 1 gives zeros", function(x) return F.dropout(x, 1, true) + x end,
      function() return { T({ 3 }, -2, 2, 343) } end },
    { "eval is the identity", function(x) return F.dropout(x, 0.5, false) * 3 end,
      function() return { T({ 2, 3 }, -2, 2, 344) } end },
  },
  embedding = {
    { "repeated indices", function(w) return F.embedding(i64({ { 1, 3, 3 }, { 2, 1, 3 } }), w) end,
      function() return { T({ 4, 3 }, -1, 1, 351) } end },
    -- rows at padding_idx get no gradient: the mask makes the numeric
    -- derivative through them zero too
    { "padding_idx (masked out)", function(w)
        local idx = i64({ 2, 4, 2, 1, 4 })
        local mask = f64({ { 1 }, { 1 }, { 1 }, { 1 }, { 1 } }) - idx:eq(2):double():view(5, 1)
        return F.embedding(idx, w, 2) * mask
      end, function() return { T({ 4, 2 }, -1, 1, 352) } end },
    { "float indices from a list, padding_idx from the end", function(w) return F.embedding({ 3, 2, 3, 3 }, w, -3) end,
      function() return { T({ 3, 2 }, -1, 1, 353) } end },
  },
}
