"""P-tuning's prompt encoder (PEFT's ``PromptEncoder``).

    MLP:   embedding (total, D) -> Linear(D, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, D)
    LSTM:  embedding (total, D) -> biLSTM(D -> h, encoder_num_layers) -> Linear(2h, 2h) -> ReLU -> Linear(2h, D)

The encoder runs over the whole sequence of virtual tokens at once (the LSTM lets the prompt
vectors depend on each other). After training only its output matters: a frozen
(inference-mode) adapter is the plain output table, which is what the file stores.
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(nn.Module):
    """``table()`` gives the prompt, ``(total_virtual_tokens, token_dim)``."""

    def __init__(self, config: PromptEncoderConfig, device: torch.device | None = None):
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim, device=device)
        self.is_table = bool(config.inference_mode)
        if self.is_table:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                device=device,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, device=device),
                nn.ReLU(),
                nn.Linear(2 * hidden, dim, device=device),
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden, device=device),
                nn.ReLU(),
                nn.Linear(hidden, hidden, device=device),
                nn.ReLU(),
                nn.Linear(hidden, dim, device=device),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # (B, total) -> (B, total, D)
        embeds = self.embedding(indices)
        if self.is_table:
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)

    def table(self) -> torch.Tensor:
        if self.is_table:
            return self.embedding.weight
        return self.forward(
            torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)[None]
        )[0]
