"""Prompts as past key/values in every attention layer (prefix tuning, P-tuning v2).

    table (n, num_layers * 2 * token_dim)
      -> view (B, n, num_layers * 2, heads, head_dim)          [x2 along dim 2 for encoder-decoder]
      -> permute (num_layers * 2, B, heads, n, head_dim) -> split per layer
      -> DynamicCache: layer i attends to K_i, V_i of the n virtual positions first

The layout, the order of the split and, for encoder-decoder models, the empty cross-attention
cache are PEFT's, so a PEFT prefix gives the same logits here. The model's own forward must take
a KV cache (``cache`` since transformers 5.25, ``past_key_values`` before: see
``transformers_compat``); a classifier whose forward does not (BERT's) gets it handed to its
backbone (``model.<base_model_prefix>``) through a forward pre-hook, which keeps the model's own
pooling, dropout, head and loss.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache

from peftkit.errors import PeftkitError
from peftkit.methods.base import TaskType
from peftkit.methods.prompt_learning.config import PromptLearningConfig
from peftkit.methods.prompt_learning.model import PromptLearningModel
from peftkit.transformers_compat import CACHE_KEYWORDS, cache_keyword, generation_cache


class PrefixModel(PromptLearningModel):
    """Prompt learning whose prompts are per-layer key/values (no input positions are added)."""

    uses_past_key_values = True

    def _backbone(self) -> torch.nn.Module | None:
        """The module to hand past key/values to: ``None`` means the model's own forward takes them."""
        if cache_keyword(self.model):
            return None
        prefix = getattr(self.model, "base_model_prefix", None)
        backbone = getattr(self.model, prefix, None) if prefix else None
        if backbone is not None and cache_keyword(backbone):
            return backbone
        return None

    def check_model(self, config: PromptLearningConfig) -> None:
        if not cache_keyword(self.model) and self._backbone() is None:
            raise PeftkitError(
                f"{self.method_name} hands each attention layer past key/values, but {type(self.model).__name__}'s "
                "forward (and its backbone's) takes no KV cache (no cache or past_key_values argument). Use "
                "prompt_tuning or p_tuning (prompts as input embeddings) for this model."
            )
        if any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise PeftkitError(
                f"{self.method_name} does not work with activation checkpointing (the prefix lives in the KV "
                "cache): turn activation_checkpointing off"
            )
        if config.token_dim % config.num_attention_heads:
            raise PeftkitError(
                f"token_dim ({config.token_dim}) must be a multiple of num_attention_heads "
                f"({config.num_attention_heads}): the prefix is split into heads"
            )

    def past_key_values(self, batch_size: int) -> DynamicCache | EncoderDecoderCache:
        """The active adapter's prefix as a fresh cache for a batch of ``batch_size``."""
        config = self._config
        n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        table = self.prompt_encoder[self.active_adapter].table()  # (n, layers * 2 * token_dim)
        dtype = getattr(self.model, "dtype", table.dtype)
        kv = table.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)
        kv = kv.reshape(batch_size, n, layers * 2, heads, config.token_dim // heads)
        submodules = config.num_transformer_submodules
        if submodules == 2:
            kv = torch.cat([kv, kv], dim=2)
        per_layer = kv.permute(2, 0, 3, 1, 4).split(submodules * 2)  # each (2 * submodules, B, heads, n, hd)
        self_attention = DynamicCache([(chunk[0], chunk[1]) for chunk in per_layer])
        if submodules == 1:
            return self_attention
        # Encoder-decoder: only the decoder's self-attention gets the prefix; the cross-attention
        # cache starts empty so it is computed from the encoder output (PEFT's behaviour).
        cache = EncoderDecoderCache(self_attention, DynamicCache())
        for key in list(getattr(cache, "is_updated", {})):
            cache.is_updated[key] = False
        return cache

    def prompted_forward(self, config: PromptLearningConfig, kwargs: dict[str, Any]) -> Any:
        reference = kwargs["input_ids"] if kwargs["input_ids"] is not None else kwargs["inputs_embeds"]
        cache = self.past_key_values(reference.shape[0])
        n = config.num_virtual_tokens
        if config.task_type == TaskType.SEQ_2_SEQ_LM:
            kwargs["decoder_attention_mask"] = self._with_prefix_mask(kwargs.get("decoder_attention_mask"), n)
        else:
            kwargs["attention_mask"] = self._with_prefix_mask(kwargs["attention_mask"], n)
        backbone = self._backbone()
        if backbone is None:
            return self.model(**{cache_keyword(self.model): cache}, **kwargs)
        keyword = cache_keyword(backbone)

        def hand_over(module: torch.nn.Module, args: tuple, module_kwargs: dict) -> tuple[tuple, dict]:
            return args, {**module_kwargs, keyword: cache}

        handle = backbone.register_forward_pre_hook(hand_over, with_kwargs=True)
        try:
            return self.model(**kwargs)
        finally:
            handle.remove()

    def body_hidden_states(
        self, body: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.active_adapter is None:
            return super().body_hidden_states(body, input_ids, attention_mask)
        mask = self._with_prefix_mask(attention_mask, self._config.num_virtual_tokens)
        cache = self.past_key_values(input_ids.shape[0])
        return body(input_ids=input_ids, attention_mask=mask, use_cache=True, **{cache_keyword(body): cache})[
            0
        ]

    def _prepare_inputs_for_generation(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self._config.task_type != TaskType.SEQ_2_SEQ_LM:
            return super()._prepare_inputs_for_generation(original, *args, **kwargs)
        inputs = original(*args, **kwargs)
        key, cache = generation_cache(inputs, self.model)
        # The prefix goes into the decoder's self-attention cache before the first step, and before
        # every step that keeps no cache (use_cache=False: a cache handed back holds last step's
        # tokens, which this step recomputes).
        uncached = inputs.get("use_cache") is False
        empty = uncached or cache is None or cache.get_seq_length() == 0
        if kwargs.get("is_first_iteration") or empty:
            inputs[key] = self.past_key_values(inputs["decoder_input_ids"].shape[0])
        return inputs

    def inject_for_generation(
        self, config: PromptLearningConfig, inputs: dict[str, Any], ids: torch.Tensor
    ) -> None:
        for key in CACHE_KEYWORDS:  # generate's empty cache, under whichever name, is replaced
            inputs.pop(key, None)
        inputs[cache_keyword(self.model)] = self.past_key_values(ids.shape[0])
