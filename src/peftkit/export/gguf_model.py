"""A Hugging Face Llama-family model as llama.cpp's GGUF: architecture metadata and tensors.

    HF tensor (transformers)                          GGUF tensor              change
    model.embed_tokens.weight                         token_embd.weight
    model.layers.N.input_layernorm.weight             blk.N.attn_norm.weight   always F32
    model.layers.N.self_attn.{q,k}_proj.{weight,bias} blk.N.attn_{q,k}.*       llama: rows permuted
    model.layers.N.self_attn.{v,o}_proj.*             blk.N.attn_{v,output}.*
    model.layers.N.post_attention_layernorm.weight    blk.N.ffn_norm.weight    always F32
    model.layers.N.mlp.{gate,up,down}_proj.*          blk.N.ffn_{gate,up,down}.*
    model.norm.weight                                 output_norm.weight       always F32
    lm_head.weight                                    output.weight            only when untied

The facts follow llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel / Qwen2Model):

* transformers' Llama applies RoPE to the two halves of each head (``rotate_half``), llama.cpp's
  ``llama`` architecture to adjacent pairs; so the rows of q_proj / k_proj (and their biases) are
  permuted per head. Mistral is ``llama`` in GGUF too. Qwen2 runs llama.cpp's NEOX RoPE, which
  is transformers' layout: no permutation.
* A tied output head (SmolLM2, small Qwen2) has no ``output.weight``: llama.cpp reuses token_embd.
* 1-D tensors and norms stay F32 whatever the output type; a matrix whose rows do not split into
  Q8_0's blocks of 32 falls back to F16, as the converter does.
* RoPE scaling: linear and YaRN become ``{arch}.rope.scaling.*`` keys, Llama 3's scheme the
  ``rope_freqs`` tensor of per-dimension factors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from peftkit.errors import PeftkitError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers architecture is written: its GGUF name and the converter's quirks."""

    hf_name: str
    gguf_arch: str
    permute_qk: bool
    writes_vocab_size: bool


ARCHITECTURES = {
    "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", "llama", permute_qk=True, writes_vocab_size=True),
    "MistralForCausalLM": ArchSpec("MistralForCausalLM", "llama", permute_qk=True, writes_vocab_size=True),
    "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", "qwen2", permute_qk=False, writes_vocab_size=False),
}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def arch_spec(config: Any) -> tuple[ArchSpec, list[str]]:
    """The spec for ``config`` (a transformers config) and warnings; PeftkitError if unsupported."""
    names = list(getattr(config, "architectures", None) or [])
    supported = ", ".join(ARCHITECTURES)
    if not names:
        raise PeftkitError(
            f"the base model's config.json names no architecture; GGUF export supports {supported}"
        )
    spec = ARCHITECTURES.get(names[0])
    if spec is None:
        raise PeftkitError(
            f"GGUF export does not support the architecture {names[0]}: it supports {supported} "
            "(the Llama family llama.cpp runs as 'llama' or 'qwen2')"
        )
    problems, warnings = [], []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config.hidden_act!r}, but llama.cpp's {spec.gguf_arch} uses SiLU")
    if spec.gguf_arch == "qwen2" and getattr(config, "mlp_bias", False):
        problems.append("mlp_bias is set, but llama.cpp's qwen2 has no feed-forward biases")
    rope = rope_parameters(config)
    rope_type = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    if rope_type not in ("default", "linear", "yarn", "llama3", "dynamic"):
        problems.append(f"RoPE scaling {rope_type!r} has no llama.cpp equivalent for {spec.gguf_arch}")
    if rope_type == "dynamic":
        warnings.append(
            "the model uses dynamic-NTK RoPE scaling, which llama.cpp does not implement: outputs differ "
            f"beyond {config.max_position_embeddings} tokens"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", spec.gguf_arch != "qwen2")
    if window and uses_window and window < getattr(config, "max_position_embeddings", 0):
        warnings.append(
            f"the model attends within a sliding window of {window} tokens; llama.cpp's {spec.gguf_arch} "
            f"attends to the whole context, so outputs differ for prompts longer than {window} tokens"
        )
    if problems:
        raise PeftkitError(f"cannot export {names[0]} to GGUF: " + "; ".join(problems))
    return spec, warnings


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings: transformers 5's ``rope_parameters`` (or the older ``rope_scaling`` + ``rope_theta``)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer: Any, config: Any, spec: ArchSpec, n_vocab: int) -> None:
    """The ``{arch}.*`` hyper-parameters llama.cpp reads (the converter's set_gguf_parameters)."""
    import gguf

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if spec.writes_vocab_size:
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim(config))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        # The YaRN tuning keys; written only when set, as the converter does (gguf >= 0.17 names them).
        for key, suffix in (
            ("extrapolation_factor", "yarn_ext_factor"),
            ("attention_factor", "yarn_attn_factor"),
            ("beta_fast", "yarn_beta_fast"),
            ("beta_slow", "yarn_beta_slow"),
        ):
            if rope.get(key) is not None:
                writer.add_float32(f"{spec.gguf_arch}.rope.scaling.{suffix}", float(rope[key]))


