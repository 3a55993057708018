"""AdaLoRA's model wrapper: injection, the orthogonality regulariser and the rank schedule.

    training step:   loss + orth_reg_weight * R  ─► backward ─► optimizer.step()
                     ─► update_and_allocate(step): sensitivities, budget, E masks ─► zero_grad()

    R = mean over A and B of every module of ||A A^T - I||_F and ||B^T B - I||_F

The training loop reaches these through ``TunerBase``'s hooks (``on_train_start``,
``regularization_loss``, ``on_optimizer_step``, ``training_state``); Python users call
``update_and_allocate`` themselves, as with PEFT, and get the regulariser added to
``outputs.loss`` whenever the model computes a loss. Pruned ranks stay in memory (E = 0) and
are cut from the saved tensors by ``rank_pattern``, as PEFT saves them.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.methods.adalora.allocator import RankAllocator
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import AdaLoraConv2d, AdaLoraLinear
from peftkit.methods.targeting import is_linear_like
from peftkit.methods.tuner import InjectedAdapterModel

# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (list entries only).
ADALORA_DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
PREFIX = "base_model.model."  # saved keys: base_model.model.<name in the user's model>


class AdaLoraModel(InjectedAdapterModel):
    """Injects SVD-form adapters into ``nn.Linear`` / ``Conv1D`` / ``nn.Conv2d`` targets; one adapter trains."""

    method_name: ClassVar[str] = "AdaLoRA"
    # Rank allocation reads every adapter's whole gradient and masks its weights after each step.
    supports_fsdp: ClassVar[bool] = False
    default_target_modules: ClassVar[dict[str, list[str]]] = ADALORA_DEFAULT_TARGET_MODULES
    peft_config: dict[str, AdaLoraConfig]
    trainable_adapter_name: str | None = None
    rankallocator: RankAllocator | None = None
    _run_steps: int | None = None  # the training loop's total steps (on_train_start)

    @classmethod
    def is_supported(cls, module: nn.Module) -> bool:
        return isinstance(module, (AdaLoraLinear, nn.Conv2d)) or is_linear_like(module)

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig) -> None:
        if not config.inference_mode and self.trainable_adapter_name is not None:
            raise ValueError(
                "AdaLoraModel supports only 1 trainable adapter: add the others with inference_mode=True "
                f"(adapter {self.trainable_adapter_name!r} is the trainable one)"
            )
        super().add_adapter(adapter_name, config)
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(
                self.peft_config[adapter_name], adapter_name, self.adapted_modules(adapter_name)
            )

    def create_or_update(
        self, target: nn.Module, name: str, config: AdaLoraConfig, adapter_name: str
    ) -> nn.Module:
        if isinstance(target, AdaLoraLinear):
            layer = target
        else:
            layer = AdaLoraConv2d(target) if isinstance(target, nn.Conv2d) else AdaLoraLinear(target)
        if config.fan_in_fan_out != layer.fan_in_fan_out:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(layer.base_layer).__name__} layers; "
                "peftkit uses the layer's own weight layout",
                stacklevel=2,
            )
        # A saved, pruned adapter: this module keeps sum(mask) ranks, still scaled by init_r.
        pattern = config.rank_pattern or {}
        keep = pattern.get(f"{name}.lora_E", pattern.get(f"{name}.lora_E.{adapter_name}"))
        layer.update_layer(
            adapter_name,
            r=config.init_r if keep is None else sum(keep),
            ranknum=config.init_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
        )
        return layer

    def extra_trainable_names(self, adapter_name: str) -> list[str]:
        return self.bias_names(self.peft_config[adapter_name].bias, AdaLoraLinear)

    def adapted_modules(self, adapter_name: str) -> list[tuple[str, AdaLoraLinear]]:
        """``(name in the user's model, layer)`` of every layer holding ``adapter_name``."""
        return [
            (name.removeprefix("model."), layer)
            for name, layer in self.adapter_modules()
            if isinstance(layer, AdaLoraLinear) and adapter_name in layer.lora_A
        ]

    # -- the orthogonality regulariser ---------------------------------------------------------

    def orthogonal_regularization(self) -> torch.Tensor | None:
        """Mean of ||A A^T - I||_F and ||B^T B - I||_F over the trainable adapter (PEFT's order)."""
        adapter = self.trainable_adapter_name
        if adapter is None:
            return None
        total: Any = 0
        count = 0
        for _, layer in self.adapted_modules(adapter):
            for weight, is_a in ((layer.lora_A[adapter], True), (layer.lora_B[adapter], False)):
                cov = weight @ weight.T if is_a else weight.T @ weight  # (r, r)
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return total / count if count else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and self.trainable_adapter_name is not None:
            regularization = self.orthogonal_regularization()
            if regularization is not None:  # as PEFT: every loss the model computes includes it
                outputs.loss += self.peft_config[self.trainable_adapter_name].orth_reg_weight * regularization
        return outputs

    # -- rank allocation (PEFT's API) ----------------------------------------------------------

    def update_and_allocate(self, global_step: int) -> None:
        """Update the sensitivities and the masks; call after ``optimizer.step()``, before ``zero_grad()``.

        Records the masks in the config's ``rank_pattern`` (saved with the adapter), as PEFT does.
        """
        self._allocate(global_step)
        self._publish_rank_pattern()

    def _allocate(self, step: int) -> None:
        allocator = self.rankallocator
        if allocator is None:
            raise ValueError(
                "this AdaLoRA model has no trainable adapter (inference_mode): nothing to allocate"
            )
        boundary = allocator.total_step() - allocator.config.tfinal
        if step < boundary:
            _, pattern = allocator.update_and_allocate(step)
            if pattern:
                allocator.rank_pattern = pattern
        elif step == boundary:  # the final budget: the masks are fixed from here on
            _, allocator.rank_pattern = allocator.update_and_allocate(step, force_mask=True)
            allocator.reset_ipt()
        elif allocator.rank_pattern is not None:
            allocator.mask_using_rank_pattern(allocator.rank_pattern)

    def _publish_rank_pattern(self) -> None:
        allocator = self.rankallocator
        if allocator is not None and allocator.rank_pattern is not None:
            allocator.config.rank_pattern = copy.deepcopy(allocator.rank_pattern)

    # -- the training loop's hooks -------------------------------------------------------------

    def on_train_start(self, total_steps: int) -> None:
        if self.rankallocator is None:
            return
        config = self.rankallocator.config
        if config.total_step is None:
            config.total_step = total_steps
        problems = config.schedule_problem(config.total_step)
        if problems:
            raise ValueError(f"AdaLoRA schedule does not fit this run of {total_steps} steps: {problems[0]}")
        self._run_steps = total_steps

    def regularization_loss(self) -> torch.Tensor | None:
        if self.trainable_adapter_name is None:
            return None
        weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
        regularization = self.orthogonal_regularization() if weight else None
        return None if regularization is None else weight * regularization

    def on_optimizer_step(self, step: int) -> None:
        if self.rankallocator is None:
            return
        self._allocate(step)
        # Checkpoints keep the full-size tensors (an exact resume needs the pruned rows too); the
        # masks go into the config, and so cut the saved tensors, only with the run's last step.
        if self._run_steps is not None and step >= self._run_steps:
            self._publish_rank_pattern()

    def training_state(self) -> dict[str, torch.Tensor]:
        return {} if self.rankallocator is None else self.rankallocator.state()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.rankallocator is None:
            super().load_training_state(state)
        else:
            self.rankallocator.load_state(state)

    # -- saving ---------------------------------------------------------------------------------

    def to_saved_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Cut the pruned ranks (PEFT's ``resize_state_dict_by_rank_pattern``): A, E rows, B columns."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return tensors
        tensors = dict(tensors)
        for key, keep in pattern.items():
            module = key.removesuffix(f".{adapter_name}").removesuffix(".lora_E")
            rank = sum(keep)
            for kind, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
                saved = f"{PREFIX}{module}.{kind}"
                if saved in tensors and tensors[saved].shape[dim] != rank:
                    mask = torch.tensor(keep, dtype=torch.bool, device=tensors[saved].device)
                    tensors[saved] = tensors[saved][mask] if dim == 0 else tensors[saved][:, mask]
        return tensors
