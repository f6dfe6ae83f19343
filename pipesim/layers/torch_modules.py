"""torch.nn modules for the registry's kinds (imported only by a kind's ``build``).

Only torch.nn (no torchvision). Every module computes exactly what its kind's ``sizes``
describes; tests/test_layers.py checks parameters, output shapes, FLOPs and saved bytes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Config, Shape


def fc(c: Config, shape: Shape) -> nn.Module:
    linear = nn.Linear(c["in_features"], c["out_features"])
    return nn.Sequential(linear, nn.ReLU()) if c["activation"] == "relu" else nn.Sequential(linear)


def conv2d(c: Config, shape: Shape) -> nn.Module:
    bn = c["batch_norm"]
    conv = nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel"], c["stride"], c["padding"], bias=not bn)
    return nn.Sequential(conv, nn.BatchNorm2d(c["out_channels"]), nn.ReLU()) if bn else nn.Sequential(conv, nn.ReLU())


def maxpool(c: Config, shape: Shape) -> nn.Module:
    return nn.MaxPool2d(c["kernel"], c["stride"], c["padding"])


def avgpool(c: Config, shape: Shape) -> nn.Module:
    return nn.AdaptiveAvgPool2d(1)


class Flatten(nn.Module):
    """(B, C, H, W) -> (B, C*H*W) as a copy, not a view: torch's split backward
    (stage_backward_input, the runner's I) detaches a piece's output in place, which a view
    refuses, so a piece ending in a view could not run I. The copy saves nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).clone()


def flatten(c: Config, shape: Shape) -> nn.Module:
    return Flatten()


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.reduce = _conv_bn(cin, mid, 1)
        self.spatial = _conv_bn(mid, mid, 3, stride)
        self.expand = _conv_bn(mid, cout, 1)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(F.relu(self.spatial(F.relu(self.reduce(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


def bottleneck(c: Config, shape: Shape) -> nn.Module:
    return Bottleneck(c["in_channels"], c["mid_channels"], c["out_channels"], c["stride"])


class TokenEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, positions: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(positions, hidden) if positions else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        # a slice of the weight, not a lookup: the add then saves nothing
        return x if self.positions is None else x + self.positions.weight[: ids.shape[-1]]


def embedding(c: Config, shape: Shape) -> nn.Module:
    return TokenEmbedding(c["vocab_size"], c["hidden"], c["max_positions"])


class TransformerBlock(nn.Module):
    """Pre-LN causal self-attention + MLP. Attention is written out (contiguous q, k, v,
    bmm, additive mask, softmax, bmm) rather than scaled_dot_product_attention, whose
    backend (and so what it saves) depends on the machine and the torch version."""

    def __init__(self, hidden: int, heads: int, seq_len: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * hidden, hidden))
        mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B*A, S, d), a copy
        b, s, h = t.shape
        return t.reshape(b, s, self.heads, h // self.heads).transpose(1, 2).contiguous().view(b * self.heads, s, -1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (self._heads(t) for t in self.qkv(x).split(h, dim=-1))
        scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(h // self.heads)) + self.mask[:s, :s]
        out = torch.bmm(torch.softmax(scores, dim=-1), v)
        return self.proj(out.view(b, self.heads, s, -1).transpose(1, 2).contiguous().view(b, s, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def transformer_block(c: Config, shape: Shape) -> nn.Module:
    return TransformerBlock(c["hidden"], c["heads"], shape[0])


def lm_head(c: Config, shape: Shape) -> nn.Module:
    linear = nn.Linear(c["hidden"], c["vocab_size"], bias=False)
    return nn.Sequential(nn.LayerNorm(c["hidden"]), linear) if c["layer_norm"] else nn.Sequential(linear)
