"""``AutoPeftModel*``: load a saved adapter together with the base model it records.

    adapter_dir/adapter_config.json ── base_model_name_or_path ──> base model (peftkit's loader:
        │                                                          aliases, local dirs, Hub ids)
        ├── tokenizer saved with the adapter? ── more tokens ──> base embeddings grown to fit
        └── adapter_model.safetensors ──> PeftModel.from_pretrained(base, adapter_dir)

One function, :func:`load_adapter_with_base`, does these steps; ``peftkit generate``/``chat``/
``merge`` and the ``AutoPeftModel*`` classes all call it, so they resize and check the same way.
``trust_remote_code`` is never switched on unless the caller passes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftkit.errors import ModelLoadError

# The transformers auto class that builds each PEFT task_type's head.
AUTO_CLASS_OF_TYPE = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# peftkit's loader task (``peftkit.models.TASKS``) for the task_types it has one for; the others
# are loaded with their auto class directly.
_TASK_OF_TYPE = {
    "CAUSAL_LM": "causal_lm",
    "SEQ_CLS": "seq_cls",
    "TOKEN_CLS": "token_cls",
    "QUESTION_ANS": "question_ans",
    "SEQ_2_SEQ_LM": "seq2seq_lm",
}
# Heads sized by the number of labels: a base model saved without the head (or with another
# label count) gets the count of the adapter's trained head copy.
_LABELLED_TYPES = ("SEQ_CLS", "TOKEN_CLS")


def apply_saved_adapter(
    model: nn.Module,
    tokenizer: Any,
    adapter_dir: str | os.PathLike,
    *,
    is_trainable: bool = False,
    adapter_name: str = "default",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)``: ``model`` wrapped with the adapter in ``adapter_dir``.

    If the adapter directory holds a tokenizer with another vocabulary size (training added
    tokens), that tokenizer is returned and ``model``'s embeddings are grown to it first.
    """
    from peftkit import PeftModel
    from peftkit.models import ensure_pad_token
    from peftkit.saved_embeddings import adapter_tokenizer

    saved = adapter_tokenizer(adapter_dir, model, trust_remote_code=trust_remote_code)
    if saved is not None and (tokenizer is None or len(saved) != len(tokenizer)):
        tokenizer = saved
        ensure_pad_token(tokenizer)
    peft_model = PeftModel.from_pretrained(
        model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable
    )
    return peft_model, tokenizer


def load_adapter_with_base(
    adapter_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    task: str | None = "causal_lm",
    dtype: Any = "float32",
    trust_remote_code: bool = False,
    is_trainable: bool = False,
    adapter_name: str = "default",
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """``(PeftModel, tokenizer)`` for the adapter in ``adapter_dir`` on its recorded base model.

    ``base_model`` overrides the recorded ``base_model_name_or_path``. ``task`` is a loader task
    (``"causal_lm"``) or a PEFT task_type (``"SEQ_CLS"``); ``None`` picks the head from the
    adapter's ``task_type`` (or, without one, its ``auto_mapping`` class). A classification head
    gets as many labels as the adapter's trained copy of it has, unless ``num_labels`` is given.
    """
    from peftkit.loading import read_adapter_config
    from peftkit.models import TASKS, load_model_and_tokenizer
    from peftkit.serialization import resolve_adapter_dir

    adapter_dir = resolve_adapter_dir(adapter_dir)
    config = read_adapter_config(adapter_dir)
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{adapter_dir}/adapter_config.json does not record base_model_name_or_path; "
            "pass the base model explicitly"
        )
    task_type = _task_type(task if task is not None else config.get("task_type"))
    if task_type is None:  # no task head recorded: rebuild the class PEFT wrote into auto_mapping
        model, tokenizer = _load_with_class(
            base, _auto_mapping_class(config), dtype, trust_remote_code, model_kwargs
        )
    else:
        import transformers

        auto_cls = getattr(transformers, AUTO_CLASS_OF_TYPE[task_type])
        if task_type in _LABELLED_TYPES and "num_labels" not in model_kwargs:
            num_labels = saved_num_labels(adapter_dir, base, auto_cls, trust_remote_code=trust_remote_code)
            if num_labels is not None:
                model_kwargs["num_labels"] = num_labels
        loader_task = _TASK_OF_TYPE.get(task_type)
        if loader_task in TASKS:
            model, tokenizer = load_model_and_tokenizer(
                base, dtype=dtype, trust_remote_code=trust_remote_code, task=loader_task, **model_kwargs
            )
        else:
            model, tokenizer = _load_with_class(base, auto_cls, dtype, trust_remote_code, model_kwargs)
    return apply_saved_adapter(
        model,
        tokenizer,
        adapter_dir,
        is_trainable=is_trainable,
        adapter_name=adapter_name,
        trust_remote_code=trust_remote_code,
    )


