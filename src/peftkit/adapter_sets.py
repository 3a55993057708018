"""Several adapters on one base model for ``peftkit generate`` / ``chat``, and one adapter per prompt.

    --adapter math=runs/math/adapter --adapter runs/chat/adapter
        │
        ├── adapter_specs ──> [("math", "runs/math/adapter"), ("chat", "runs/chat/adapter")]
        ├── checks (before any weight is read): one base model, one method, one vocabulary
        └── load_model_with_adapters
              base model ── apply_saved_adapter(first) ──> PeftModel ── load_adapter(each other)

    prompts with adapters [a, b, __base__, a, ...] ──> generate_for_adapters
        LoRA (can_mix_in_one_batch):    batches of rows with different adapters,
                                        one generate(..., adapter_names=[...]) call per batch
        other methods, DoRA:            one group per adapter (set_adapter / disable_adapter)
        results always come back in the input order

One ``PeftModel`` holds adapters of one method only, so adapters of different methods are
refused with an error rather than silently loading a second copy of the base model.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftkit.configuration import ConfigError
from peftkit.errors import ModelLoadError, PeftkitError

BASE = "__base__"  # PEFT's name for "no adapter on this row" in mixed-adapter batches
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def adapter_specs(values: Sequence[str] | str | None) -> list[tuple[str, str]]:
    """``[(name, directory)]`` from ``--adapter`` values: ``NAME=DIR`` or ``DIR``.

    A bare ``DIR`` is named after the directory (``OUTPUT_DIR/adapter``, the layout ``peftkit
    train`` writes, is named after ``OUTPUT_DIR``), with '.' turned into '_' since adapter names
    become state-dict key segments. A value that is an existing path is never split at '='.
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    specs: list[tuple[str, str]] = []
    for value in values:
        name, sep, directory = value.partition("=")
        if sep and not Path(value).exists():
            if not _NAME.match(name) or name == BASE:
                raise ConfigError(
                    f"--adapter {value}: adapter name {name!r} must be letters, digits, '_' or '-' "
                    f"(and not {BASE}, which means 'no adapter')",
                    "command line",
                )
        else:
            directory, name = value, _name_from_dir(value)
        specs.append((name, directory))
    seen: dict[str, str] = {}
    for name, directory in specs:
        if name in seen:
            raise ConfigError(
                f"two adapters are named {name!r} ({seen[name]} and {directory}); "
                f"name them explicitly: --adapter NAME={directory}",
                "command line",
            )
        seen[name] = directory
    return specs


def _name_from_dir(directory: str) -> str:
    path = Path(directory).expanduser().resolve()
    if path.name == "adapter" and path.parent.name:  # peftkit train's OUTPUT_DIR/adapter
        path = path.parent
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.name) or "adapter"
    return "adapter_" + name if name == BASE else name


