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
  [KL_OP_CONV2D] = {"conv2d", kl_conv2d_backward},
  [KL_OP_MAX_POOL2D] = {"max_pool2d", kl_max_pool2d_backward},
  [KL_OP_AVG_POOL2D] = {"avg_pool2d", kl_avg_pool2d_backward},
  [KL_OP_ADAPTIVE_AVG_POOL2D] = {"adaptive_avg_pool2d", kl_adaptive_avg_pool2d_backward},
  /* @table:norm */
  [KL_OP_BATCH_NORM] = {"batch_norm", kl_batch_norm_backward},
  [KL_OP_LAYER_NORM] = {"layer_norm", kl_layer_norm_backward},
  [KL_OP_GROUP_NORM] = {"group_norm", kl_group_norm_backward},
  [KL_OP_DROPOUT] = {"dropout", kl_dropout_backward},
  [KL_OP_EMBEDDING] = {"embedding", kl_embedding_backward},
  /* @table:act */
  [KL_OP_LEAKY_RELU] = {"leaky_relu", kl_act_backward},
  [KL_OP_ELU] = {"elu", kl_act_backward},
  [KL_OP_GELU] = {"gelu", kl_act_backward},
  [KL_OP_SILU] = {"silu", kl_act_backward},
  [KL_OP_SOFTPLUS] = {"softplus", kl_act_backward},
  [KL_OP_SOFTMAX] = {"softmax", kl_softmax_backward},
  [KL_OP_LOG_SOFTMAX] = {"log_softmax", kl_softmax_backward},
  [KL_OP_MSE_LOSS] = {"mse_loss", kl_ploss_backward},
  [KL_OP_L1_LOSS] = {"l1_loss", kl_ploss_backward},
  [KL_OP_SMOOTH_L1_LOSS] = {"smooth_l1_loss", kl_ploss_backward},
  [KL_OP_HUBER_LOSS] = {"huber_loss", kl_ploss_backward},
  [KL_OP_CROSS_ENTROPY] = {"cross_entropy", kl_closs_backward},
  [KL_OP_NLL_LOSS] = {"nll_loss", kl_closs_backward},
  [KL_OP_BCE_WITH_LOGITS] = {"binary_cross_entropy_with_logits", kl_bce_backward},
  /* @table:rnn */
  [KL_OP_RNN_TANH_CELL] = {"rnn_tanh_cell", kl_rnn_backward},
  [KL_OP_RNN_RELU_CELL] = {"rnn_relu_cell", kl_rnn_backward},
  [KL_OP_LSTM_CELL] = {"lstm_cell", kl_rnn_backward},
  [KL_OP_GRU_CELL] = {"gru_cell", kl_rnn_backward},
  [KL_OP_RNN_TANH_LAYER] = {"rnn_tanh_layer", kl_rnn_backward},
  [KL_OP_RNN_RELU_LAYER] = {"rnn_relu_layer", kl_rnn_backward},
  [KL_OP_LSTM_LAYER] = {"lstm_layer", kl_rnn_backward},
  [KL_OP_GRU_LAYER] = {"gru_layer", kl_rnn_backward},
  /* @ops:attn */
  [KL_OP_SDPA] = {"scaled_dot_product_attention", kl_sdpa_backward},
  /* @table:cuda */
  [KL_OP_TO_DEVICE] = {"to_device", kl_to_device_backward},
};

/* the last entry fixes the size: an op added to the enum but not here fails */
_Static_assert(sizeof kl_ops / sizeof kl_ops[0] == KL_OP_COUNT, "op table out of sync with KL_OP_COUNT");

int keel_op_count(void) { return KL_OP_COUNT; }

const char *keel_op_name(int i) {
  return i >= 0 && i < KL_OP_COUNT ? kl_ops[i].name : NULL;
}
