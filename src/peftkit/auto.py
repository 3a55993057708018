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
from typing import Any, ClassVar

from torch import nn

from peftkit.errors import ModelLoadError

# peftkit's loader task for each PEFT task_type that has a transformers auto class.
_TASK_OF_TYPE = {
    "CAUSAL_LM": "causal_lm",
    "SEQ_CLS": "seq_cls",
    "TOKEN_CLS": "token_cls",
    "SEQ_2_SEQ_LM": "seq2seq_lm",
}


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

    ``base_model`` overrides the recorded ``base_model_name_or_path``. ``task=None`` picks the
    head from the adapter's ``task_type`` (or, without one, its ``auto_mapping`` class).
    """
    from peftkit.cli._model_args import read_adapter_config
    from peftkit.models import ensure_pad_token, load_model_and_tokenizer, parse_dtype, resolve_model_dir

    config = read_adapter_config(adapter_dir)
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{adapter_dir}/adapter_config.json does not record base_model_name_or_path; "
            "pass the base model explicitly"
        )
    if task is None:
        task = _TASK_OF_TYPE.get(str(config.get("task_type") or ""))
    if task is not None:
        model, tokenizer = load_model_and_tokenizer(
            base, dtype=dtype, trust_remote_code=trust_remote_code, task=task, **model_kwargs
        )
    else:  # no task head recorded: rebuild the class PEFT wrote into auto_mapping
        import transformers

        model_cls = _auto_mapping_class(config)
        model_dir = resolve_model_dir(base)
        common = {"trust_remote_code": trust_remote_code}
        try:
            model = model_cls.from_pretrained(
                model_dir, dtype=parse_dtype(dtype), use_safetensors=True, **common, **model_kwargs
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, **common)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load base model {base}: {err}") from err
        ensure_pad_token(tokenizer)
        model.eval()
    return apply_saved_adapter(
        model,
        tokenizer,
        adapter_dir,
        is_trainable=is_trainable,
        adapter_name=adapter_name,
        trust_remote_code=trust_remote_code,
    )


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
        (the adapter's own if it saved one), call :func:`load_adapter_with_base`.
        """
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


class AutoPeftModel(_AutoPeftModelBase):
    """Head chosen from the adapter's ``task_type``, or its ``auto_mapping`` class without one."""

    _task = None


class AutoPeftModelForCausalLM(_AutoPeftModelBase):
    """The base model loaded as a causal LM (``AutoModelForCausalLM``)."""

    _task = "causal_lm"