def _same_model_key(name_or_path: str) -> str:
    """A comparable form of a base model name: local paths resolved, others as written."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def check_adapters_agree(
    specs: list[tuple[str, str]], configs: dict[str, dict[str, Any]], base_model: str | None
) -> None:
    """All adapters record one base model and one method, else an error naming the disagreement.

    With an explicit ``--base-model`` differing recorded bases only warn (the same model is often
    recorded under an alias in one adapter and a path or hub id in another).
    """
    directory = dict(specs)
    bases = {name: str(configs[name].get("base_model_name_or_path") or "") for name, _ in specs}
    first, *others = [name for name, _ in specs]
    for name in others:
        if bases[name] and bases[first] and _same_model_key(bases[name]) != _same_model_key(bases[first]):
            message = (
                f"adapters {first!r} ({directory[first]}) and {name!r} ({directory[name]}) were trained on "
                f"different base models: {bases[first]} and {bases[name]}; all adapters of one command "
                "must share one base model"
            )
            if base_model is None:
                raise ConfigError(
                    f"{message}. If both name the same model, pass --base-model to load it for all",
                    "command line",
                )
            print(f"warning: {message}; using --base-model {base_model} for all", file=sys.stderr)
    methods: dict[str, list[str]] = {}
    for name, _ in specs:
        methods.setdefault(str(configs[name].get("peft_type") or "unknown"), []).append(name)
    if len(methods) > 1:
        listing = "; ".join(f"{method}: {', '.join(names)}" for method, names in methods.items())
        raise ConfigError(
            f"the adapters use different methods ({listing}); one model holds adapters of one method, "
            "so run each method's adapters in a separate command",
            "command line",
        )


def _saved_vocabulary(directory: str, trust_remote_code: bool) -> dict[str, int] | None:
    """The vocabulary of the tokenizer saved next to an adapter, or None if it saved none."""
    from peftkit.saved_embeddings import TOKENIZER_FILES

    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        directory, trust_remote_code=trust_remote_code
    ).get_vocab()


def check_vocabularies_agree(specs: list[tuple[str, str]], base: str, trust_remote_code: bool) -> None:
    """Adapters trained with added tokens share one resized base only if they added the same ones.

    An adapter's vocabulary is its saved tokenizer's, else the base model's (read only when
    needed). Runs before the base model's weights are loaded, so a mismatch fails fast.
    """
    saved = {name: _saved_vocabulary(directory, trust_remote_code) for name, directory in specs}
    if all(vocab is None for vocab in saved.values()):
        return
    base_vocab: dict[str, int] | None = None
    if any(vocab is None for vocab in saved.values()):
        import transformers

        from peftkit.models import resolve_model_dir

        base_vocab = transformers.AutoTokenizer.from_pretrained(
            resolve_model_dir(base), trust_remote_code=trust_remote_code
        ).get_vocab()

    def described(name: str) -> tuple[dict[str, int], str]:
        vocab = saved[name]
        return (vocab, "its saved tokenizer") if vocab is not None else (base_vocab or {}, "the base model's")

    first = specs[0][0]
    first_vocab, first_source = described(first)
    for name, _ in specs[1:]:
        vocab, source = described(name)
        if vocab == first_vocab:
            continue
        differing = sorted(set(vocab.items()) ^ set(first_vocab.items()), key=lambda item: item[1])
        tokens = ", ".join(repr(token) for token, _ in differing[:5])
        raise ConfigError(
            f"adapters {first!r} and {name!r} were trained with different vocabularies "
            f"({len(first_vocab)} tokens from {first_source} vs {len(vocab)} from {source}; they differ in "
            f"{tokens}{', ...' if len(differing) > 5 else ''}): training added tokens to one of them, so "
            "they cannot share one base model; run them in separate commands",
            "command line",
        )


def load_model_with_adapters(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """``(model, tokenizer, adapter names)``: the base with every ``--adapter`` loaded under its
    name (the first one active), in eval mode on ``--device``. No adapters: the base model."""
    from peftkit.loading import check_threads, load_model_from_args, read_adapter_config, ready_for_inference
    from peftkit.models import default_attention, load_model_and_tokenizer, resolve_device

    resolve_device(args.device, "--device")  # a device this machine lacks: refused before loading
    specs = adapter_specs(args.adapter)
    if not specs:
        base_only = argparse.Namespace(**{**vars(args), "adapter": None})
        model, tokenizer = load_model_from_args(base_only)
        args.autocast_dtype, args.precision_label = base_only.autocast_dtype, base_only.precision_label
        return model, tokenizer, []
    configs = {name: read_adapter_config(directory) for name, directory in specs}
    from peftkit.tasks import require_loader

    for _, directory in specs:  # a classifier / QA / seq2seq adapter cannot generate here
        require_loader(directory, "causal_lm", getattr(args, "command", "generate"))
    if len(specs) > 1:
        check_adapters_agree(specs, configs, args.base_model)
    base = args.base_model or configs[specs[0][0]].get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(
            f"{specs[0][1]}/adapter_config.json does not record base_model_name_or_path; "
            "pass --base-model explicitly"
        )
    if len(specs) > 1:
        check_vocabularies_agree(specs, str(base), args.trust_remote_code)
    check_threads(args)
    model, tokenizer = load_model_and_tokenizer(
        str(base),
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        attn_implementation=default_attention(resolve_device(args.device, "--device")),
    )
    base_params = list(model.parameters())  # held: their ids stay theirs
    from peftkit.auto import apply_saved_adapter  # imported late: only adapter users pay for it

    (first, first_dir), *others = specs
    # The tokenizer saved with the adapter knows tokens training added (the base grows to fit).
    model, tokenizer = apply_saved_adapter(
        model, tokenizer, first_dir, adapter_name=first, trust_remote_code=args.trust_remote_code
    )
    for name, directory in others:
        before = _embedding_weights(model)
        try:
            model.load_adapter(directory, adapter_name=name)
        except (ValueError, TypeError, PeftkitError) as err:  # e.g. options one model cannot mix
            raise ModelLoadError(
                f"cannot load adapter {name!r} ({directory}) next to {first!r}: {err}"
            ) from err
        _check_embeddings_unchanged(model, before, name, directory)
    ready_for_inference(model, args, base_params)
    return model, tokenizer, [name for name, _ in specs]


def _embedding_weights(model: Any) -> list[Any]:
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [layer.weight.detach().clone() for layer in layers if getattr(layer, "weight", None) is not None]


def _check_embeddings_unchanged(model: Any, before: list[Any], name: str, directory: str) -> None:
    """An adapter file may carry full embedding matrices (saved when training resized them); loading
    it overwrites the shared base's. If they differ from what the earlier adapters set, refuse."""
    import torch

    if any(not torch.equal(old, new) for old, new in zip(before, _embedding_weights(model))):
        raise ModelLoadError(
            f"adapter {name!r} ({directory}) carries its own embedding matrices, different from those "
            "of the adapters loaded before it, so they cannot share one base model; "
            "run it in a separate command"
        )


