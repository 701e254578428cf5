-- The multiplication problem (Hochreiter and Schmidhuber 1997, experiment
-- 5), as generated for Pascanu, Mikolov and Bengio 2013: the adding
-- problem's input (see adding.lua: channel 1 the marker, channel 2 a value
-- from U(0, 1), the first mark in the first 10% of the sequence, the
-- second in 10% .. 50%, T + U{0 .. T/10 - 1} steps) with the PRODUCT of
-- the two marked values as target, in [0, 1]. MSE loss on the last step's
-- output; an error is |prediction - target| > tol.
return require("stability.tasks.adding").make{combine = "product"}
