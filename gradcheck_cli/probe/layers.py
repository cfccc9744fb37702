"""What kind of row a layer is, from its class (or op) name."""

from __future__ import annotations

from gradcheck_cli.probe.activations import MODULE_ACTIVATIONS
from gradcheck_cli.records import RowKind

_PARAM_TYPES = {
    "Bilinear",
    "Embedding",
    "EmbeddingBag",
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "MultiheadAttention",
    "Conv1D",
}
# Layers whose output is laid out channel-first, so a following activation's units are dim 1.
_CHANNEL_FIRST_PREFIXES = (
    "Conv",
    "ConvTranspose",
    "BatchNorm",
    "InstanceNorm",
    "GroupNorm",
    "SyncBatchNorm",
    "FrozenBatchNorm",
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "LocalResponseNorm",
)

# aten op names (graph path) to the module type a row is reported as.
OP_TYPES = {
    "linear": "Linear",
    "addmm": "Linear",
    "matmul": "Linear",
    "mm": "Linear",
    "bmm": "Linear",
    "conv1d": "Conv1d",
    "conv2d": "Conv2d",
    "conv3d": "Conv3d",
    "convolution": "Conv",
    "_convolution": "Conv",
    "conv_transpose1d": "ConvTranspose1d",
    "conv_transpose2d": "ConvTranspose2d",
    "conv_transpose3d": "ConvTranspose3d",
    "batch_norm": "BatchNorm",
    "_native_batch_norm_legit_no_training": "BatchNorm",
    "native_batch_norm": "BatchNorm",
    "layer_norm": "LayerNorm",
    "native_layer_norm": "LayerNorm",
    "group_norm": "GroupNorm",
    "native_group_norm": "GroupNorm",
    "instance_norm": "InstanceNorm",
    "rms_norm": "RMSNorm",
    "embedding": "Embedding",
    "lstm": "LSTM",
    "gru": "GRU",
    "rnn_tanh": "RNN",
    "rnn_relu": "RNN",
    "prelu": "PReLU",
    "_prelu_kernel": "PReLU",
}


def row_kind(type_name: str) -> RowKind:
    if type_name in MODULE_ACTIVATIONS:
        return RowKind.ACTIVATION
    if "Norm" in type_name:
        return RowKind.NORM
    if "Linear" in type_name or type_name.startswith(("Conv", "ConvTranspose")) or type_name in _PARAM_TYPES:
        return RowKind.PARAM
    return RowKind.OTHER


def is_channel_first(type_name: str) -> bool:
    return type_name.startswith(_CHANNEL_FIRST_PREFIXES)


def is_norm(type_name: str) -> bool:
    return "Norm" in type_name
