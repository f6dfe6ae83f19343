"""Kinds over images (channels, height, width): conv2d, maxpool, avgpool, flatten, bottleneck.

FLOPs as in dense.py; batch-norm counts 2 per element (scale and shift), pooling one per
window element. Batch-norm saves, besides its input, four per-channel tensors (mean,
inverse std and the running statistics) that do not grow with the batch: they are left out
of the per-sample counts.
"""

from __future__ import annotations

from .base import (
    Config,
    Field,
    LayerKind,
    Shape,
    ShapeError,
    Sizes,
    conv_out,
    expect_rank,
    float_bytes,
    numel,
)
from .dense import _build

INT64_BYTES = 8


def _image(shape: Shape, channels: int | None = None) -> tuple[int, int, int]:
    expect_rank(shape, 3, "(channels, height, width)")
    if channels is not None and shape[0] != channels:
        raise ShapeError(f"in_channels {channels} does not match the input's {shape[0]} channels")
    c, h, w = shape
    return c, h, w


def _conv_sizes(c: Config, shape: Shape) -> Sizes:
    """Conv2d (bias only without batch-norm) [+ BatchNorm2d] + ReLU. The convolution saves
    its input, batch-norm the convolution's output, ReLU its result (the layer's output, the
    tail freed at I). I keeps the gradients of the convolution's (and batch-norm's) output.
    Its backward holds for a moment, beyond the gradients at its input and output: with a
    kernel over 1, torch's CPU convolution makes two weight-sized buffers, or, if larger, an
    input and an output's worth per sample; a 1x1 convolution, its weight gradient."""
    cin, cout, k, stride, pad, bn = (c[x] for x in ("in_channels", "out_channels", "kernel", "stride",
                                                    "padding", "batch_norm"))
    _, h, w = _image(shape, cin)
    out = (cout, conv_out(h, k, stride, pad), conv_out(w, k, stride, pad))
    n = numel(out)
    params = cout * cin * k * k + (2 * cout if bn else cout)
    spatial = k > 1
    return Sizes(output_shape=out, output_dtype="float32", params=params,
                 matmul_flops=2.0 * n * cin * k * k, elementwise_flops=float(n * (3 if bn else 1)),
                 saves_input=True, saves_output=True, internal_saved_bytes=float_bytes(n) if bn else 0,
                 tail_saved_bytes=float_bytes(n),
                 weight_grad_bytes=float_bytes(2 * n if bn else n),
                 backward_scratch_bytes=float_bytes(params * (2 if spatial else 1)),
                 backward_scratch_bytes_per_sample=float_bytes(numel(shape) + n) if spatial else 0)


CONV2D = LayerKind(
    name="conv2d",
    fields=(Field("in_channels"), Field("out_channels"), Field("kernel", high=1024),
            Field("stride", default=1, high=1024), Field("padding", default=0, low=0, high=1024),
            Field("batch_norm", bool, False)),
    sizes=_conv_sizes, build=_build("conv2d"),
)


def _no_weights(out: Shape, elementwise: float, saves_input: bool, internal: int = 0) -> Sizes:
    return Sizes(output_shape=out, output_dtype="float32", params=0, matmul_flops=0.0,
                 elementwise_flops=float(elementwise), saves_input=saves_input, saves_output=False,
                 internal_saved_bytes=internal, tail_saved_bytes=0, weight_grad_bytes=0)


def _maxpool_sizes(c: Config, shape: Shape) -> Sizes:
    """MaxPool2d saves its input and the argmax indices (int64, one per output element)."""
    k, stride, pad = c["kernel"], c["stride"], c["padding"]
    if 2 * pad > k:
        raise ShapeError(f"maxpool padding {pad} must be at most half the kernel {k}")
    ch, h, w = _image(shape)
    out = (ch, conv_out(h, k, stride, pad), conv_out(w, k, stride, pad))
    return _no_weights(out, numel(out) * k * k, True, INT64_BYTES * numel(out))