def check_adapter_name(name: str | None, loaded: Sequence[str], where: str) -> str:
    """``name`` (None -> ``__base__``) if it is ``__base__`` or a loaded adapter, else an error."""
    if name is None or name == BASE:
        return BASE
    if name not in loaded:
        from peftkit.configuration import closest

        near = closest(name, loaded)
        hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
        available = ", ".join([*loaded, BASE]) if loaded else f"none, only {BASE} (load one with --adapter)"
        raise ConfigError(
            f"{where}: unknown adapter {name!r}{hint}; loaded adapters: {available}", "command line"
        )
    return name


@contextlib.contextmanager
def using_adapter(model: Any, name: str) -> Iterator[None]:
    """Run the block with adapter ``name`` active (``__base__``: none); restores the active one."""
    if not hasattr(model, "peft_config"):  # a plain base model: only __base__ can get here
        yield
        return
    if name == BASE:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    if name != previous:
        model.set_adapter(name)
    try:
        yield
    finally:
        if name != previous and previous is not None:
            model.set_adapter(previous)


def generate_for_adapters(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    adapters: list[str],
    *,
    batch_size: int,
    **kwargs: Any,
) -> list[str]:
    """Completions of ``prompt_ids[i]`` with adapter ``adapters[i]``, in the input order.

    One adapter for all: a plain call. LoRA: mixed batches (one ``generate`` per batch, one
    adapter per row). Other methods, and LoRA with DoRA adapters: one group of calls per adapter.
    """
    from peftkit.evaluation import generate_completions

    if len(set(adapters)) == 1:
        with using_adapter(model, adapters[0]):
            return generate_completions(model, tokenizer, prompt_ids, batch_size=batch_size, **kwargs)
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "can_mix_in_one_batch") and tuner.can_mix_in_one_batch(adapters):
        return generate_completions(
            model, tokenizer, prompt_ids, batch_size=batch_size, adapter_names=adapters, **kwargs
        )
    results = [""] * len(prompt_ids)
    for name in dict.fromkeys(adapters):  # first-appearance order
        rows = [i for i, adapter in enumerate(adapters) if adapter == name]
        with using_adapter(model, name):
            outputs = generate_completions(
                model, tokenizer, [prompt_ids[i] for i in rows], batch_size=batch_size, **kwargs
            )
        for i, text in zip(rows, outputs):
            results[i] = text
    return results
