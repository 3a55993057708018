"""A LoRA adapter as a GGUF LoRA adapter, applied by llama.cpp on the base model's GGUF at run time.

    adapter_model.safetensors                 adapter GGUF (general.type = adapter, adapter.type = lora)
    ...q_proj.lora_A.weight  (r, in)     ──►  blk.N.attn_q.weight.lora_a   ne = [in, r]
    ...q_proj.lora_B.weight  (out, r)    ──►  blk.N.attn_q.weight.lora_b   ne = [r, out]  (rows permuted
                                                                           as the base's q/k rows are)
    ...embed_tokens.lora_embedding_A (r, vocab) ──► token_embd.weight.lora_a  A transposed: llama.cpp
    ...embed_tokens.lora_embedding_B (dim, r)   ──► token_embd.weight.lora_b  gathers rows of it per token

llama.cpp adds ``(alpha / r) * B A x`` per layer, with one ``adapter.lora.alpha`` for the file and
``r`` read from each B. Scalings that are not ``alpha / r`` -- rsLoRA's ``alpha / sqrt(r)``,
per-layer ``alpha_pattern`` values, ranks of ``rank_pattern`` -- are folded into B: each layer's
B is multiplied by ``scaling / (alpha / r)``, so the product is exact.

What GGUF LoRA cannot hold is refused, pointing to the merged export: DoRA's magnitudes, full
weights (``modules_to_save``, trained token rows, trained biases), methods other than LoRA, and
PiSSA/OLoRA adapters (relative to a changed base weight).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.errors import PeftkitError
from peftkit.export.gguf_model import ArchSpec, gguf_tensor_name, permute_for

_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
MERGED_HINT = "export the merged model instead (without --lora-only), which holds any adapter exactly"


def lora_only_problems(config: dict[str, Any], saved_keys: Iterable[str]) -> list[str]:
    """Why the adapter (its adapter_config.json and saved tensor names) cannot be a GGUF LoRA."""
    from peftkit.methods.lora.config import is_weight_moving_init

    peft_type = str(config.get("peft_type") or "")
    if peft_type.upper() != "LORA":
        return [f"it is a {peft_type or 'non-LoRA'} adapter; GGUF LoRA adapters hold only LoRA"]
    problems = []
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter: llama.cpp has no per-output magnitudes")
    if is_weight_moving_init(config.get("init_lora_weights", True)):
        problems.append(
            f"it was initialised with {config['init_lora_weights']!r}, which changed the base weights: it is "
            "relative to that changed base, not to the base model's GGUF"
        )
    if config.get("modules_to_save"):
        problems.append(
            f"it trains full copies of {', '.join(config['modules_to_save'])} (modules_to_save), which a "
            "LoRA adapter cannot carry"
        )
    # PEFT saves an adapted embedding's own weight too ("...base_layer.weight"); like llama.cpp's
    # converter we skip it, once export_gguf has checked it is the base model's (base_layer_changes).
    other = [key for key in saved_keys if not key.endswith((*_FACTOR_SUFFIXES, ".base_layer.weight"))]
    kinds = {  # saved tensors the config flags above may not have reported
        "lora_magnitude_vector": (config.get("use_dora"), "DoRA magnitudes"),
        "modules_to_save": (config.get("modules_to_save"), "full module copies (modules_to_save)"),
        "trainable_tokens": (False, "trained embedding rows (trainable_token_indices)"),
    }
    for marker, (reported, what) in kinds.items():
        found = [key for key in other if marker in key]
        if found and not reported:
            problems.append(f"it holds {what}, e.g. {found[0]}")
        other = [key for key in other if marker not in key]
    if other:
        problems.append(
            f"it holds {len(other)} tensor(s) that are not LoRA factors (trained biases?), e.g. {other[0]}"
        )
    return problems


def base_layer_changes(saved: dict[str, torch.Tensor], model_dir: Any) -> list[str]:
    """The saved ``...base_layer.weight`` tensors that differ from the base checkpoint's."""
    from safetensors import safe_open

    wanted = {
        key: key.removeprefix("base_model.model.").replace(".base_layer.weight", ".weight")
        for key in saved
        if key.endswith(".base_layer.weight")
    }
    if not wanted:
        return []
    found: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key, name in wanted.items():
                if name in handle.keys():
                    found[key] = handle.get_tensor(name)
    return [
        key
        for key in wanted
        if key not in found
        or found[key].shape != saved[key].shape
        or not torch.equal(found[key].to(saved[key].dtype), saved[key])
    ]


