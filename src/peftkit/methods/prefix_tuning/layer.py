"""Prefix tuning's encoder (PEFT's ``PrefixEncoder``).

    prefix_projection = false:   embedding (n, num_layers * 2 * token_dim)               trained directly
    prefix_projection = true:    embedding (n, token_dim) -> Linear -> tanh -> Linear -> (n, num_layers * 2 * token_dim)

A frozen (inference-mode) adapter is always the plain table: the file stores the computed
key/values, so the MLP is not needed (nor recoverable) after training.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.prefix_tuning.config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """``table()`` gives every layer's key/values for the n virtual tokens, ``(n, num_layers * 2 * token_dim)``."""

    def __init__(self, config: PrefixTuningConfig, device: torch.device | None = None):
        super().__init__()
        n, dim = config.num_virtual_tokens, config.token_dim
        out = config.num_layers * 2 * dim
        self.prefix_projection = bool(config.prefix_projection and not config.inference_mode)
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, dim, device=device)
            self.transform = nn.Sequential(
                nn.Linear(dim, config.encoder_hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, out, device=device),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, out, device=device)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def is_table(self) -> bool:
        return not self.prefix_projection

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.transform(embedded) if self.prefix_projection else embedded

    def table(self) -> torch.Tensor:
        if not self.prefix_projection:
            return self.embedding.weight
        return self.transform(self.embedding.weight)
