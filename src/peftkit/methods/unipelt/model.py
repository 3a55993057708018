"""UniPELT (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning"): LoRA, prefix tuning and a bottleneck adapter in every block, each scaled by a gate
learned from the input of the part it scales.

    block i, input x_i:
      attention:  q = W_q x + g_L(x) * s * B_q A_q x        (same for v; g_L per token, see layer.py)
                  keys / values = [g_P,K * P_K,i ; K]  /  [g_P,V * P_V,i ; V]
                  g_P = mean over the sequence's real tokens of sigmoid(W_gP,i x_i + b)   (2 values)
      ffn:        h = ffn(.);  h' = h + g_A(h) * up(f(down(h)))                  (g_A per token)

The prefix gate is the paper's "g_P applied to the prefix vectors P_K and P_V, the original
tokens' K and V intact", realized as in the original code (AdapterHub): one gate for the keys and
one for the values per layer and sequence, the token gates averaged over the sequence. It reads
the layer's input, so it is applied in a forward pre-hook on each transformer layer, which scales
that layer's prefix in the fresh KV cache before attention appends the tokens' keys. Consequences:
g_P -> 0 makes the prefix keys and values zero (the prefix positions still take attention weight:
the output is the model with a zero prefix, not the model without one); in a causal LM the
average includes later tokens; during ``generate`` the gate is computed once, from the prompt,
and the gated prefix then stays in the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError, TargetModulesError
from peftkit.methods.base import AdapterModule, TargetingConfig, TaskType
from peftkit.methods.lora.model import LORA_DEFAULT_TARGET_MODULES
from peftkit.methods.mam.model import PrefixWithLayersModel, adapter_sites, add_bottleneck
from peftkit.methods.prompt_learning.model import word_embeddings
from peftkit.methods.targeting import is_linear_like, is_target, no_match_message, resolve_target_modules
from peftkit.methods.unipelt.config import UniPELTConfig
from peftkit.methods.unipelt.layer import GatedBottleneckLayer, GatedLoraLinear, make_gate


def transformer_layers(model: nn.Module, num_layers: int) -> nn.ModuleList | None:
    """The model's list of transformer layers: the first ``nn.ModuleList`` of ``num_layers``
    entries that each contain an attention module."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            if all(any("attn" in n or "attention" in n for n, _ in m.named_modules()) for m in module):
                return module
    return None


