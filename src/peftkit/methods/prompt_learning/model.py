"""The model wrapper every soft-prompt method shares.

    PromptLearningModel
      ├─ model                      the user's model, untouched (modules_to_save wrapped, if any)
      └─ prompt_encoder             nn.ModuleDict: adapter name -> encoder
            └─ default              .embedding (+ an MLP/LSTM while training a reparameterized one)

    input prompts (prompt tuning, P-tuning):     [P1 .. Pn | x1 .. xL]  -> model(inputs_embeds=...)
    prefix (prefix tuning, P-tuning v2):         KV cache = K/V of P1 .. Pn in every layer

Nothing is injected into the model's layers, so everything a method does happens in this
class's hooks: ``forward``, ``generate`` (a patched ``prepare_inputs_for_generation``, as PEFT
does, so the KV cache works), ``body_hidden_states`` (the training loss's fast path, real
positions only) and the two serialization hooks. The forward semantics are PEFT's: CAUSAL_LM
logits include the virtual positions; a seq2seq model gets the prompt in front of its encoder
input; labels of virtual positions are -100.

Files are PEFT's: ``adapter_model.safetensors`` holds ``prompt_embeddings``, the computed prompt
table (for a reparameterized encoder: its output, not its weights), and the classifier of
``modules_to_save`` under ``base_model.<name>``. PEFT keeps the encoder on ``PeftModel`` itself
(``prompt_encoder.default.…``); here it sits one level down (``base_model.prompt_encoder.…``)
because ``PeftModel.base_model`` is always the method's model. Counts and files are the same.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import ModelLoadError, PeftkitError
from peftkit.methods.base import TaskType
from peftkit.methods.modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from peftkit.methods.prompt_learning.config import PromptLearningConfig
from peftkit.methods.targeting import replace_module
from peftkit.methods.tuner_base import TunerBase
from peftkit.transformers_compat import generation_cache

SUPPORTED_TASKS = tuple(TaskType)
# Tasks whose inputs keep BERT-style token type ids (zeros in front for the virtual tokens), as in PEFT.
TOKEN_TYPE_TASKS = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS)
LM_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)  # the ones that generate
PREFIX = "base_model."  # PeftModel's name for this module


def word_embeddings(model: nn.Module, method: str) -> nn.Embedding:
    """The model's token embedding table, or an error saying why soft prompts cannot work."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise PeftkitError(
            f"{method} needs a text model with token embeddings (get_input_embeddings() returning nn.Embedding), "
            f"but {type(model).__name__} has none: soft prompts are virtual tokens, so they work only on "
            "language models (causal LM, seq2seq, BERT-style encoders). Use LoRA or IA3 for this model."
        )
    return embeddings


