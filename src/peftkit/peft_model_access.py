"""What a ``PeftModel`` passes on to the model it wraps, and what it refuses to.

PEFT's ``PeftModel`` hands any attribute it lacks on to the wrapped model, so code written for
PEFT calls ``peft_model.num_parameters()``, ``.can_generate()`` or ``.resize_token_embeddings()``.
peftkit does the same, with exceptions so that nothing reaches into the wrong object:

- names with double underscores (``__deepcopy__``, ...) are never passed on: copying or pickling
  the wrapper must not copy only the model inside it;
- transformers methods whose meaning changes under an adapter are refused, with what to call
  instead (``push_to_hub`` would upload the whole base model; transformers' own adapter methods
  expect PEFT's layer classes);
- a name neither object has raises an ``AttributeError`` that names both classes.

The attributes PEFT users reach most (``config``, ``device``, checkpointing, ...) are spelled out
below; the rest goes through ``__getattr__``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# transformers methods that mean something else on a model with peftkit adapters.
REFUSED = {
    "push_to_hub": "peftkit does not upload: save_pretrained(directory), then upload that directory "
    "(e.g. `hf upload <repo> <directory>`)",
    "enable_adapters": "use enable_adapter_layers()",
    "disable_adapters": "use disable_adapter_layers(), or `with model.disable_adapter():` for a block",
    "get_adapter_state_dict": "use peftkit.get_peft_model_state_dict(model, adapter_name=...)",
}


class WrappedModelAccess:
    """The part of ``PeftModel`` that reads through to the wrapped model (``get_base_model()``)."""

    # transformers' flag for "adapters are attached to this model". Trainer reads it (with
    # ``is_quantized``, which comes from the wrapped model) to refuse training a purely quantized
    # model; it recognises PEFT's own wrapper by class, so without this a QLoRA model raised
    # "You cannot perform fine-tuning on purely quantized models".
    _hf_peft_config_loaded = True

    def get_base_model(self) -> nn.Module:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module: parameters, buffers, submodules
        except AttributeError:
            if name == "base_model" or name.startswith("__"):
                raise  # base_model: not built yet (inside __init__ or unpickling)
            if name in REFUSED:
                raise AttributeError(
                    f"{type(self).__name__} does not pass {name} on to the base model: {REFUSED[name]}"
                ) from None
            base = self.get_base_model()
            try:
                return getattr(base, name)
            except AttributeError:
                raise AttributeError(
                    f"{type(self).__name__} object has no attribute {name!r}, nor has its base model "
                    f"({type(base).__name__})"
                ) from None

    @property
    def config(self) -> Any:
        return self.get_base_model().config

    @property
    def generation_config(self) -> Any:
        return self.get_base_model().generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        # Seq2SeqTrainer(args=Seq2SeqTrainingArguments(generation_config=...)) and TRL assign
        # model.generation_config; the wrapped model's generate() is the one that reads it.
        self.get_base_model().generation_config = value

    @property
    def device(self) -> torch.device:
        base = self.get_base_model()
        return base.device if hasattr(base, "device") else next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        base = self.get_base_model()
        return base.dtype if hasattr(base, "dtype") else next(self.parameters()).dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.get_base_model().get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.get_base_model().get_output_embeddings()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.get_base_model().modules())

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **options: Any
    ) -> None:
        """Recompute activations in backward, and let inputs require grad: with frozen embeddings,
        reentrant checkpointing would otherwise see no input needing grad and drop the adapters' grads.

        ``options`` go to the wrapped model as they are: ``Trainer(args=TrainingArguments(
        gradient_checkpointing=True))`` in transformers 5.2x passes ``every_n_layers`` and ``offload``.
        """
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs, **options)
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **options
            )
        self.enable_input_require_grads()

    def activation_checkpointing_disable(self) -> None:
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **options: Any
    ) -> None:
        """The older transformers name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        self.get_base_model().enable_input_require_grads()

    def disable_input_require_grads(self) -> None:
        self.get_base_model().disable_input_require_grads()
