"""Load the base model and tokenizer from an alias, a local directory or a Hugging Face hub id.

Every source ends up as a local directory (:func:`resolve_model_dir`) that transformers loads
in the same way, with safetensors weights only: pickled ``.bin`` checkpoints can run code when
loaded, and safetensors loads are memory-mapped and fast.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from peftkit.configuration import ConfigError, closest
from peftkit.errors import ModelLoadError
from peftkit.model_aliases import ALIASES, ensure_converted

TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
    "question_ans": "AutoModelForQuestionAnswering",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
}
"""Task name -> transformers auto class that builds the model with the right head."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")

# What a hub snapshot needs: config, safetensors weights, tokenizer files, remote code.
# "original/" and "consolidated*" hold duplicate non-transformers copies of the weights.
_HUB_ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
_HUB_IGNORE = ["original/*", "consolidated*"]


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A torch dtype from a name ("float32", "bf16", "torch.float16", ...); "auto" passes through.

    "auto" means the dtype recorded in the model's config.json (float32 for the aliases).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported: use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (huggingface_hub reads it only at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local directory holding the model ``name_or_path`` refers to.

    In order: a built-in alias (converted from GGUF on first use), an existing local
    directory, a Hugging Face hub id (downloaded to the hub cache unless ``HF_HUB_OFFLINE``
    is set, in which case only the cache is used).
    """
    name = os.fspath(name_or_path)
    if name in ALIASES:
        return ensure_converted(ALIASES[name])
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{name} is a file; pass a model directory (with config.json and *.safetensors), "
                f"a hub id or a built-in alias ({', '.join(sorted(ALIASES))})"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{name} has no config.json, so it is not a Hugging Face model directory "
                "(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
        return path
    if _looks_like_path(name) or not _is_hub_id(name):
        raise ModelLoadError(
            f"model directory {name!r} does not exist (looked for {path.resolve()}). Pass an existing "
            f"model directory, a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or a built-in "
            f"alias: {', '.join(sorted(ALIASES))}"
        )
    return _download(name)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = "float32",
    trust_remote_code: bool = False,
    task: str = "causal_lm",
    quantization: Any = None,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a model (in eval mode, on the CPU) and its tokenizer.

    ``quantization`` (a :class:`peftkit.quantization.QuantizationConfig`, a mapping of its
    fields, or a transformers ``BitsAndBytesConfig``) loads the linear layers quantized to 4 or
    8 bits with bitsandbytes, for QLoRA. Such a model must never be cast with ``.to(dtype)``.

    ``trust_remote_code`` is passed to transformers as given and never switched on for the
    user: it runs Python files from the model repository. ``model_kwargs`` go to
    ``from_pretrained`` (e.g. ``num_labels`` for ``task="seq_cls"``). The tokenizer always
    has a pad token afterwards (see :func:`ensure_pad_token`), and the model's config and
    generation config use it.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    torch_dtype = parse_dtype(dtype)
    model_dir = resolve_model_dir(name_or_path)

    import transformers

    auto_cls = getattr(transformers, TASKS[task])
    if quantization is not None:
        from peftkit.quantization import as_bnb_config

        model_kwargs["quantization_config"] = as_bnb_config(
            quantization, torch_dtype if isinstance(torch_dtype, torch.dtype) else None
        )
    common = {"trust_remote_code": trust_remote_code, "local_files_only": hub_offline()}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, **common)
        model = auto_cls.from_pretrained(
            model_dir, dtype=torch_dtype, use_safetensors=True, **common, **model_kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain_load_error(name_or_path, model_dir, err)) from err
    except SafetensorError as err:  # a weights file cut short (a copy or download still running)
        raise unreadable_weights(model_dir, err) from err
    if quantization is not None:
        from peftkit.quantization import check_cpu_4bit_layers, keep_trainable_4bit_layout

        keep_trainable_4bit_layout(model)
        check_cpu_4bit_layers(model)
    ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = (
            tokenizer.pad_token_id
        )  # sequence classification finds the last token by it
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token (Llama, GPT-2, ...) one: the eos token.

    Batches need some pad id; padded positions are masked out of attention and loss
    (labels -100), so reusing eos changes no result, whereas adding a new token would
    change the vocabulary and need a resized embedding.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        warnings.warn(
            "the tokenizer has neither a pad nor an eos token, so batches cannot be padded; "
            "add one with tokenizer.add_special_tokens({'pad_token': ...})",
            stacklevel=2,
        )
        return
    tokenizer.pad_token = tokenizer.eos_token


def bf16_supported(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` computes in bfloat16 natively, so bf16 autocast speeds training up.

    On CPUs without AVX512-BF16/AMX (x86) or the BF16 extension (ARM), bfloat16 is emulated
    and slower than float32, so we answer False there although it would run.
    """
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16()
    return _bf16_trial(device.type)