class PromptLearningModel(TunerBase):
    """Holds one prompt encoder per adapter; subclasses say how prompts enter the model."""

    method_name: ClassVar[str] = "soft prompts"
    config_cls: ClassVar[type[PromptLearningConfig]] = PromptLearningConfig
    uses_past_key_values: ClassVar[bool] = False  # prefix methods: prompts are past key/values

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter: str | None = adapter_name
        word_embeddings(model, self.method_name)
        self.add_adapter(adapter_name, config)

    # -- what subclasses provide ------------------------------------------------------------

    def build_encoder(self, config: PromptLearningConfig, embeddings: nn.Embedding) -> nn.Module:
        """The prompt encoder for ``config``: a module with ``embedding`` and ``table()``."""
        raise NotImplementedError

    def check_model(self, config: PromptLearningConfig) -> None:
        """Raise if this method cannot work on ``self.model`` (prefix methods check past key/values)."""

    # -- adapters ----------------------------------------------------------------------------

    @classmethod
    def targetable_modules(cls, model: nn.Module) -> list[str]:
        """The token embedding table: where virtual tokens live (``peftkit inspect``)."""
        try:
            embeddings = word_embeddings(model, cls.method_name)
        except PeftkitError:
            return []
        return [name for name, module in model.named_modules() if module is embeddings][:1]

    def add_adapter(self, adapter_name: str, config: PromptLearningConfig) -> None:
        self.check_new_adapter_name(adapter_name)
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        if config.task_type not in SUPPORTED_TASKS:
            raise PeftkitError(
                f"{self.method_name} needs task_type set to one of {', '.join(t.value for t in SUPPORTED_TASKS)} "
                f"(it decides where the prompt goes), got {config.task_type!r}"
            )
        config = dataclasses.replace(config)  # filled in below; the caller's object stays as it was
        config.fill_from_model(getattr(self.model, "config", None))
        self.check_model(config)
        embeddings = word_embeddings(self.model, self.method_name)
        encoder = self.build_encoder(config, embeddings)
        self.prompt_encoder[adapter_name] = encoder.to(embeddings.weight.device)
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
            self._set_wrappers(self.active_adapter)
        self.peft_config[adapter_name] = config

    def _wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def _set_wrappers(self, adapter_name: str | None) -> None:
        for _, wrapper in self._wrappers():
            wrapper.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str | None) -> None:
        if adapter_name is not None and adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        self.active_adapter = adapter_name
        self._set_wrappers(adapter_name)

    def adapter_state_keys(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.peft_config:
            return {}
        keys = {
            f"prompt_encoder.{key}": f"prompt_encoder.{adapter_name}.{key}"
            for key in self.prompt_encoder[adapter_name].state_dict()
        }
        for name, wrapper in self._wrappers():
            for saved, own in wrapper.adapter_params(adapter_name).items():
                keys[f"model.{name}.{saved}"] = f"model.{name}.{own}"
        return keys

    def unload(self, merge: bool) -> nn.Module:
        if merge:
            raise PeftkitError(
                f"{self.method_name} cannot be merged: it learns virtual tokens, not changes to the model's "
                "weights, so there is nothing to fold into them. Keep the PeftModel to use the prompt, or call "
                "unload() to get the base model back without it."
            )
        for name, wrapper in self._wrappers():
            replace_module(self.model, name, wrapper.unwrap(merge=False))
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config.clear()
        self.active_adapter = None
        return self.model

    # -- files: PEFT's prompt_embeddings -----------------------------------------------------

    def to_saved_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Encoder weights -> ``prompt_embeddings`` (the table it computes); heads under ``base_model.``."""
        out = {}
        for key, value in tensors.items():
            if key.startswith(PREFIX + "prompt_encoder."):
                continue
            out[PREFIX + key.removeprefix(PREFIX + "model.")] = value  # PEFT: base_model is the user's model
        # computed with autograd on, as PEFT does: under no_grad the LSTM takes another kernel (~1e-5 off)
        out["prompt_embeddings"] = self.prompt_encoder[adapter_name].table().detach()
        return out

    def from_saved_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in tensors.items():
            if key == "prompt_embeddings":
                if not self.prompt_encoder[adapter_name].is_table:
                    raise ModelLoadError(
                        f"a saved {self.method_name} adapter holds only the computed prompt table "
                        "(prompt_embeddings); the trainable encoder that produced it cannot be rebuilt from it. "
                        "Load it for inference (is_trainable=False, as PEFT requires for soft prompts), or train "
                        "a new adapter."
                    )
                out[PREFIX + "prompt_encoder.embedding.weight"] = value
            elif key.startswith(PREFIX):
                out[PREFIX + "model." + key.removeprefix(PREFIX)] = value
            else:
                out[key] = value  # reported as unexpected by the caller
        return out

    # -- prompts -----------------------------------------------------------------------------

    @property
    def _config(self) -> PromptLearningConfig:
        return self.peft_config[self.active_adapter]

    def prompts(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The active adapter's virtual token embeddings: ``(batch, total_virtual_tokens, token_dim)``."""
        table = self.prompt_encoder[self.active_adapter].table()  # (total, dim)
        return table.unsqueeze(0).expand(batch_size, -1, -1).to(dtype)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if inputs_embeds is not None:
            return inputs_embeds
        return word_embeddings(self.model, self.method_name)(input_ids)

    @staticmethod
    def _with_prefix_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """``mask`` with ``n`` ones in front (virtual positions are always attended to)."""
        if mask is None:
            return None
        if mask.dim() != 2:
            raise PeftkitError(
                "soft prompts need a 2-D attention mask (batch, seq); got a {mask.dim()}-D one"
            )
        return torch.cat((mask.new_ones(mask.shape[0], n), mask), dim=1)

    def _adjust_kwargs(self, config: PromptLearningConfig, kwargs: dict[str, Any]) -> None:
        """PEFT's rules for position and token type ids (in place)."""
        if kwargs.get("position_ids") is not None:
            if self.uses_past_key_values:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                warnings.warn(
                    "position ids are not supported with prompt tuning/P-tuning; ignoring them", stacklevel=3
                )
                kwargs["position_ids"] = None
        if config.task_type not in TOKEN_TYPE_TASKS and kwargs.get("token_type_ids") is not None:
            warnings.warn("token type ids are not supported with soft prompts; ignoring them", stacklevel=3)
            kwargs["token_type_ids"] = None

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **kwargs}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        if self.active_adapter is None:
            return self.model(**kwargs)
        config = self._config
        self._adjust_kwargs(config, kwargs)
        return self.prompted_forward(config, kwargs)

    def prompted_forward(self, config: PromptLearningConfig, kwargs: dict[str, Any]) -> Any:
        """Input prompts (prompt tuning / P-tuning): virtual token embeddings go in front of the input."""
        n = config.num_virtual_tokens
        embeds = self._embed(kwargs.pop("input_ids"), kwargs.pop("inputs_embeds", None))  # (B, L, D)
        batch = embeds.shape[0]
        prompts = self.prompts(batch, embeds.dtype)  # (B, total, D)
        kwargs["attention_mask"] = self._with_prefix_mask(kwargs["attention_mask"], n)
        if config.task_type == TaskType.CAUSAL_LM and kwargs["labels"] is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat((labels.new_full((batch, n), -100), labels), dim=1)
        if config.task_type in TOKEN_TYPE_TASKS and kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat((types.new_zeros(batch, n), types), dim=1)
        # seq2seq: only the first n rows (the encoder's); the decoder's half stays unused, as in PEFT
        return self.model(inputs_embeds=torch.cat((prompts[:, :n], embeds), dim=1), **kwargs)

    def body_hidden_states(
        self, body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.active_adapter is None:
            return super().body_hidden_states(body, input_ids, attention_mask)
        n = self._config.num_virtual_tokens
        embeds = self._embed(input_ids, None)
        embeds = torch.cat((self.prompts(embeds.shape[0], embeds.dtype)[:, :n], embeds), dim=1)
        mask = self._with_prefix_mask(attention_mask, n)
        hidden = body(inputs_embeds=embeds, attention_mask=mask, use_cache=False)[0]  # (B, n + L, H)
        return hidden[:, n:]

    # -- generation --------------------------------------------------------------------------

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.active_adapter is None:
            return self.model.generate(*args, **kwargs)
        config = self._config
        if config.task_type not in LM_TASKS:
            raise PeftkitError(
                f"generate needs a language model; this adapter is for {config.task_type.value}"
            )
        if args:  # generate(input_ids) positionally
            kwargs["input_ids"], args = args[0], args[1:]
        if config.task_type == TaskType.SEQ_2_SEQ_LM and not self.uses_past_key_values:
            return self._generate_seq2seq_with_prompts(config, *args, **kwargs)
        model = self.model
        had_own = "prepare_inputs_for_generation" in model.__dict__
        original = model.prepare_inputs_for_generation
        model.prepare_inputs_for_generation = functools.partial(self._prepare_inputs_for_generation, original)
        try:
            return model.generate(*args, **kwargs)
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def _generate_seq2seq_with_prompts(self, config: PromptLearningConfig, *args: Any, **kwargs: Any) -> Any:
        """Encoder-decoder: the prompt goes in front of the encoder input once; decoding is unchanged."""
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise PeftkitError("generate with soft prompts needs input_ids")
        kwargs.pop("encoder_outputs", None)
        self._adjust_kwargs(config, kwargs)
        embeds = self._embed(input_ids, None)
        n = config.num_virtual_tokens
        kwargs["inputs_embeds"] = torch.cat(
            (self.prompts(embeds.shape[0], embeds.dtype)[:, :n], embeds), dim=1
        )
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._with_prefix_mask(kwargs["attention_mask"], n)
        return self.model.generate(*args, **kwargs)

    def _prepare_inputs_for_generation(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Decoder-only generation (PEFT's rule): on the step that fills an empty cache (every step
        without a cache) the virtual tokens are prepended; later steps see them through the cache."""
        config = self._config
        n = config.num_virtual_tokens
        inputs = original(*args, **kwargs)
        key, cache = generation_cache(inputs, self.model)
        if inputs.get("use_cache") is False:  # a prefix handed in comes back as a cache: start afresh
            inputs.pop(key, None)
            cache = None
        empty = cache is None or cache.get_seq_length() == 0
        ids = inputs.get("input_ids")
        if ids is None:
            raise PeftkitError("generate with soft prompts needs input_ids, not inputs_embeds")
        if not empty and cache.get_seq_length() >= ids.shape[1]:
            inputs["input_ids"] = ids = ids[:, -1:]
        mask = inputs.get("attention_mask")
        if isinstance(mask, dict):
            raise PeftkitError("soft prompts need a 2-D attention mask during generation")
        inputs["attention_mask"] = self._with_prefix_mask(mask, n)
        if not self.uses_past_key_values:  # generate's own positions: dropped silently, as PEFT drops them
            inputs.pop("position_ids", None)
        self._adjust_kwargs(config, inputs)
        if empty:
            self.inject_for_generation(config, inputs, ids)
        return inputs

    def inject_for_generation(
        self, config: PromptLearningConfig, inputs: dict[str, Any], ids: torch.Tensor
    ) -> None:
        """Put the prompt into the first step's inputs (input prompts: as embeddings)."""
        embeds = self._embed(ids, None)
        inputs["inputs_embeds"] = torch.cat((self.prompts(ids.shape[0], embeds.dtype), embeds), dim=1)
        inputs["input_ids"] = None
