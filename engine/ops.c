/*
** ops.c: the op table. One entry per differentiable op: its name (shown by
** grad_fn and in errors) and its backward rule, which lives beside the
** op's forward in elementwise.c, shape.c, reduce.c or linalg.c.
*/
#include "keel_impl.h"

const kl_op_info kl_ops[] = {
  [KL_OP_ADD] = {"add", kl_add_backward},
  [KL_OP_SUB] = {"sub", kl_sub_backward},
  [KL_OP_MUL] = {"mul", kl_mul_backward},
  [KL_OP_DIV] = {"div", kl_div_backward},
  [KL_OP_POW] = {"pow", kl_pow_backward},
  [KL_OP_MAXIMUM] = {"maximum", kl_maximum_backward},
  [KL_OP_MINIMUM] = {"minimum", kl_minimum_backward},
  [KL_OP_NEG] = {"neg", kl_neg_backward},
  [KL_OP_EXP] = {"exp", kl_exp_backward},
  [KL_OP_LOG] = {"log", kl_log_backward},
  [KL_OP_SQRT] = {"sqrt", kl_sqrt_backward},
  [KL_OP_ABS] = {"abs", kl_abs_backward},
  [KL_OP_RELU] = {"relu", kl_relu_backward},
  [KL_OP_SIGMOID] = {"sigmoid", kl_sigmoid_backward},
  [KL_OP_TANH] = {"tanh", kl_tanh_backward},
  [KL_OP_CLAMP] = {"clamp", kl_clamp_backward},
  [KL_OP_WHERE] = {"where", kl_where_backward},
  [KL_OP_CAST] = {"cast", kl_cast_backward},
  [KL_OP_VIEW] = {"view", kl_view_backward},
  [KL_OP_PERMUTE] = {"permute", kl_permute_backward},
  [KL_OP_NARROW] = {"narrow", kl_narrow_backward},
  [KL_OP_SELECT] = {"select", kl_select_backward},
  [KL_OP_EXPAND] = {"expand", kl_expand_backward},
  [KL_OP_COPY] = {"copy", kl_copy_backward},
  [KL_OP_SUM] = {"sum", kl_sum_backward},
  [KL_OP_PROD] = {"prod", kl_prod_backward},
  [KL_OP_AMAX] = {"amax", kl_amax_backward},
  [KL_OP_MAX_DIM] = {"max_dim", kl_max_dim_backward},
  [KL_OP_NORM] = {"norm", kl_norm_backward},
  [KL_OP_MATMUL] = {"matmul", kl_matmul_backward},
  [KL_OP_CAT] = {"cat", kl_cat_backward},
  [KL_OP_GATHER] = {"gather", kl_gather_backward},
  [KL_OP_SCATTER_ADD] = {"scatter_add", kl_scatter_add_backward},
  [KL_OP_INDEX_SELECT] = {"index_select", kl_index_select_backward},
  /* @table:conv */
  /* @table:norm */
  /* @table:act */
  /* @table:rnn */
};

/* the last entry fixes the size: an op added to the enum but not here fails */
_Static_assert(sizeof kl_ops / sizeof kl_ops[0] == KL_OP_COUNT, "op table out of sync with KL_OP_COUNT");

int keel_op_count(void) { return KL_OP_COUNT; }

const char *keel_op_name(int i) {
  return i >= 0 && i < KL_OP_COUNT ? kl_ops[i].name : NULL;
}
