"""QLoRA's half: load the frozen base model quantized to 4-bit (NF4/FP4) or 8-bit with bitsandbytes.

    base weights W  --quantize once at load-->  4-bit codes + one absmax per block of 64 weights
    forward:  y = x @ dequant(W_q).T  (+ LoRA:  + B A x * scaling, A and B in fp32, trained)

Only the frozen linear layers are quantized (transformers keeps the LM head and, with
``skip_modules``, any module named there in full precision). The adapters trained on top are
ordinary LoRA weights, saved in PEFT's format: they load onto a quantized *or* an unquantized
copy of the same base model.

bitsandbytes is optional (``pip install peftkit[qlora]``); nothing imports it, or torch here,
until a quantized model is about to load (``peftkit generate`` on a plain adapter never does),
so ``import peftkit`` stays fast and works without it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@dataclass
class QuantizationConfig:
    """How to quantize the frozen base model (the ``quantization:`` section of a training job)."""

    bits: int = field(default=4, metadata={"help": "4 (QLoRA: NF4 or FP4 codes) or 8 (LLM.int8())."})
    quant_type: Literal["nf4", "fp4"] = field(
        default="nf4",
        metadata={"help": "4-bit code book: nf4 (normal-float, the QLoRA paper's choice) or fp4."},
    )
    double_quant: bool = field(
        default=True,
        metadata={"help": "4-bit only: quantize the per-block scales too (saves ~0.4 bit per weight)."},
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "dtype the 4-bit weights are dequantized to for each matmul. auto: bf16 when "
            "training runs in bf16, else fp32."
        },
    )
    skip_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names kept unquantized. Replaces transformers' default (the output layer, "
            "e.g. lm_head), so list that too: [lm_head, mlp.gate]."
        },
    )
    int8_threshold: float = field(
        default=6.0,
        metadata={"help": "8-bit only: activations above this magnitude go through an fp16 matmul."},
    )

    def validate(self) -> list[str]:
        problems = []
        if self.bits not in (4, 8):
            problems.append(
                f"'quantization.bits' must be 4 or 8, got {self.bits!r} "
                "(or set quantization: null to train on unquantized weights)"
            )
        if self.int8_threshold < 0:
            problems.append(f"'quantization.int8_threshold' must be >= 0, got {self.int8_threshold}")
        if self.skip_modules is not None and not all(isinstance(m, str) and m for m in self.skip_modules):
            problems.append("'quantization.skip_modules' must be a list of module names")
        return problems

    def to_bnb_config(self, compute_dtype: torch.dtype | None = None) -> Any:
        """The equivalent ``transformers.BitsAndBytesConfig``.

        ``compute_dtype`` fills in ``compute_dtype: auto`` (the training loop passes its autocast
        dtype); fp32 if neither says otherwise.
        """
        import torch
        from transformers import BitsAndBytesConfig

        problems = self.validate()
        if problems:
            from peftkit.configuration import ConfigError

            raise ConfigError(problems)
        require_bitsandbytes()
        named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        dtype = named.get(self.compute_dtype) or compute_dtype or torch.float32
        skip = list(self.skip_modules) if self.skip_modules else None
        if self.bits == 8:
            return BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=self.int8_threshold, llm_int8_skip_modules=skip
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )


def require_bitsandbytes() -> None:
    """Check that bitsandbytes is installed, and import it (once) without its hub-kernel warning."""
    if not bitsandbytes_available():
        from peftkit.errors import PeftkitError

        raise PeftkitError(
            "quantization needs bitsandbytes, which is not installed: pip install 'peftkit[qlora]' "
            "(or pip install bitsandbytes), or set quantization: null"
        )
    import_bitsandbytes_quietly()


class _NoHubKernelNotes(logging.Filter):
    """Drops the notes of bitsandbytes' optional hub kernel (see import_bitsandbytes_quietly)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "kernels-community" not in text and "trust_remote_code" not in text