class UniPELTModel(PrefixWithLayersModel):
    """Gated prefix + gated LoRA (query, value) + gated sequential adapter after the feed-forward block."""

    method_name = "UniPELT"
    config_cls = UniPELTConfig
    peft_config: dict[str, UniPELTConfig]

    def check_model(self, config: UniPELTConfig) -> None:
        super().check_model(config)
        if config.task_type == TaskType.SEQ_2_SEQ_LM:
            raise PeftkitError(
                "UniPELT supports decoder-only and encoder-only models (task_type CAUSAL_LM or SEQ_CLS): its "
                "prefix gate reads each layer's input, which an encoder-decoder's decoder prefix cannot tie to "
                "one layer stack. Use MAM or prefix tuning for seq2seq models."
            )
        if transformer_layers(self.model, config.num_layers) is None:
            raise PeftkitError(
                f"UniPELT's prefix gate needs the model's list of {config.num_layers} transformer layers, but "
                f"{type(self.model).__name__} has no nn.ModuleList of that length holding attention modules"
            )

    # -- layers ------------------------------------------------------------------------------

    def inject_layers(self, adapter_name: str, config: UniPELTConfig) -> None:
        lora_supported = lambda m: isinstance(m, GatedLoraLinear) or is_linear_like(m)  # noqa: E731
        lora = resolve_target_modules(
            TargetingConfig(target_modules=config.target_modules, task_type=config.task_type),
            self.model,
            defaults=LORA_DEFAULT_TARGET_MODULES,
            is_supported=lora_supported,
            method="UniPELT's LoRA",
        )

        def add_lora(target: nn.Module, name: str) -> nn.Module:
            layer = target if isinstance(target, GatedLoraLinear) else GatedLoraLinear(target)
            init = False if config.adapter_init == "random" else True
            layer.update_layer(
                adapter_name,
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                init_lora_weights=init,
                use_rslora=False,
            )
            layer.add_gate(adapter_name)
            return layer

        def add_adapter_layer(target: nn.Module, name: str) -> nn.Module:
            layer = target if isinstance(target, GatedBottleneckLayer) else GatedBottleneckLayer(target)
            layer = add_bottleneck(
                layer,
                name,
                adapter_name,
                layer_cls=GatedBottleneckLayer,
                parallel=False,
                bottleneck=config.bottleneck_width(layer.out_features),
                scaling=1.0,
                non_linearity=config.non_linearity,
                init=config.adapter_init,
            )
            layer.add_gate(adapter_name)
            return layer

        names = [n for n, _ in self.model.named_modules() if n and is_target(lora, n)]
        if not names:
            raise TargetModulesError(no_match_message(self.model, lora, lora_supported, "UniPELT's LoRA"))
        self.inject(names, add_lora, lora_supported)
        self.inject(
            adapter_sites(self.model, config, "pfeiffer"),
            add_adapter_layer,
            lambda m: isinstance(m, GatedBottleneckLayer) or not isinstance(m, AdapterModule),
        )
        self._add_prefix_gates(adapter_name, config)

    def _add_prefix_gates(self, adapter_name: str, config: UniPELTConfig) -> None:
        """One ``hidden -> 2`` gate per transformer layer (key gate, value gate), and the hooks."""
        if "prefix_gate" not in self._modules:
            self.prefix_gate = nn.ModuleDict()
            self._gate_hooks: list[Any] = []
            self._gate_state: dict[str, Any] | None = None
        layers = transformer_layers(self.model, config.num_layers)
        embeddings = word_embeddings(self.model, self.method_name)
        hidden = embeddings.embedding_dim
        self.prefix_gate[adapter_name] = nn.ModuleList(
            make_gate(hidden, 2, embeddings.weight) for _ in range(config.num_layers)
        )
        if not self._gate_hooks:
            for index, layer in enumerate(layers):
                hook = self._gate_hook(index)
                self._gate_hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def extra_state_keys(self, adapter_name: str) -> dict[str, str]:
        if "prefix_gate" not in self._modules or adapter_name not in self.prefix_gate:
            return {}
        return {
            f"prefix_gate.{key}": f"prefix_gate.{adapter_name}.{key}"
            for key in self.prefix_gate[adapter_name].state_dict()
        }

    # -- the prefix gate -----------------------------------------------------------------------

    def _gate_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state = self._gate_state
            if state is None or index not in state["pending"] or self.active_adapter not in self.prefix_gate:
                return
            state["pending"].discard(index)
            x = args[0] if args else kwargs["hidden_states"]  # (B, L, hidden): the layer's input
            gate_layer = self.prefix_gate[self.active_adapter][index]
            gates = torch.sigmoid(gate_layer(x.to(gate_layer.weight.dtype)))  # (B, L, 2)
            mask = state["mask"]
            if mask is None:
                gate = gates.mean(dim=1)  # (B, 2)
            else:
                real = mask[:, -x.shape[1] :].to(gates.dtype).unsqueeze(-1)  # (B, L, 1)
                gate = (gates * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
            cache = state["cache"].layers[index]
            cache.keys = cache.keys * gate[:, 0].view(-1, 1, 1, 1).to(cache.keys.dtype)
            cache.values = cache.values * gate[:, 1].view(-1, 1, 1, 1).to(cache.values.dtype)

        return hook

    def past_key_values(self, batch_size: int):
        cache = super().past_key_values(batch_size)
        if "prefix_gate" in self._modules:
            mask = self._gate_state["mask"] if self._gate_state else None
            self._gate_state = {"cache": cache, "pending": set(range(len(cache.layers))), "mask": mask}
        return cache

    def _with_mask(self, mask: torch.Tensor | None, run: Any) -> Any:
        """Run ``run()`` with the real tokens' mask known to the gate hooks."""
        self._gate_state = {"cache": None, "pending": set(), "mask": mask}
        try:
            return run()
        finally:
            self._gate_state = None

    def prompted_forward(self, config: UniPELTConfig, kwargs: dict[str, Any]) -> Any:
        mask = kwargs.get("attention_mask")
        return self._with_mask(mask, lambda: super(UniPELTModel, self).prompted_forward(config, kwargs))

    def body_hidden_states(
        self, body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        run = lambda: super(UniPELTModel, self).body_hidden_states(body, input_ids, attention_mask)  # noqa: E731
        return self._with_mask(attention_mask, run)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._gate_state = None  # drop the finished generation's cache

    def inject_for_generation(self, config: UniPELTConfig, inputs: dict[str, Any], ids: torch.Tensor) -> None:
        # The cache lives on across generate's steps: its prefix is gated once, on the first step.
        self._gate_state = {"cache": None, "pending": set(), "mask": inputs.get("attention_mask")}
        super().inject_for_generation(config, inputs, ids)

    def unload(self, merge: bool) -> nn.Module:
        if not merge and "prefix_gate" in self._modules:
            for handle in self._gate_hooks:
                handle.remove()
            self._gate_hooks = []
            self.prefix_gate = nn.ModuleDict()
        return super().unload(merge)
