"""The hooks ``PeftModel`` and the training loop call on every method's model, with their defaults.

Every registered ``model_cls`` derives from :class:`TunerBase` (directly, or through
``InjectedAdapterModel`` / ``SelectiveModel``). A method that needs more than "run the wrapped
model" overrides a hook instead of shared code asking for its name:

* ``forward`` / ``generate``   -- soft prompts prepend virtual tokens or past key/values
* ``body_hidden_states``       -- the training loss's fast path (see ``train/loss.py``)
* ``supports_packing``         -- whether packed rows (``train/packing.py``) and a shared prompt
  prefix computed once (``train/shared_prefix.py``) keep their meaning
* ``supports_fsdp``            -- whether sharded training (``train/fsdp.py``) is tested for it
* ``on_train_start``           -- learn the run's length (AdaLoRA's rank-budget schedule)
* ``regularization_loss``      -- an extra term added to each optimizer step's loss (AdaLoRA)
* ``on_optimizer_step``        -- after ``optimizer.step()``, before gradients are cleared
* ``training_state`` / ``load_training_state`` -- tensors a checkpoint must keep so that a
  resumed run continues exactly (AdaLoRA's sensitivity averages)
* ``to_saved_tensors`` / ``from_saved_tensors`` -- when the file's tensors are not a renaming of
  the model's (soft prompts save the computed prompt table as ``prompt_embeddings``)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import PeftkitError


def check_adapter_name(adapter_name: Any) -> None:
    """Adapter names become state-dict path segments: non-empty strings without a '.'."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter names must be non-empty and contain no '.', got {adapter_name!r}")


class TunerBase(nn.Module):
    """Wraps the user's model as ``.model``; every hook defaults to "no change"."""

    model: nn.Module
    # Whether the method's layers wrap bitsandbytes-quantized linear layers correctly (QLoRA);
    # a training job with a `quantization` section is refused for methods that leave this False.
    supports_quantized_base: ClassVar[bool] = False
    # Whether ``unload(merge=True, ...)`` takes PEFT's ``safe_merge`` and ``adapter_names``; methods
    # that merge only the active adapter (or cannot merge at all) leave this False.
    merge_options: ClassVar[bool] = False

    # Whether ``forward`` / ``generate`` take ``adapter_names`` (one adapter per batch row, LoRA).
    supports_mixed_batches: ClassVar[bool] = False

    # Whether several examples may share one row with position_ids restarting per example
    # (training.packing), and whether a batch's shared prompt prefix may run once for all rows
    # (training.shared_prefix). True for methods that act on each token's activations or on
    # weights; methods that prepend virtual tokens or past key/values to a row leave it False.
    supports_packing: ClassVar[bool] = False

    # Whether training with ``distributed: fsdp`` (parameters sharded over ranks, gathered per
    # decoder layer) gives the single-process update. Methods whose training hooks read or rewrite
    # whole parameters between steps (AdaLoRA's rank allocation) leave it False.
    supports_fsdp: ClassVar[bool] = False

    def refuse_adapter_names(self, kwargs: dict[str, Any]) -> None:
        merged = getattr(self, "merged_adapters", None)  # set by methods that can merge_adapter()
        if kwargs.get("adapter_names") is not None and merged:
            raise PeftkitError(
                f"adapter_names (mixed-adapter batches) cannot be used while adapter(s) {', '.join(merged)} "
                "are merged into the weights: call unmerge_adapter() first"
            )
        if "adapter_names" in kwargs and not self.supports_mixed_batches:
            raise ValueError(
                f"{type(self).__name__} does not support adapter_names (mixed-adapter batches are LoRA "
                "only): run each adapter's rows separately with set_adapter()"
            )

    def can_mix_in_one_batch(self, adapter_names: Sequence[str]) -> bool:
        """Whether rows of these loaded adapters may share one ``adapter_names`` batch; callers
        run each adapter's rows as a group where they may not (``peftkit generate``)."""
        return self.supports_mixed_batches

    def check_new_adapter_name(self, adapter_name: Any) -> None:
        """``adapter_name`` is valid and not taken (``add_adapter`` calls this before changing anything)."""
        check_adapter_name(adapter_name)
        if adapter_name in getattr(self, "peft_config", {}):
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def body_hidden_states(
        self,
        body: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last hidden states of the transformer ``body`` (the model minus its output layer),
        one per position of ``input_ids``: ``(batch, seq, hidden)``. Methods that add virtual
        positions must return only the real ones. ``position_ids`` come only from packed SFT batches
        (no ``attention_mask``) and one-row preference pairs (with a 4D one, objectives/pair_layout.py),
        so only methods with ``supports_packing`` receive them."""
        if position_ids is not None:
            return body(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )[0]
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    def on_train_start(self, total_steps: int) -> None:
        """Called once before the first optimizer step with the run's total number of steps."""

    def regularization_loss(self) -> torch.Tensor | None:
        """A term added to the loss of every optimizer step (``None``: nothing to add)."""
        return None

    def on_optimizer_step(self, step: int) -> None:
        """Called after ``optimizer.step()`` for step ``step`` (1-based), gradients still present."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors (beyond the adapter's weights) that a checkpoint must keep for an exact resume."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no training state, but the checkpoint has {sorted(state)}"
            )

    def to_saved_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The tensors written to ``adapter_model.safetensors``, given those ``adapter_state_keys``
        selected (under their saved names, ``base_model.`` prefix included). Default: unchanged."""
        return tensors

    def as_plain_adapter(
        self, tensors: dict[str, torch.Tensor], config: dict[str, Any], initial: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """An adapter whose initialisation changed the base weights, rewritten for the unchanged
        base model: ``(tensors, adapter_config.json dict)``, given the tensors saved right after
        initialisation (``save_pretrained(path_initial_model_for_weight_conversion=...)``)."""
        raise PeftkitError(
            f"{getattr(self, 'method_name', type(self).__name__)} adapters cannot be converted with "
            "path_initial_model_for_weight_conversion: only LoRA adapters (PiSSA / OLoRA init) can"
        )

    def from_saved_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`to_saved_tensors`: a file's tensors under the saved names that
        ``adapter_state_keys`` gives (before loading). Default: unchanged."""
        return tensors


def acts_per_position(model: Any) -> bool:
    """Whether ``model`` (a plain model or a ``PeftModel``) computes each position from the tokens
    and the KV cache alone, so that a prompt's cache may be computed once and extended or shared:
    a plain model, or a method with ``supports_packing`` (no virtual tokens or past key/values of
    its own, which would clash with the cache)."""
    tuner = getattr(model, "base_model", None)
    return not isinstance(tuner, TunerBase) or bool(tuner.supports_packing)
