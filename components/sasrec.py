"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018), one readable file.

Shapes: B = batch, L = sequence length, D = hidden size, N = number of items (ids 1..N, 0 = padding).

Conventions of this implementation:
- Histories are LEFT-padded with 0 (oldest item first, most recent item in the last column).
- Positions are counted from the first real item of each row (0, 1, 2, ...), so the representation of a
  real item never depends on how much padding precedes it: padding never changes the output
  (pad keys are masked out of attention; every layer is per-position otherwise).
- Post-LayerNorm transformer blocks with GELU, as in RecBole's SASRec (BERT-style encoder, causal mask).
- Scores = dot product of the hidden state with the (shared) item embedding table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SASRecConfig:
    n_items: int  # N: item ids are 1..N; 0 is padding
    max_len: int = 50  # longest history the model sees (positions 0..max_len-1)
    hidden: int = 64  # D
    layers: int = 2
    heads: int = 2
    inner: int = 256  # feed-forward width
    dropout: float = 0.5  # hidden dropout (embeddings, attention output, feed-forward)
    attn_dropout: float = 0.5  # dropout on the attention probabilities
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        assert cfg.hidden % cfg.heads == 0, "hidden must be divisible by heads"
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_drop = nn.Dropout(cfg.attn_dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, n_queries: int | None = None) -> torch.Tensor:
        # x: [B, L, D]; allowed: [B, 1, Q, L] bool, True where query i may attend to key j.
        # The queries are the last Q positions (Q = L for training; Q = 1 for the user vector).
        B, L, D = x.shape
        Q = n_queries or L
        q, k, v = self.qkv(x).split(D, dim=2)  # each [B, L, D]
        q = q[:, L - Q :].reshape(B, Q, self.heads, D // self.heads).transpose(1, 2)  # [B, H, Q, Dh]
        k = k.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # [B, H, L, Dh]
        v = v.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # [B, H, L, Dh]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // self.heads))  # [B, H, Q, L]
        att = att.masked_fill(~allowed, float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, Q, D)  # [B, Q, D]
        return self.proj(y)


class Block(nn.Module):
    """Post-LN transformer block: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ff = nn.Sequential(nn.Linear(cfg.hidden, cfg.inner), nn.GELU(), nn.Linear(cfg.inner, cfg.hidden))
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        # x: [B, L, D] -> [B, L, D], or [B, 1, D] for the last position alone (last_only)
        if last_only:
            x = self.ln1(x[:, -1:] + self.drop(self.attn(x, allowed[:, :, -1:], n_queries=1)))  # [B, 1, D]
        else:
            x = self.ln1(x + self.drop(self.attn(x, allowed)))  # [B, L, D]
        return self.ln2(x + self.drop(self.ff(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)  # [N+1, D]
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)  # [max_len, D]
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, items: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """items: [B, L] int64, left-padded with 0, L <= max_len -> hidden states [B, L, D]
        (last_only: the last block computes the last position alone -> [B, 1, D], same values)."""
        B, L = items.shape
        real = items != 0  # [B, L]
        # Position of each real item counted from the row's first real item; padding gets position 0.
        pos = (torch.cumsum(real.long(), dim=1) - 1).clamp(min=0)  # [B, L]
        x = self.drop(self.ln(self.item_emb(items) + self.pos_emb(pos)))  # [B, L, D]
        causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()  # [L, L]
        # Query i sees real keys j <= i, and always itself (so a padding row is never all-masked).
        eye = torch.eye(L, dtype=torch.bool, device=items.device)  # [L, L]
        allowed = (causal & real[:, None, :]) | eye  # [B, L, L]
        allowed = allowed[:, None, :, :]  # [B, 1, L, L]
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only=last_only and i == len(self.blocks) - 1)
        return x  # [B, L, D] or [B, 1, D]

    def user_vector(self, items: torch.Tensor) -> torch.Tensor:
        """items: [B, L] left-padded histories -> the representation after the last item, [B, D]."""
        return self.forward(items, last_only=True)[:, -1, :]

    def item_table(self) -> torch.Tensor:
        """The item embedding table [N+1, D] (row 0 = padding): scores = user_vector @ table.T."""
        return self.item_emb.weight

    def score_all(self, items: torch.Tensor) -> torch.Tensor:
        """Scores of every item for the next position, [B, N+1]; the padding column is -inf."""
        scores = self.user_vector(items) @ self.item_emb.weight.T  # [B, N+1]
        scores[:, 0] = float("-inf")
        return scores
