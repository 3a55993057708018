"""The ``PeftModelFor<Task>`` classes: a ``PeftModel`` per model head, as PEFT names them.

    TaskType               class                                  trains the fresh head
    CAUSAL_LM              PeftModelForCausalLM                   -
    SEQ_2_SEQ_LM           PeftModelForSeq2SeqLM                  -
    SEQ_CLS                PeftModelForSequenceClassification     classifier, score
    TOKEN_CLS              PeftModelForTokenClassification        classifier, score
    QUESTION_ANS           PeftModelForQuestionAnswering          qa_outputs
    FEATURE_EXTRACTION     PeftModelForFeatureExtraction          -

Names, forward signatures and the head rule are PEFT's: a classification head is created with
random weights when the base model is loaded, so an adapter that did not train it would be
useless. PEFT therefore appends the head's module names to the config's ``modules_to_save``
(for every config that has that field, soft prompts included) before the adapter is injected,
and again in ``add_adapter``. Here the config decides what that means for its method
(:meth:`PeftConfig.with_modules_to_save`: full fine-tuning already trains the head), and the
names are added only when the model has such a module, so a model without one (a custom head)
is not refused; the names already present are not repeated (PEFT appends duplicates).

:data:`TASK_MODEL_CLASSES` is the one table ``get_peft_model``, ``PeftModel.from_pretrained``
and the ``AutoPeftModelFor<Task>`` classes use.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.forward_signature import wrapped_signature
from peftkit.methods.base import PeftConfig, TaskType
from peftkit.peft_model import PeftModel


class _TaskModel(PeftModel):
    """The forward every task class shares: PEFT's keyword arguments (``input_ids``,
    ``attention_mask``, ``inputs_embeds``, ``labels``, ``decoder_input_ids``, ``token_type_ids``,
    ``start_positions``, ``output_hidden_states``, ...) go to the model as given.

    The class's signature names the task's labels (``transformers.Trainer`` finds them there);
    an instance's ``forward`` shows the wrapped model's parameters (``forward_signature``).
    Keywords left at ``None`` are not passed on, so the model's own defaults apply (a custom
    ``nn.Module`` need not accept ``output_attentions``); positional arguments keep the wrapped
    model's own order. ``task_ids`` selects a task in PEFT's multitask methods (Poly, multitask
    prompt tuning), which peftkit does not implement, and is refused.
    """

    @wrapped_signature
    def forward(
        self, *args: Any, labels: Any = None, task_ids: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        return self._forward(args, {"labels": labels, **kwargs}, task_ids)

    def _forward(self, args: tuple, kwargs: dict[str, Any], task_ids: torch.Tensor | None) -> Any:
        if task_ids is not None:
            raise ValueError(
                "task_ids selects a task in PEFT's multitask methods (Poly, multitask prompt tuning), which "
                "peftkit does not implement: remove task_ids"
            )
        self.base_model.refuse_adapter_names(kwargs)
        return self.base_model(*args, **{k: v for k, v in kwargs.items() if v is not None})


class _GenerativeModel(_TaskModel):
    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class _TaskHeadModel(_TaskModel):
    """A ``PeftModel`` whose task has a freshly initialised head that must train with the adapter."""

    # Module names (suffixes, as in modules_to_save) of the head this task's models have.
    TASK_HEADS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"):
        # Before injecting: the head must be in modules_to_save so that no adapter targets it.
        super().__init__(model, self._with_task_head(model, peft_config), adapter_name)
        self.cls_layer_name = next(
            (name for name, _ in self.get_base_model().named_children() if name in self.TASK_HEADS), None
        )

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        super().add_adapter(adapter_name, self._with_task_head(self.get_base_model(), peft_config))

    @classmethod
    def _with_task_head(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """``config`` with the task head trained (PEFT's names, all of them, as PEFT writes them)."""
        with_heads = config.with_modules_to_save(list(cls.TASK_HEADS))
        names = [name for name, _ in model.named_modules() if name]
        if any(name.endswith(head) for name in names for head in cls.TASK_HEADS):
            return with_heads
        # No such module: adding the names would make modules_to_save match nothing (an error).
        if with_heads is not config and not getattr(config, "modules_to_save", None):
            warnings.warn(
                f"{type(model).__name__} has no {' / '.join(cls.TASK_HEADS)} module, so no task head is "
                "trained with the adapter; name your head in modules_to_save if it has another name",
                stacklevel=3,
            )
        return config


class PeftModelForCausalLM(_GenerativeModel):
    """A ``PeftModel`` for decoder-only language models (``TaskType.CAUSAL_LM``)."""


class PeftModelForSeq2SeqLM(_GenerativeModel):
    """A ``PeftModel`` for encoder-decoder language models such as T5 (``TaskType.SEQ_2_SEQ_LM``)."""


class PeftModelForSequenceClassification(_TaskHeadModel):
    """A ``PeftModel`` for sequence classification (``TaskType.SEQ_CLS``); the head (``classifier``
    in BERT-style models, ``score`` in decoder-only ones) trains in full with the adapter."""

    TASK_HEADS = ("classifier", "score")


class PeftModelForTokenClassification(_TaskHeadModel):
    """A ``PeftModel`` for token classification such as NER (``TaskType.TOKEN_CLS``); the head
    (``classifier`` / ``score``) trains in full with the adapter."""

    TASK_HEADS = ("classifier", "score")


class PeftModelForQuestionAnswering(_TaskHeadModel):
    """A ``PeftModel`` for extractive question answering (``TaskType.QUESTION_ANS``): span start and
    end logits; the ``qa_outputs`` head trains in full with the adapter.

    Unlike PEFT 0.21, which accepts ``token_type_ids`` and ``position_ids`` here but does not pass
    them on, they reach the model (BERT's segment ids matter for question + context inputs).
    """

    TASK_HEADS = ("qa_outputs",)

    @wrapped_signature
    def forward(
        self,
        *args: Any,
        start_positions: Any = None,
        end_positions: Any = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        spans = {"start_positions": start_positions, "end_positions": end_positions}
        return self._forward(args, {**spans, **kwargs}, task_ids)


class PeftModelForFeatureExtraction(_TaskModel):
    """A ``PeftModel`` for models without a task head, used for their hidden states / embeddings
    (``TaskType.FEATURE_EXTRACTION``)."""

    @wrapped_signature
    def forward(self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self._forward(args, kwargs, task_ids)


# The PeftModel class for each task type; a config without a task type uses PeftModel itself.
TASK_MODEL_CLASSES: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def model_class_for(task_type: TaskType | str | None) -> type[PeftModel]:
    """The ``PeftModel`` class for ``task_type`` (``PeftModel`` for none)."""
    if task_type is None:
        return PeftModel
    return TASK_MODEL_CLASSES[TaskType(task_type)]
