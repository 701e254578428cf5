-- keel.nn.conv: Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, modules
-- over the engine's conv2d and pool ops (keel.nn.functional.conv2d,
-- max_pool2d, avg_pool2d, adaptive_avg_pool2d), whose forward and backward
-- kernels are in C. Sizes are an integer or a pair {h, w}.
local keel = require "keel"

return function(nn)
  local F = nn.functional
  local init = nn.init

  -- Raises a construction error at the caller of the module class.
  local function fail(msg) error(msg, 4) end

  -- Options table (or nil) with only the known keys.
  local function check_opts(who, opts, known)
    if opts == nil then return {} end
    if type(opts) ~= "table" then fail(("%s: options: expected a table, got %s"):format(who, type(opts))) end
    for k in pairs(opts) do
      if not known[k] then
        local names = {}
        for n in pairs(known) do names[#names + 1] = n end
        table.sort(names)
        fail(("%s: unknown option %s (expected one of: %s)"):format(who, tostring(k), table.concat(names, ", ")))
      end
    end
    return opts
  end

  -- v as {h, w}: an integer or a pair of integers, each >= min.
  local function pair(who, name, v, min)
    local p
    if math.type(v) == "integer" then
      p = {v, v}
    elseif type(v) == "table" and #v == 2 and math.type(v[1]) == "integer" and math.type(v[2]) == "integer" then
      p = {v[1], v[2]}
    else
      fail(("%s: %s: expected an integer or a pair {h, w} of integers, got %s"):format(who, name, tostring(v)))
    end
    if p[1] < min or p[2] < min then
      fail(("%s: %s must be %s, got {%d, %d}"):format(who, name, min > 0 and "positive" or "non-negative", p[1], p[2]))
    end
    return p
  end

  local function count(who, name, v, min)
    if math.type(v) ~= "integer" or v < min then
      fail(("%s: %s: expected an integer >= %d, got %s"):format(who, name, min, tostring(v)))
    end
    return v
  end

  -- A pair as {h, w}, or a number as given (repr of pool sizes, as PyTorch
  -- prints what it was given).
  local function show(v)
    if type(v) == "table" then return ("{%s, %s}"):format(tostring(v[1]), tostring(v[2])) end
    return tostring(v)
  end

  ---------------------------------------------------------------------------
  -- Conv2d
  ---------------------------------------------------------------------------

  -- nn.Conv2d(in_channels, out_channels, kernel_size [, opts]): opts stride
  -- (1), padding (0, a pair, "same" or "valid"), dilation (1), groups (1),
  -- bias (true), padding_mode ("zeros", the only one), dtype. weight is
  -- [out, in/groups, kh, kw], bias [out].
  local Conv2d = nn.Module:extend("Conv2d")
  nn.Conv2d = Conv2d

  local CONV_OPTS = {stride = true, padding = true, dilation = true, groups = true, bias = true,
                     padding_mode = true, dtype = true}

  function Conv2d:init(in_channels, out_channels, kernel_size, opts)
    local who = "Conv2d"
    opts = check_opts(who, opts, CONV_OPTS)
    self.in_channels = count(who, "in_channels", in_channels, 1)
    self.out_channels = count(who, "out_channels", out_channels, 1)
    self.kernel_size = pair(who, "kernel_size", kernel_size, 1)
    self.stride = pair(who, "stride", opts.stride or 1, 1)
    self.dilation = pair(who, "dilation", opts.dilation or 1, 1)
    self.groups = count(who, "groups", opts.groups or 1, 1)
    self.padding_mode = opts.padding_mode or "zeros"
    if self.padding_mode ~= "zeros" then
      fail(("%s: padding_mode %s is not supported, expected \"zeros\""):format(who, tostring(self.padding_mode)))
    end
    local padding = opts.padding or 0
    if padding == "valid" then
      padding = {0, 0}
    elseif padding == "same" then
      if self.stride[1] ~= 1 or self.stride[2] ~= 1 then
        fail(who .. ": padding \"same\" needs stride 1, got " .. show(self.stride))
      end
    else
      padding = pair(who, "padding", padding, 0)
    end
    self.padding = padding
    if in_channels % self.groups ~= 0 then
      fail(("%s: in_channels (%d) must be divisible by groups (%d)"):format(who, in_channels, self.groups))
    end
    if out_channels % self.groups ~= 0 then
      fail(("%s: out_channels (%d) must be divisible by groups (%d)"):format(who, out_channels, self.groups))
    end
    local o = {dtype = opts.dtype}
    local k = self.kernel_size
    self.weight = nn.Parameter(keel.empty({out_channels, in_channels // self.groups, k[1], k[2]}, o))
    if opts.bias ~= false then self.bias = nn.Parameter(keel.empty({out_channels}, o)) end
    self:reset_parameters()
  end

  -- PyTorch's default: kaiming_uniform_ with a = sqrt(5), i.e.
  -- U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in/groups * kh * kw,
  -- and the same bound for the bias.
  function Conv2d:reset_parameters()
    init.kaiming_uniform_(self.weight, {a = math.sqrt(5)})
    if self.bias then
      local fan_in = init._calculate_fan_in_and_fan_out(self.weight)
      local bound = fan_in > 0 and 1 / math.sqrt(fan_in) or 0
      init.uniform_(self.bias, -bound, bound)
    end
  end

  function Conv2d:forward(x)
    return F.conv2d(x, self.weight, self.bias,
                    {stride = self.stride, padding = self.padding, dilation = self.dilation, groups = self.groups})
  end

  -- As PyTorch: sizes always as pairs, options only when not the default.
  function Conv2d:extra_repr()
    local s = ("%d, %d, kernel_size=%s, stride=%s"):format(self.in_channels, self.out_channels,
                                                           show(self.kernel_size), show(self.stride))
    local p = self.padding
    if type(p) == "string" then
      s = s .. ", padding=" .. p
    elseif p[1] ~= 0 or p[2] ~= 0 then
      s = s .. ", padding=" .. show(p)
    end
    if self.dilation[1] ~= 1 or self.dilation[2] ~= 1 then s = s .. ", dilation=" .. show(self.dilation) end
    if self.groups ~= 1 then s = s .. ", groups=" .. self.groups end
    if not self.bias then s = s .. ", bias=false" end
    return s
  end

  ---------------------------------------------------------------------------
  -- Pools
  ---------------------------------------------------------------------------

  -- Keeps a size as given (number or pair) after checking it.
  local function size_arg(who, name, v, min)
    pair(who, name, v, min)
    if type(v) == "table" then return {v[1], v[2]} end
    return v
  end

  -- nn.MaxPool2d(kernel_size [, opts]): opts stride (kernel_size), padding
  -- (0), dilation (1), ceil_mode (false), return_indices (false: forward
  -- then returns output, indices; indices are 1-based positions h*W + w + 1
  -- in each [H, W] plane).
  local MaxPool2d = nn.Module:extend("MaxPool2d")
  nn.MaxPool2d = MaxPool2d

  local MAX_OPTS = {stride = true, padding = true, dilation = true, ceil_mode = true, return_indices = true}

  function MaxPool2d:init(kernel_size, opts)
    local who = "MaxPool2d"
    opts = check_opts(who, opts, MAX_OPTS)
    self.kernel_size = size_arg(who, "kernel_size", kernel_size, 1)
    self.stride = size_arg(who, "stride", opts.stride or kernel_size, 1)
    self.padding = size_arg(who, "padding", opts.padding or 0, 0)
    self.dilation = size_arg(who, "dilation", opts.dilation or 1, 1)
    self.ceil_mode = opts.ceil_mode == true
    self.return_indices = opts.return_indices == true
  end

  function MaxPool2d:forward(x)
    return F.max_pool2d(x, self.kernel_size, {stride = self.stride, padding = self.padding, dilation = self.dilation,
                                              ceil_mode = self.ceil_mode, return_indices = self.return_indices})
  end

  function MaxPool2d:extra_repr()
    return ("kernel_size=%s, stride=%s, padding=%s, dilation=%s, ceil_mode=%s"):format(
      show(self.kernel_size), show(self.stride), show(self.padding), show(self.dilation), tostring(self.ceil_mode))
  end

  -- nn.AvgPool2d(kernel_size [, opts]): opts stride (kernel_size), padding
  -- (0), ceil_mode (false), count_include_pad (true), divisor_override.
  local AvgPool2d = nn.Module:extend("AvgPool2d")
  nn.AvgPool2d = AvgPool2d

  local AVG_OPTS = {stride = true, padding = true, ceil_mode = true, count_include_pad = true, divisor_override = true}

  function AvgPool2d:init(kernel_size, opts)
    local who = "AvgPool2d"
    opts = check_opts(who, opts, AVG_OPTS)
    self.kernel_size = size_arg(who, "kernel_size", kernel_size, 1)
    self.stride = size_arg(who, "stride", opts.stride or kernel_size, 1)
    self.padding = size_arg(who, "padding", opts.padding or 0, 0)
    self.ceil_mode = opts.ceil_mode == true
    self.count_include_pad = opts.count_include_pad ~= false
    if opts.divisor_override ~= nil then
      self.divisor_override = count(who, "divisor_override", opts.divisor_override, 1)
    end
  end

  function AvgPool2d:forward(x)
    return F.avg_pool2d(x, self.kernel_size, {stride = self.stride, padding = self.padding,
                                              ceil_mode = self.ceil_mode, count_include_pad = self.count_include_pad,
                                              divisor_override = self.divisor_override})
  end

  function AvgPool2d:extra_repr()
    return ("kernel_size=%s, stride=%s, padding=%s"):format(show(self.kernel_size), show(self.stride),
                                                           show(self.padding))
  end

  -- nn.AdaptiveAvgPool2d(output_size): an integer or {h, w}; a false entry
  -- keeps that input size (PyTorch's None).
  local AdaptiveAvgPool2d = nn.Module:extend("AdaptiveAvgPool2d")
  nn.AdaptiveAvgPool2d = AdaptiveAvgPool2d

  function AdaptiveAvgPool2d:init(output_size)
    local who = "AdaptiveAvgPool2d"
    local ok = math.type(output_size) == "integer" and output_size >= 1
    if type(output_size) == "table" and #output_size <= 2 and output_size[3] == nil then
      ok = true
      for i = 1, 2 do
        local v = output_size[i]
        if not (v == false or v == nil or (math.type(v) == "integer" and v >= 1)) then ok = false end
      end
      output_size = {output_size[1] or false, output_size[2] or false}
    end
    if not ok then
      fail(("%s: output_size: expected a positive integer or a pair {h, w} (false keeps the input size), got %s")
           :format(who, tostring(output_size)))
    end
    self.output_size = output_size
  end

  function AdaptiveAvgPool2d:forward(x) return F.adaptive_avg_pool2d(x, self.output_size) end

  function AdaptiveAvgPool2d:extra_repr()
    local v = self.output_size
    if type(v) == "table" then
      return ("output_size={%s, %s}"):format(v[1] == false and "nil" or tostring(v[1]),
                                             v[2] == false and "nil" or tostring(v[2]))
    end
    return "output_size=" .. tostring(v)
  end
end