def _task_type(task: str | None) -> str | None:
    """The PEFT task_type meant by ``task``: a task_type itself, or peftkit's loader task name."""
    if task is None or task == "":
        return None
    text = str(getattr(task, "value", task))
    if text.upper() in AUTO_CLASS_OF_TYPE:
        return text.upper()
    for task_type, loader_task in _TASK_OF_TYPE.items():
        if loader_task == text:
            return task_type
    raise ModelLoadError(
        f"unknown task {task!r}: use a task_type ({', '.join(AUTO_CLASS_OF_TYPE)}) "
        f"or a loader task ({', '.join(_TASK_OF_TYPE.values())})"
    )


def _load_with_class(
    base: str | os.PathLike,
    model_cls: type,
    dtype: Any,
    trust_remote_code: bool,
    model_kwargs: dict[str, Any],
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``base`` loaded with the transformers class ``model_cls`` (eval mode)."""
    import transformers
    from safetensors import SafetensorError

    from peftkit.models import ensure_pad_token, parse_dtype, resolve_model_dir, unreadable_weights

    model_dir = resolve_model_dir(base)
    common = {"trust_remote_code": trust_remote_code}
    try:
        model = model_cls.from_pretrained(
            model_dir, dtype=parse_dtype(dtype), use_safetensors=True, **common, **model_kwargs
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, **common)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load base model {base}: {err}") from err
    except SafetensorError as err:  # a weights file cut short, as load_model_and_tokenizer reports it
        raise unreadable_weights(model_dir, err) from err
    ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def saved_num_labels(
    adapter_dir: str | os.PathLike,
    base: str | os.PathLike,
    auto_cls: type,
    *,
    trust_remote_code: bool = False,
) -> int | None:
    """The label count of the head saved in ``adapter_dir``, where it differs from the one ``base``
    would get from its config (``None``: they agree, or the adapter saved no head).

    transformers builds a classification head from ``config.num_labels`` (2 when the base model
    was saved without one), so an adapter whose head copy has 5 rows would not load. The head is
    found by comparing the file's tensor shapes with a weightless (meta device) copy of the model.
    """
    import torch
    import transformers
    from safetensors import SafetensorError, safe_open

    from peftkit.models import resolve_model_dir
    from peftkit.serialization import WEIGHTS_NAME, unreadable_safetensors

    weights = Path(adapter_dir) / WEIGHTS_NAME
    if not weights.is_file():
        return None  # load_adapter_weights reports it
    try:
        with safe_open(str(weights), framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except SafetensorError as err:
        raise unreadable_safetensors(weights, err) from err
    model_config = transformers.AutoConfig.from_pretrained(
        resolve_model_dir(base), trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        skeleton = auto_cls.from_config(model_config, trust_remote_code=trust_remote_code)
    params = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    found = set()
    for key, shape in shapes.items():
        # LoRA-style files: base_model.model.<name>; soft prompts: base_model.<name>
        name = next(
            (key[len(p) :] for p in ("base_model.model.", "base_model.") if key[len(p) :] in params), None
        )
        if name is None or shape == params[name] or not shape:
            continue
        want = params[name]
        if want[0] == model_config.num_labels and shape[1:] == want[1:]:
            found.add(shape[0])
    return found.pop() if len(found) == 1 else None


def _auto_mapping_class(config: dict[str, Any]) -> type:
    """The transformers class recorded in ``auto_mapping`` (``AutoModel`` when none is).

    Only classes transformers itself exports are accepted: importing a module named in a
    downloaded file would run code from it.
    """
    import transformers

    mapping = config.get("auto_mapping") or {}
    name = mapping.get("base_model_class") or "AutoModel"
    library = str(mapping.get("parent_library") or "transformers")
    if not library.startswith("transformers") or not hasattr(transformers, name):
        raise ModelLoadError(
            f"adapter_config.json names base class {library}.{name}, which is not a transformers class; "
            "load the base model yourself and use PeftModel.from_pretrained(model, adapter_dir)"
        )
    return getattr(transformers, name)


class _AutoPeftModelBase:
    """``from_pretrained(adapter_dir, **kwargs)`` -> the adapter's ``PeftModel`` on its base model."""

    _task: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"use {type(self).__name__}.from_pretrained(adapter_dir)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        base_model: str | os.PathLike | None = None,
        dtype: Any = "float32",
        trust_remote_code: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Load the base model recorded in ``adapter_config.json`` and apply the adapter.

        ``model_kwargs`` go to the base model's ``from_pretrained``. To get the tokenizer too
        (the adapter's own if it saved one), call :func:`load_adapter_with_base`. An adapter
        trained for another task type is refused, as PEFT does.
        """
        cls._check_task_type(pretrained_model_name_or_path)
        model, _ = load_adapter_with_base(
            pretrained_model_name_or_path,
            base_model=base_model,
            task=cls._task,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            is_trainable=is_trainable,
            adapter_name=adapter_name,
            **model_kwargs,
        )
        return model

    @classmethod
    def _check_task_type(cls, adapter_dir: str | os.PathLike) -> None:
        from peftkit.loading import read_adapter_config
        from peftkit.serialization import resolve_adapter_dir

        wanted = _task_type(cls._task)
        saved = read_adapter_config(resolve_adapter_dir(adapter_dir)).get("task_type")
        if wanted is None or saved is None or _task_type(saved) == wanted:
            return
        right = [c.__name__ for c in _AutoPeftModelBase.__subclasses__() if _task_type(c._task) == saved]
        raise ModelLoadError(
            f"{adapter_dir} holds an adapter for task_type {saved}, not {wanted}: load it with "
            f"{(right or ['AutoPeftModel'])[0]}.from_pretrained (or AutoPeftModel, which reads the task type)"
        )


class AutoPeftModel(_AutoPeftModelBase):
    """Head chosen from the adapter's ``task_type``, or its ``auto_mapping`` class without one."""

    _task = None


class AutoPeftModelForCausalLM(_AutoPeftModelBase):
    """The base model loaded as a causal LM (``AutoModelForCausalLM``)."""

    _task = "causal_lm"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModelBase):
    """The base model loaded as an encoder-decoder LM (``AutoModelForSeq2SeqLM``)."""

    _task = "SEQ_2_SEQ_LM"


class AutoPeftModelForSequenceClassification(_AutoPeftModelBase):
    """The base model loaded with a sequence classification head, sized like the adapter's."""

    _task = "SEQ_CLS"


class AutoPeftModelForTokenClassification(_AutoPeftModelBase):
    """The base model loaded with a token classification head, sized like the adapter's."""

    _task = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(_AutoPeftModelBase):
    """The base model loaded with an extractive QA head (``AutoModelForQuestionAnswering``)."""

    _task = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(_AutoPeftModelBase):
    """The base model loaded without a head (``AutoModel``), for hidden states / embeddings."""

    _task = "FEATURE_EXTRACTION"
