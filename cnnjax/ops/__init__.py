"""Operations with kernels of their own: 2-D convolutions on oneDNN for XLA:CPU (conv.py)."""

from cnnjax.ops.conv import (conv_general_dilated, onednn_available, onednn_convolutions, onednn_enabled,
                             onednn_faster, threads_per_call, xla_convolutions)

__all__ = ['conv_general_dilated', 'onednn_available', 'onednn_convolutions', 'onednn_enabled', 'onednn_faster',
           'threads_per_call', 'xla_convolutions']