MAXPOOL = LayerKind(
    name="maxpool",
    fields=(Field("kernel", high=1024), Field("stride", high=1024), Field("padding", default=0, low=0, high=1024)),
    sizes=_maxpool_sizes, build=_build("maxpool"),
)


def _avgpool_sizes(c: Config, shape: Shape) -> Sizes:
    """Global average pooling to (channels, 1, 1); torch computes it as a mean, which saves nothing."""
    ch, h, w = _image(shape)
    return _no_weights((ch, 1, 1), ch * h * w, False)


AVGPOOL = LayerKind(name="avgpool", fields=(), sizes=_avgpool_sizes, build=_build("avgpool"))


def _flatten_sizes(c: Config, shape: Shape) -> Sizes:
    """(c, h, w) -> (c*h*w,), copied (torch_modules.Flatten says why); saves nothing."""
    return _no_weights((numel(shape),), 0, False)


FLATTEN = LayerKind(name="flatten", fields=(), sizes=_flatten_sizes, build=_build("flatten"))


def _bottleneck_sizes(c: Config, shape: Shape) -> Sizes:
    """ResNet v1.5 bottleneck: 1x1 (in->mid), 3x3 stride s (mid->mid), 1x1 (mid->out), each
    convolution followed by batch-norm, ReLU after the first two and after the residual add;
    a 1x1 stride-s convolution + batch-norm on the shortcut when stride > 1 or in != out.
    F saves the input, the three convolutions' outputs (batch-norm inputs), the two inner
    ReLU results, the shortcut convolution's output, and the final ReLU result (the output).
    The final ReLU's result is the tail freed at I. I keeps the gradients of each
    convolution's and batch-norm's output (the last batch-norm's and the shortcut
    batch-norm's are both the gradient of the sum, held twice). Its backward's scratch is
    the largest of its convolutions' (the 3x3's two weight-sized buffers, a 1x1's weight
    gradient); its activation-sized temporaries are not counted."""
    cin, mid, cout, stride = (c[x] for x in ("in_channels", "mid_channels", "out_channels", "stride"))
    _, h, w = _image(shape, cin)
    hw, out = h * w, (cout, conv_out(h, 3, stride, 1), conv_out(w, 3, stride, 1))
    hw2 = out[1] * out[2]
    shortcut = stride != 1 or cin != cout
    macs = hw * cin * mid + hw2 * mid * mid * 9 + hw2 * mid * cout + (hw2 * cin * cout if shortcut else 0)
    params = cin * mid + 9 * mid * mid + mid * cout + 2 * (2 * mid + cout) + (cin * cout + 2 * cout if shortcut else 0)
    inner = 2 * mid * hw + 2 * mid * hw2 + cout * hw2 + (cout * hw2 if shortcut else 0)
    elementwise = 3 * mid * hw + 3 * mid * hw2 + 4 * cout * hw2 + (2 * cout * hw2 if shortcut else 0)
    return Sizes(output_shape=out, output_dtype="float32", params=params, matmul_flops=2.0 * macs,
                 elementwise_flops=float(elementwise), saves_input=True, saves_output=True,
                 internal_saved_bytes=float_bytes(inner),
                 tail_saved_bytes=float_bytes(out),
                 weight_grad_bytes=float_bytes(2 * mid * hw + 2 * mid * hw2 + 2 * cout * hw2
                                               + (2 * cout * hw2 if shortcut else 0)),
                 backward_scratch_bytes=float_bytes(max(18 * mid * mid, cin * mid, mid * cout,
                                                        cin * cout if shortcut else 0)))


BOTTLENECK = LayerKind(
    name="bottleneck",
    fields=(Field("in_channels"), Field("mid_channels"), Field("out_channels"), Field("stride", default=1, high=1024)),
    sizes=_bottleneck_sizes, build=_build("bottleneck"),
)