@functools.cache
def _cpu_bf16() -> bool:
    machine = platform.machine().lower()
    if machine in {"x86_64", "amd64", "i386", "i686"}:
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes):
            return True
        return _cpuinfo_has({"avx512_bf16", "amx_bf16"})
    if machine in {"aarch64", "arm64"}:
        return _cpuinfo_has({"bf16"})
    return False


def _cpuinfo_has(flags: set[str]) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(flags & set(text.split()))


@functools.cache
def _bf16_trial(device_type: str) -> bool:
    """For other accelerators (mps, xpu, ...): does a tiny bf16 matmul run at all?"""
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        return bool(torch.isfinite(x @ x).all())
    except (RuntimeError, TypeError):
        return False


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.endswith(("/", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or os.path.isabs(name)
    )


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=_HUB_ALLOW, ignore_patterns=_HUB_IGNORE, local_files_only=offline
            )
        )
    except Exception as err:  # huggingface_hub raises many kinds: network, 404, gated, offline cache miss
        near = closest(repo_id, ALIASES)
        hint = f" Did you mean the built-in alias {near[0]!r}?" if near else ""
        if offline:
            raise ModelLoadError(
                f"{repo_id!r} is not a local directory, not a built-in alias ({', '.join(sorted(ALIASES))}) "
                f"and not in the Hugging Face cache, and HF_HUB_OFFLINE is set so it cannot be downloaded. "
                f"Unset HF_HUB_OFFLINE to download it, or pass a local model directory.{hint}"
            ) from err
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"Check the id, your network and, for gated models, `hf auth login`.{hint}"
        ) from err


def _explain_load_error(name: object, model_dir: Path, err: Exception) -> str:
    text = " ".join(str(err).split())  # one line: transformers' messages span several
    if "trust_remote_code" in text:
        return (
            f"{name} contains custom model code (Python files its config.json names), which runs only "
            "if you trust it: pass --trust-remote-code (Python: trust_remote_code=True)"
        )
    if not any(model_dir.glob("*.safetensors")):
        return (
            f"{model_dir} has no *.safetensors weights; peftkit loads only safetensors. Convert the "
            "checkpoint once with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir)"
        )
    return f"could not load the model or tokenizer from {model_dir}: {text}"


def unreadable_weights(model_dir: Path, err: Exception) -> ModelLoadError:
    """The error naming which of ``model_dir``'s safetensors files cannot be parsed."""
    from safetensors import safe_open

    from peftkit.serialization import unreadable_safetensors

    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as bad:
            return unreadable_safetensors(path, bad)
    return unreadable_safetensors(model_dir, err)


def default_attention(device: torch.device) -> str:
    """The attention kernel of ``attention: auto`` (training) and of every inference command, so that
    they compute alike: sdpa on GPUs; eager on CPUs, where torch's SDPA backward is slow for short
    sequences (training measured 1.4x faster with eager) and bf16 results differ between the two."""
    return "sdpa" if device.type == "cuda" else "eager"


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto``: the GPU if there is one (CUDA, then Apple MPS), else the CPU. A device this machine
    lacks is a ``ConfigError`` naming ``key`` and the devices it has (``peftkit.preflight``)."""
    from peftkit.preflight import resolve_device as checked

    return checked(name, key)
