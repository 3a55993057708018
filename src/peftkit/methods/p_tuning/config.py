"""P-tuning's configuration: PEFT's ``PromptEncoderConfig`` field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from peftkit.methods.prompt_learning.config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, Enum):
    """The network that computes the prompt from its embeddings while training (PEFT's values)."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass(kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., 2021): input prompts computed by an MLP or LSTM from trained embeddings."""

    peft_type: str | None = field(
        default="P_TUNING", metadata={"help": "Which PEFT method this config belongs to (always P_TUNING)."}
    )
    encoder_reparameterization_type: PromptEncoderReparameterizationType = field(
        default=PromptEncoderReparameterizationType.MLP,
        metadata={
            "help": "The prompt encoder: MLP (3 linear layers with ReLU) or LSTM (bidirectional + 2-layer MLP)."
        },
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the prompt encoder; null uses token_dim."}
    )
    encoder_num_layers: int = field(
        default=2, metadata={"help": "LSTM layers (LSTM only; the MLP always has 3 linear layers)."}
    )
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between LSTM layers (LSTM only)."})

    def __post_init__(self) -> None:
        kind = self.encoder_reparameterization_type
        if isinstance(kind, str) and not isinstance(kind, PromptEncoderReparameterizationType):
            try:
                self.encoder_reparameterization_type = PromptEncoderReparameterizationType(kind.upper())
            except ValueError:
                pass  # reported by validate()
        super().__post_init__()

    def validate(self) -> list[str]:
        problems = super().validate()
        if not isinstance(self.encoder_reparameterization_type, PromptEncoderReparameterizationType):
            problems.append(
                f"encoder_reparameterization_type must be MLP or LSTM, got {self.encoder_reparameterization_type!r}"
            )
        size = self.encoder_hidden_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            problems.append(
                f"encoder_hidden_size must be a positive integer or null (token_dim), got {size!r}"
            )
        layers = self.encoder_num_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            problems.append(f"encoder_num_layers must be a positive integer, got {layers!r}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0 <= self.encoder_dropout < 1:
            problems.append(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        return problems

    def _fill_method_fields(self, model_config: dict) -> None:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
