"""Full embedding weights saved next to an adapter (PEFT's ``save_embedding_layers``).

An adapter file normally holds only adapter tensors. Two situations need the base model's
embedding matrices too, and PEFT then writes them under their model names:

    target_modules has embed_tokens / lm_head     base_model.model.model.embed_tokens.base_layer.weight
    the vocabulary was resized (new tokens)       base_model.model.model.embed_tokens.weight
                                                  base_model.model.lm_head.weight

``save_embedding_layers="auto"`` (PEFT's default) saves them in exactly those cases: when an
embedding layer is a LoRA target (unless ``trainable_token_indices`` is used, whose point is a
small file), or when the model's ``config.vocab_size`` differs from the base model's recorded
one. Loading copies such tensors into the base model; if its vocabulary has another size the
error names both sizes, since the base model must be resized first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.errors import ModelLoadError

if TYPE_CHECKING:
    from peftkit.peft_model import PeftModel

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names, matched against target_modules


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT's model key -> file key rule: drop ``.<adapter>`` at the end or before the last part."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    head, _, suffix = key.rpartition(".")
    return f"{re.sub(re.escape(f'.{adapter_name}') + '$', '', head)}.{suffix}"


def embedding_is_targeted(model: PeftModel, config: Any) -> bool:
    """Whether ``config.target_modules`` names an embedding layer (PEFT's test, list or regex)."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        return any(
            re.fullmatch(targets, name) and re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", name)
            for name, _ in model.get_base_model().named_modules()
        )
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _vocab_size(config: Any) -> int | None:
    if isinstance(config, dict):
        return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return getattr(config, "vocab_size", None)


