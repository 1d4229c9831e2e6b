"""Small transformers: a ViT classifier and a GPT character language model.

Both use hand-written pre-norm blocks with `F.scaled_dot_product_attention` (captured by
torch.export); salcompile finds the attention and gates each block's FFN per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x)))). No dropout."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """A small Vision Transformer: conv patch embedding (patch 4 on 32×32 → 64 tokens), learned
    position embedding, `depth` pre-norm blocks, final LayerNorm, mean pool over tokens (no cls
    token), linear head. ViT() (3 channels, dim 64, 2 layers, 4 heads, MLP 128, 10 classes):
    74,954 parameters.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}.")
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos           # [B, tokens, dim]
        return self.head(self.ln(self.blocks(x)).mean(1))


class GPT(nn.Module):
    """A small GPT character LM: token + learned position embeddings, `depth` causal pre-norm
    blocks, final LayerNorm, untied linear head. Input int64 tokens [B, T ≤ seq_len], output
    logits [B, T, vocab]. GPT() (vocab 65, seq 64, dim 64, 2 layers, 4 heads, MLP 256): 112,577
    parameters."""

    def __init__(self, vocab_size: int = 65, seq_len: int = 64, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_dim: int = 256):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim, causal=True) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos[:, :tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))