@dataclass
class LoraExport:
    """The tensors of a GGUF LoRA adapter and what was done to make them exact."""

    alpha: float
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    layers: int = 0
    folded: list[str] = field(default_factory=list)


def _base_weight(module: Any) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


def lora_tensors(peft_model: Any, config: Any, spec: ArchSpec) -> LoraExport:
    """The adapter's ``lora_a`` / ``lora_b`` tensors under GGUF names, scalings folded where needed."""
    from peftkit.methods.lora.base import LoraLayerBase
    from peftkit.methods.lora.embedding import LoraEmbedding
    from peftkit.methods.lora.layer import LoraLinear

    adapter = peft_model.active_adapter
    lora_config = peft_model.peft_config[adapter]
    # llama.cpp scales by alpha / r with r read from each B; 0 would mean "scale 1" there.
    alpha = float(lora_config.lora_alpha) or 1.0
    model = peft_model.get_base_model()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and _base_weight(embed).data_ptr() == _base_weight(head).data_ptr()
    export = LoraExport(alpha=alpha)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayerBase) or adapter not in module.r:
            continue
        weight_name = f"{name}.weight"
        target = gguf_tensor_name(weight_name)
        if target is None:
            raise PeftkitError(f"the adapter adapts {name}, which llama.cpp's {spec.gguf_arch} does not have")
        if tied and target in ("token_embd.weight", "output.weight"):
            raise PeftkitError(
                f"the adapter adapts {name}, but the model ties its output head to the input embedding: "
                f"llama.cpp would apply the update to both ({MERGED_HINT})"
            )
        if isinstance(module, LoraLinear) and not module.fan_in_fan_out:
            lora_a = module.lora_A[adapter].weight.detach().float()  # (r, in)
            lora_b = module.lora_B[adapter].weight.detach().float()  # (out, r)
            lora_b = permute_for(weight_name, lora_b, config, spec)
        elif isinstance(module, LoraEmbedding):
            # llama.cpp gathers the token's row of lora_a: (vocab, r) as the converter writes it
            lora_a = module.lora_embedding_A[adapter].detach().float().T.contiguous()
            lora_b = module.lora_embedding_B[adapter].detach().float()  # (dim, r)
        else:
            raise PeftkitError(f"{name} is a {type(module).__name__}, which GGUF LoRA cannot express")
        rank = module.r[adapter]
        factor = module.scaling[adapter] / (alpha / rank)
        if abs(factor - 1.0) > 1e-7:
            lora_b = lora_b * factor
            export.folded.append(name)
        export.tensors.append((f"{target}.lora_a", lora_a))
        export.tensors.append((f"{target}.lora_b", lora_b))
        export.layers += 1
    if export.layers == 0:
        raise PeftkitError("the adapter has no LoRA layers to export")
    return export


def write_lora_gguf(path: Any, export: LoraExport, spec: ArchSpec, outtype: str, name: str) -> None:
    """Write the adapter GGUF llama.cpp loads with ``--lora`` (and Ollama with ``ADAPTER``)."""
    import gguf

    from peftkit.export.gguf_model import add_tensor

    writer = gguf.GGUFWriter(path, spec.gguf_arch)
    writer.add_type("adapter")
    writer.add_name(name)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", export.alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, tensor in export.tensors:
        add_tensor(writer, tensor_name, tensor, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
