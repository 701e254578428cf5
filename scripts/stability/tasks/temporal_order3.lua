-- The 3-bit temporal order problem (Hochreiter and Schmidhuber 1997,
-- experiment 6b, in the form generated for Pascanu, Mikolov and Bengio
-- 2013): the temporal order input (6 one-hot symbols, A/B relevant,
-- c..f distractors) with three relevant steps, drawn from [10%, 20%),
-- [30%, 40%) and [60%, 70%) of the sequence. Target: a class of 8 (1 +
-- first + 2 * second + 4 * third, A = 0, B = 1) at the last step;
-- cross-entropy loss. Exactly T steps. An error is a wrong argmax.
return require("stability.tasks.temporal_order").make("3-bit temporal order", {0.1, 0.3, 0.6})
