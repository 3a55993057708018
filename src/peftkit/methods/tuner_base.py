"""The hooks ``PeftModel`` and the training loop call on every method's model, with their defaults.

Every registered ``model_cls`` derives from :class:`TunerBase` (directly, or through
``InjectedAdapterModel`` / ``SelectiveModel``). A method that needs more than "run the wrapped
model" overrides a hook instead of shared code asking for its name:

* ``forward`` / ``generate``   -- soft prompts prepend virtual tokens or past key/values
* ``body_hidden_states``       -- the training loss's fast path (see ``train/loss.py``)
* ``on_train_start``           -- learn the run's length (AdaLoRA's rank-budget schedule)
* ``regularization_loss``      -- an extra term added to each optimizer step's loss (AdaLoRA)
* ``on_optimizer_step``        -- after ``optimizer.step()``, before gradients are cleared
* ``training_state`` / ``load_training_state`` -- tensors a checkpoint must keep so that a
  resumed run continues exactly (AdaLoRA's sensitivity averages)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TunerBase(nn.Module):
    """Wraps the user's model as ``.model``; every hook defaults to "no change"."""

    model: nn.Module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def body_hidden_states(
        self, body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The last hidden states of the transformer ``body`` (the model minus its output layer),
        one per position of ``input_ids``: ``(batch, seq, hidden)``. Methods that add virtual
        positions must return only the real ones."""
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
