"""Kinds over feature vectors and token sequences: fc, embedding, transformer_block, lm_head.

FLOP convention (all kinds): ``matmul_flops`` is 2 x multiply-adds of linear and matmul
ops (bias adds folded in); ``elementwise_flops`` is 1 per output element of each
activation, normalisation, residual add, softmax, scale and mask.
"""

from __future__ import annotations

from .base import Config, Field, LayerKind, Shape, ShapeError, Sizes, expect_rank, float_bytes


def _fc_sizes(c: Config, shape: Shape) -> Sizes:
    """Linear saves its input; ReLU saves its result (so no ReLU, no saved output), the tail
    freed at I. I keeps the gradient of the Linear's output."""
    n_in, n_out = c["in_features"], c["out_features"]
    if len(shape) != 1:
        raise ShapeError(f"fc needs a flat input, got shape {shape}; put a flatten layer before it")
    if shape[0] != n_in:
        raise ShapeError(f"in_features {n_in} does not match the previous layer's out_features {shape[0]}")
    relu = c["activation"] == "relu"
    return Sizes(output_shape=(n_out,), output_dtype="float32", params=n_in * n_out + n_out,
                 matmul_flops=2.0 * n_in * n_out, elementwise_flops=float(n_out if relu else 0),
                 saves_input=True, saves_output=relu, internal_saved_bytes=0,
                 tail_saved_bytes=float_bytes(n_out) if relu else 0, weight_grad_bytes=float_bytes(n_out),
                 backward_scratch_bytes=float_bytes(n_in * n_out + n_out))


def _build(name: str):
    def build(c: Config, shape: Shape):
        from . import torch_modules

        return getattr(torch_modules, name)(c, shape)

    build.__name__ = f"build_{name}"
    return build


FC = LayerKind(
    name="fc",
    fields=(Field("in_features"), Field("out_features"), Field("activation", str, "relu", choices=("relu", "none"))),
    sizes=_fc_sizes, build=_build("fc"), own_input=lambda c: (c["in_features"],),
    repeat_rule="in_features == out_features",
)


def _embedding_sizes(c: Config, shape: Shape) -> Sizes:
    """Token embedding plus (with max_positions) a learned position embedding added to it.
    Saves the token ids (int64); the position lookup is a slice of the weight and the add
    saves nothing. I keeps the output's gradient, which a correct split needs for W; torch's
    split backward, given token ids that carry no gradient, finds no parametrised op on the
    input's path and computes no weight gradient at all (see the report of issue 14).
    Its backward makes the token table's gradient whole (vocab x hidden), then adds it in."""
    seq, hidden, positions = c["seq_len"], c["hidden"], c["max_positions"]
    if shape != (seq,):
        raise ShapeError(f"embedding expects token ids of shape ({seq},), got {shape}")
    if positions and seq > positions:
        raise ShapeError(f"seq_len {seq} is beyond max_positions {positions}")
    return Sizes(output_shape=(seq, hidden), output_dtype="float32",
                 params=(c["vocab_size"] + positions) * hidden, matmul_flops=0.0,
                 elementwise_flops=float(seq * hidden if positions else 0),
                 saves_input=True, saves_output=False, internal_saved_bytes=0,
                 tail_saved_bytes=0, weight_grad_bytes=float_bytes(seq * hidden),
                 backward_scratch_bytes=float_bytes(c["vocab_size"] * hidden))


EMBEDDING = LayerKind(
    name="embedding",
    fields=(Field("vocab_size"), Field("hidden"), Field("seq_len"), Field("max_positions", default=0, low=0)),
    sizes=_embedding_sizes, build=_build("embedding"), input_dtype="int64",
    own_input=lambda c: (c["seq_len"],),
)


def _sequence(shape: Shape, hidden: int, kind: str) -> int:
    expect_rank(shape, 2, "(seq_len, hidden)")
    if shape[1] != hidden:
        raise ShapeError(f"{kind} hidden {hidden} does not match the input's hidden size {shape[1]}")
    return shape[0]


def _block_sizes(c: Config, shape: Shape) -> Sizes:
    """Pre-LN causal self-attention + MLP (4 x hidden, tanh GELU), attention written out
    as bmm / softmax / bmm (torch_modules.TransformerBlock), never SDPA, so what it saves
    is fixed. Per sample, S = seq_len, H = hidden, A = heads; F saves the input x, then
    LN1 mean+rstd (2S), LN1 out (SH), q, k, v (3SH, contiguous copies), softmax result
    (A S^2), merged heads (SH), x1 = x + attention (SH), LN2 mean+rstd (2S), LN2 out (SH),
    MLP hidden before and after GELU (8SH): 15SH + AS^2 + 4S floats besides x.
    Nothing after the last Linear saves anything (tail 0), so I frees none of it; I keeps
    the gradients of LN1 out, qkv, x1, LN2 out, MLP hidden and the block output (11SH).
    Its backward holds for a moment the larger of the MLP's first weight gradient and
    three attention-sized tensors per sample (the softmax's backward: 3 A S^2 floats)."""
    hidden, heads = c["hidden"], c["heads"]
    if hidden % heads:
        raise ShapeError(f"hidden {hidden} is not a multiple of heads {heads}")
    s = _sequence(shape, hidden, "transformer_block")
    sh, attn = s * hidden, heads * s * s
    return Sizes(output_shape=(s, hidden), output_dtype="float32", params=12 * hidden * hidden + 13 * hidden,
                 matmul_flops=2.0 * (12 * sh * hidden + 2 * s * sh), elementwise_flops=float(8 * sh + 3 * attn),
                 saves_input=True, saves_output=False, internal_saved_bytes=float_bytes(15 * sh + attn + 4 * s),
                 tail_saved_bytes=0, weight_grad_bytes=float_bytes(11 * sh),
                 backward_scratch_bytes=float_bytes(4 * hidden * hidden + 4 * hidden),
                 backward_scratch_bytes_per_sample=float_bytes(3 * attn))


TRANSFORMER_BLOCK = LayerKind(
    name="transformer_block", fields=(Field("hidden"), Field("heads")),
    sizes=_block_sizes, build=_build("transformer_block"),
)


def _head_sizes(c: Config, shape: Shape) -> Sizes:
    """Final LayerNorm (optional) + Linear(hidden, vocab) without bias: the logits.
    Saves the input, and with the norm its mean+rstd (2S) and output (SH); not the logits."""
    hidden, vocab, norm = c["hidden"], c["vocab_size"], c["layer_norm"]
    s = _sequence(shape, hidden, "lm_head")
    sh = s * hidden
    params = hidden * vocab + (2 * hidden if norm else 0)
    return Sizes(output_shape=(s, vocab), output_dtype="float32", params=params,
                 matmul_flops=2.0 * sh * vocab, elementwise_flops=float(sh if norm else 0),
                 saves_input=True, saves_output=False, internal_saved_bytes=float_bytes(sh + 2 * s) if norm else 0,
                 tail_saved_bytes=0,
                 weight_grad_bytes=float_bytes(s * vocab + (sh if norm else 0)),
                 backward_scratch_bytes=float_bytes(params))


LM_HEAD = LayerKind(
    name="lm_head", fields=(Field("hidden"), Field("vocab_size"), Field("layer_norm", bool, True)),
    sizes=_head_sizes, build=_build("lm_head"),
)