def base_vocab_size(name_or_path: str | None) -> int | None:
    """``vocab_size`` from the base model's ``config.json`` where it can be found offline, else None."""
    if not name_or_path:
        return None
    candidates = [Path(name_or_path) / "config.json"]
    from peftkit.model_aliases import ALIASES, converted_dir

    if name_or_path in ALIASES:
        candidates.append(converted_dir(ALIASES[name_or_path]) / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(cached, str):
            candidates.append(Path(cached))
    except Exception:  # not a valid repo id: nothing cached under it
        pass
    for path in candidates:
        if path.is_file():
            try:
                return _vocab_size(json.loads(path.read_text()))
            except ValueError:
                return None
    return None


def saves_embeddings(model: PeftModel, adapter_name: str, save_embedding_layers: bool | str) -> bool:
    """PEFT's decision for ``save_embedding_layers`` (True, False or "auto")."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(
            f"save_embedding_layers must be true, false or 'auto', got {save_embedding_layers!r}"
        )
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    config = model.peft_config[adapter_name]
    if embedding_is_targeted(model, config) and getattr(config, "trainable_token_indices", None) is None:
        return True
    vocab = _vocab_size(getattr(model.get_base_model(), "config", None))
    base = base_vocab_size(getattr(config, "base_model_name_or_path", None))
    return bool(vocab and base and vocab != base)


def _embedding_layer(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.<getter>()``, or None where the model has no such layer: transformers' vision and
    speech models (Segformer, ConvNeXt, ...) raise NotImplementedError, other modules may lack it."""
    method = getattr(model, getter, None)
    if not callable(method):
        return None
    try:
        layer = method()
    except (NotImplementedError, AttributeError):
        return None
    return layer if isinstance(layer, nn.Module) else None


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding layer (for a ViT its patch embedding), or None if it has none."""
    return _embedding_layer(model, "get_input_embeddings")


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's output embedding layer (an LM head), or None if it has none."""
    return _embedding_layer(model, "get_output_embeddings")


def _embedding_prefixes(model: PeftModel, targeted: bool) -> list[str]:
    """Module names (with a trailing dot) whose tensors are the saved embeddings, chosen as PEFT does:
    the layer itself when untargeted, its ``base_layer`` when it is a LoRA-wrapped target."""
    base_model = model.get_base_model()
    prefixes = []
    for layer in (input_embeddings(base_model), output_embeddings(base_model)):
        if layer is None:
            continue
        base_layer = getattr(layer, "base_layer", None)
        if targeted and not isinstance(base_layer, (nn.Linear, nn.Embedding)):
            continue
        for name, module in model.named_modules():
            if (not targeted and module is layer) or (base_layer is not None and module is base_layer):
                prefixes.append(f"{name}.")
                break
    return prefixes


def embedding_key_map(model: PeftModel, adapter_name: str) -> dict[str, str]:
    """``{file key: model state_dict key}`` of the embedding tensors PEFT would save for this adapter."""
    targeted = embedding_is_targeted(model, model.peft_config[adapter_name])
    prefixes = _embedding_prefixes(model, targeted)
    return {
        remove_adapter_name(key, adapter_name): key
        for key in model.state_dict(keep_vars=True)
        if any(key.startswith(prefix) for prefix in prefixes)
    }


def embedding_tensors(
    model: PeftModel, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The embedding tensors to save with the adapter, under their file keys."""
    return {saved: state_dict[own] for saved, own in embedding_key_map(model, adapter_name).items()}


def _vocabulary_error(key: str, saved: tuple[int, ...], own: tuple[int, ...]) -> ModelLoadError:
    return ModelLoadError(
        f"the adapter was saved with a vocabulary of {saved[0]} tokens ({key} is {saved}), but the base "
        f"model has {own[0]} ({own}). Resize the base model first: model.resize_token_embeddings({saved[0]}) "
        "(peftkit generate/eval do this from the tokenizer saved next to the adapter)."
    )


def check_saved_vocabulary(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Before wrapping ``model`` (the plain base model): refuse a file whose saved input embedding
    has another number of rows, naming both vocabulary sizes."""
    embed = input_embeddings(model)
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return  # no token embedding (a Segformer has no input embedding, a ViT a patch embedding)
    name = next((n for n, m in model.named_modules() if m is embed), None)
    if name is None:
        return
    prefix, rows = f"base_model.model.{name}.", embed.weight.shape
    for key, value in tensors.items():
        if (
            key.startswith(prefix)
            and key.endswith(".weight")
            and value.dim() == 2
            and value.shape[0] != rows[0]
        ):
            raise _vocabulary_error(key, tuple(value.shape), tuple(rows))


def split_embedding_tensors(
    model: PeftModel, adapter_name: str, state_dict: dict[str, torch.Tensor], adapter_keys: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(saved embeddings under their model keys, the other tensors)`` of a loaded file.

    Checks shapes first: a row count that differs from the model's means the adapter was trained
    on a resized vocabulary, and the error names both sizes and how to resize.
    """
    key_map = {k: v for k, v in embedding_key_map(model, adapter_name).items() if k not in adapter_keys}
    found = [key for key in state_dict if key in key_map]
    if not found:
        return {}, state_dict
    own = model.state_dict(keep_vars=True)
    for key in found:
        target, value = own[key_map[key]], state_dict[key]
        if target.shape != value.shape:
            raise _vocabulary_error(key, tuple(value.shape), tuple(target.shape))
    embeddings = {key_map[key]: state_dict[key] for key in found}
    return embeddings, {k: v for k, v in state_dict.items() if k not in key_map}


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def adapter_tokenizer(adapter_dir: str | Path, model: nn.Module, **tokenizer_kwargs: Any) -> Any | None:
    """The tokenizer saved next to an adapter (``peftkit train`` writes one), with ``model``'s
    embeddings grown to it if training added tokens; None when the directory has no tokenizer.

    Loading such an adapter onto a base model that was not resized fails with the vocabulary
    sizes (see :func:`split_embedding_tensors`); this is the step that avoids it.
    """
    directory = Path(adapter_dir)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **tokenizer_kwargs)
    resize_for_tokenizer(model, tokenizer)
    return tokenizer


def resize_for_tokenizer(model: Any, tokenizer: Any) -> bool:
    """Grow ``model``'s embeddings to ``len(tokenizer)`` when the tokenizer has ids beyond them
    (models with spare rows, like Qwen's, are left alone); True if it resized."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer))
    return True