def import_bitsandbytes_quietly() -> None:
    """Import bitsandbytes with the notes of its hub kernel dropped.

    On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional 4-bit matmul kernel
    from the Hugging Face Hub (``kernels-community``); unavailable (offline, unverified publisher),
    it falls back to its own kernel and warns, suggesting ``trust_remote_code=True``. peftkit
    downloads no code at run time and never suggests trusting remote code: the fallback is what
    runs, so the notes are dropped; every other bitsandbytes message is kept.
    """
    if "bitsandbytes" in sys.modules:
        return
    quiet = _NoHubKernelNotes()
    loggers = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels")]
    loggers += [logging.getLogger("kernels._internals.hf_hub")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def as_bnb_config(quantization: Any, compute_dtype: torch.dtype | None = None) -> Any:
    """A ``BitsAndBytesConfig`` from a :class:`QuantizationConfig`, a mapping of its fields, or itself."""
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        from peftkit.configuration import from_dict

        quantization = from_dict(QuantizationConfig, quantization, where="quantization")
    if isinstance(quantization, QuantizationConfig):
        return quantization.to_bnb_config(compute_dtype)
    return quantization  # already a BitsAndBytesConfig (or another transformers quantization config)


# -- what a loaded model holds -----------------------------------------------------------------


def _bnb() -> Any:
    """bitsandbytes if something has imported it (a quantized model necessarily has), else None."""
    return sys.modules.get("bitsandbytes")


def is_quantized_layer(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes-quantized layers (so it must never be cast to a dtype)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    return _bnb() is not None and any(is_quantized_layer(m) for m in model.modules())


def logical_numel(param: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte (as PEFT counts)."""
    numel = param.numel()
    if type(param).__name__ == "Params4bit":
        numel *= 2 * param.element_size()
    return numel


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters, counting a quantized weight's scales (absmax, SCB) with it."""
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:  # 4-bit: one absmax per block (itself quantized with double_quant)
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scb = getattr(param, "SCB", None)
        if scb is not None:  # 8-bit: one fp32 scale per output row
            total += scb.numel() * scb.element_size()
    for module in model.modules():  # 8-bit layers move the scales to their state on first forward
        weight, state = getattr(module, "weight", None), getattr(module, "state", None)
        if getattr(state, "SCB", None) is not None and getattr(weight, "SCB", None) is None:
            total += state.SCB.numel() * state.SCB.element_size()
    return total


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes linear layer computes with, as fp32."""
    import torch

    bnb = _bnb()
    weight = layer.weight
    if weight.is_floating_point():  # 8-bit layer that keeps fp16 weights (has_fp16_weights)
        return weight.detach().float()
    if bnb is not None and isinstance(layer, bnb.nn.Linear4bit):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # see keep_trainable_4bit_layout
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        return bnb.functional.dequantize_4bit(data, state).float()
    # int8 row-wise absmax quantization: W = CB * SCB / 127 (after a forward, SCB lives in the state)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return weight.data.to(torch.float32) * (scb.float().unsqueeze(1) / 127.0)


def keep_trainable_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference, and undo it where done.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad rewrites its weight
    in place into a layout for a fused bf16 inference kernel (bitsandbytes 0.50). That kernel has
    no backward: once a layer is repacked (say by an evaluation before training), training through
    it fails, or silently stops the gradient from reaching adapters in earlier layers. Keeping the
    standard layout costs that inference kernel only; eval then computes as training does, in the
    layer's compute dtype.
    """
    bnb = _bnb()
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                    weight.data, weight.quant_state
                )


def _reference_dequantize_4bit(weight: Any) -> torch.Tensor:
    """Pure-torch 4-bit dequantization (code book lookup times block absmax), to check the kernel."""
    import torch

    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = _bnb().functional.dequantize_blockwise(absmax, state.state2) + state.offset
    packed = weight.data.view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()  # high nibble first
    numel = int(torch.Size(state.shape).numel())
    values = state.code.float()[codes[:numel]]
    scale = absmax.float().repeat_interleave(state.blocksize)[:numel]
    return (values * scale).reshape(state.shape)


def check_cpu_4bit_layers(model: nn.Module) -> None:
    """Refuse layers that bitsandbytes' CPU 4-bit kernel dequantizes wrongly.

    Measured with bitsandbytes 0.50.2: when a layer's in_features is not a multiple of the block
    size (64), the CPU dequantization kernel reads the wrong block scales for some shapes (errors
    as large as the weights), so such a layer would silently compute garbage. Layers whose
    dequantization differs from a pure-torch reference are reported with the fix.
    """
    broken = misdequantized_cpu_4bit_layers(model)
    if broken:
        from peftkit.errors import ModelLoadError

        shown = ", ".join(broken[:6]) + (f" and {len(broken) - 6} more" if len(broken) > 6 else "")
        raise ModelLoadError(
            f"bitsandbytes' CPU 4-bit kernel dequantizes {len(broken)} layer(s) of this model wrongly "
            f"(their in_features is not a multiple of the block size 64): {shown}. Keep them unquantized "
            "with quantization.skip_modules, use bits: 8, or train on a GPU"
        )


def misdequantized_cpu_4bit_layers(model: nn.Module) -> list[str]:
    """Names of the CPU 4-bit layers (in_features not a multiple of the block size) whose kernel
    dequantization differs from the pure-torch reference on this machine."""
    bnb = _bnb()
    if bnb is None:
        return []
    broken = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is None or module.in_features % state.blocksize == 0:
            continue
        kernel = bnb.functional.dequantize_4bit(module.weight.data, state).float()
        reference = _reference_dequantize_4bit(module.weight)
        if not torch_allclose(kernel, reference):
            broken.append(name)
    return broken


def torch_allclose(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= 1e-3 * scale


# -- PEFT's helper, for users of the Python API -------------------------------------------------


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """PEFT's ``prepare_model_for_kbit_training``: get a quantized model ready for adapter training.

    Keeps 4-bit weights in the layout training needs (:func:`keep_trainable_4bit_layout`), freezes
    every parameter, stores the remaining half-precision ones (norms, embeddings, LM head;
    never the quantized weights) in fp32 for stable training, and optionally switches on gradient
    checkpointing with inputs that require grad (so checkpointed blocks still backpropagate into
    adapters when the frozen embedding output has no grad).

    ``peftkit train`` does not call this: its loop keeps frozen weights in bf16 (see
    ``train/precision.py``), which already leaves the quantized weights alone.
    """
    import torch

    keep_trainable_4bit_layout(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing and is_quantized(model):
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name
            model.activation_checkpointing_enable(kwargs or None)
        elif hasattr(model, "gradient_checkpointing_enable"):  # deprecated there, the only one before
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    return model