def llama3_rope_factors(config: Any) -> torch.Tensor | None:
    """Llama 3's per-dimension RoPE frequency divisors (the ``rope_freqs`` tensor), or None."""
    rope = rope_parameters(config)
    if str(rope.get("rope_type") or rope.get("type") or "").lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a transformers tensor name, or None if llama.cpp has no such tensor."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    match = _LAYER.match(hf_name)
    if match and match.group(2) in _LAYER_PARTS:
        return f"blk.{match.group(1)}.{_LAYER_PARTS[match.group(2)]}.{match.group(3)}"
    return None


def permute_rows(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head reordered from halves (transformers) to pairs (llama.cpp); the first
    dimension is the output one (a weight, a bias or a LoRA B)."""
    rows = tensor.shape[0]
    return (
        tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)
    )


def permute_for(hf_name: str, tensor: torch.Tensor, config: Any, spec: ArchSpec) -> torch.Tensor:
    """``tensor`` (whose rows are ``hf_name``'s outputs) in GGUF's row order."""
    if not spec.permute_qk:
        return tensor
    if ".self_attn.q_proj." in hf_name:
        return permute_rows(tensor, config.num_attention_heads)
    if ".self_attn.k_proj." in hf_name:
        return permute_rows(
            tensor, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        )
    return tensor


def is_tied(model: Any) -> bool:
    """Whether the output head shares the input embedding's tensor (then no ``output.weight``)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def model_tensors(model: Any, config: Any, spec: ArchSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """``(GGUF name, tensor)`` for every tensor of the plain (merged or base) causal LM ``model``.

    PeftkitError for a tensor with no GGUF counterpart (e.g. a layer a method left behind)."""
    factors = llama3_rope_factors(config)
    if factors is not None:
        yield "rope_freqs.weight", factors
    tied = is_tied(model)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target = gguf_tensor_name(name)
        if target is None:
            raise PeftkitError(
                f"the model has a tensor {name} that llama.cpp's {spec.gguf_arch} has no place for "
                "(an adapter layer that merging kept?); GGUF export needs a plain model"
            )
        yield target, permute_for(name, tensor.detach(), config, spec)


def qtype_for(name: str, ndim: int, outtype: str) -> Any:
    """The GGML type a tensor is stored in: norms and vectors F32, the rest ``outtype``."""
    import gguf

    if ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]


def file_type(outtype: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]


def add_tensor(writer: Any, name: str, tensor: torch.Tensor, outtype: str) -> str:
    """Convert ``tensor`` to its GGML type and add it to ``writer``; return the type's name."""
    import gguf
    from gguf.quants import quantize

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    qtype = qtype_for(name, data.ndim, outtype)
    try:
        packed = quantize(data, qtype)
    except gguf.QuantError:  # rows not a multiple of the block size: F16, as the converter does
        qtype = gguf.GGMLQuantizationType.F16
        packed = quantize(data, qtype)
    if qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(packed).all():
        raise PeftkitError(
            f"{name} has values beyond float16's range (|x| > 65504) that would become inf; "
            "export with --outtype bf16 or f32"
        )
    writer.add_tensor(name, packed, raw_dtype=qtype)
    return qtype.name
