"""The config fields every soft-prompt method shares (PEFT's ``PromptLearningConfig``).

Soft prompts inject nothing into the model's layers: they learn ``num_virtual_tokens`` vectors
that are either prepended to the input embeddings (prompt tuning, P-tuning) or handed to every
attention layer as past key/values (prefix tuning, P-tuning v2). The model-shape fields
(``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``) are
read from the model when left null, exactly as PEFT fills them, and the filled-in values are
what ``adapter_config.json`` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.base import PeftConfig, TaskType


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(kw_only=True)
class PromptLearningConfig(PeftConfig):
    """Fields shared by the soft-prompt methods (not a method itself: it has no ``peft_type``)."""

    num_virtual_tokens: int | None = field(
        default=None,
        metadata={"help": "How many virtual tokens (learned prompt vectors) to use, e.g. 20. Required."},
    )
    token_dim: int | None = field(
        default=None,
        metadata={
            "help": "Hidden size of the model's token embeddings; null reads it from the model config."
        },
    )
    num_transformer_submodules: int | None = field(
        default=None,
        metadata={
            "help": "1 for decoder-only / encoder-only models, 2 for encoder-decoder (null: from task_type)."
        },
    )
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Attention heads of the model; null reads it from the model config."}
    )
    num_layers: int | None = field(
        default=None,
        metadata={"help": "Transformer layers of the model; null reads it from the model config."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the prompt (e.g. [classifier] for a sequence "
            "classification head); matched by name suffix."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, (tuple, set, frozenset)):
            self.modules_to_save = sorted(self.modules_to_save)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        super().__post_init__()

    def validate(self) -> list[str]:
        problems = super().validate()
        if not _positive(self.num_virtual_tokens):
            problems.append(
                f"num_virtual_tokens must be a positive integer (e.g. 20), got {self.num_virtual_tokens!r}"
            )
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                problems.append(
                    f"{name} must be a positive integer or null (read from the model), got {value!r}"
                )
        if self.num_transformer_submodules not in (None, 1, 2):
            problems.append(
                "num_transformer_submodules must be 1 (decoder-only or encoder-only models), 2 (encoder-decoder) "
                f"or null, got {self.num_transformer_submodules!r}"
            )
        return problems

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt table: one set of virtual tokens per transformer submodule."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def fill_from_model(self, model_config: object) -> None:
        """Fill the null model-shape fields from a transformers config (PEFT's rules, in place)."""
        data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
        data = data.get("text_config") or data

        def first(*keys: str) -> int | None:
            for key in keys:
                value = getattr(model_config, key, None) if key == "num_hidden_layers" else None
                value = value if value is not None else data.get(key)
                if value is not None:
                    return value
            return None

        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1
        wanted = {
            "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
            "token_dim": ("hidden_size", "n_embd", "d_model"),
            "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
        }
        for name, keys in wanted.items():
            if getattr(self, name) is None:
                value = first(*keys)
                if value is None:
                    raise ValueError(
                        f"cannot read {name} from the model config (none of {', '.join(keys)}): set {name} "
                        "in the config"
                    )
                setattr(self, name, value)
        self._fill_method_fields(data)

    def _fill_method_fields(self, model_config: dict) -> None:
        """Per-method fields that depend on the model (prefix tuning's key/value heads)."""
