"""``PeftModel``: a model with adapters, saved and loaded in PEFT's format.

    PeftModel
      └─ base_model     the method's TunerModel (e.g. LoraModel), found through the registry
           └─ model     the user's model, adapter layers swapped in

The attribute path is PEFT's, so ``state_dict()`` keys read
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` in both libraries.
Attributes it lacks are read from the wrapped model, as in PEFT, except those that would act on
the wrong object (``push_to_hub``, transformers' own adapter methods): ``peft_model_access.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.forward_signature import wrapped_signature
from peftkit.methods import get_method
from peftkit.methods.base import AdapterModule, PeftConfig, TunerModel
from peftkit.methods.merging import refuse_while_merged
from peftkit.methods.modules_to_save import ModulesToSaveWrapper
from peftkit.peft_model_access import WrappedModelAccess
from peftkit.quantization import logical_numel
from peftkit.saved_embeddings import check_saved_vocabulary
from peftkit.serialization import (
    get_peft_model_state_dict,
    load_adapter_weights,
    resolve_adapter_dir,
    save_adapters,
    set_peft_model_state_dict,
)


def _model_name(model: nn.Module) -> str | None:
    """The Hub id / path a transformers model was loaded from ("" for models built from a config)."""
    return model.__dict__.get("name_or_path") or None


class PeftModel(WrappedModelAccess, nn.Module):
    """Wraps ``model`` with the adapter described by ``peft_config`` (injected in place)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        if any(isinstance(module, AdapterModule) for module in model.modules()):
            raise PeftkitError(
                "this model already contains adapter layers; wrap a fresh base model, or add another "
                "adapter with PeftModel.add_adapter / load_adapter"
            )
        spec = get_method(str(peft_config.peft_type))
        if not isinstance(peft_config, spec.config_cls):
            raise TypeError(
                f"peft_type {spec.peft_type} needs a {spec.config_cls.__name__}, got {type(peft_config)}"
            )
        self.base_model: TunerModel = spec.model_cls(model, peft_config, adapter_name)
        self._update_trainable()

    # -- adapters ------------------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | None:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter as a list (PEFT's name; peftkit activates at most one)."""
        return [] if self.active_adapter is None else [self.active_adapter]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was active, the first remaining adapter becomes active."""
        delete = getattr(self.base_model, "delete_adapter", None)
        if delete is None:
            raise PeftkitError(f"{type(self.base_model).__name__} cannot delete adapters")
        was_active = adapter_name == self.active_adapter
        delete(adapter_name)
        if was_active and self.active_adapter is not None:
            warnings.warn(
                f"deleted the active adapter {adapter_name!r}; {self.active_adapter!r} is now active",
                stacklevel=2,
            )
        self._update_trainable()

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers in it)."""
        return self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject another adapter of the same method; it becomes active only with ``set_adapter``."""
        spec = get_method(str(peft_config.peft_type))
        if not isinstance(self.base_model, spec.model_cls):
            raise PeftkitError(
                f"cannot add a {spec.peft_type} adapter to a model holding {type(self.base_model).__name__} adapters"
            )
        self.base_model.add_adapter(adapter_name, peft_config)
        self._update_trainable()  # the new adapter's parameters are created trainable

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of LoRA ``adapters`` (PEFT's method, same
        options; see ``methods/lora/weighted.py``). The new adapter is not made active."""
        refuse_while_merged(self.merged_adapters, "add_weighted_adapter")
        combine = getattr(self.base_model, "add_weighted_adapter", None)
        if combine is None:
            raise PeftkitError(
                f"only LoRA adapters can be combined; this model holds {type(self.base_model).__name__} adapters"
            )
        combine(
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
        )
        self._update_trainable()  # the new adapter's parameters are created trainable

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Use ``adapter_name`` in forward and make its weights the trainable ones, as PEFT does
        (also for an adapter loaded with ``is_trainable=False``); ``inference_mode=True`` keeps
        them frozen. The choice is kept in its config, so adding or deleting adapters keeps it."""
        self._check_names([adapter_name])
        self.base_model.set_adapter(adapter_name)
        self.peft_config[adapter_name].inference_mode = inference_mode
        self._update_trainable()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights on or off (PEFT's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for name in names:
            for param in self._adapter_parameters(name):
                param.requires_grad_(requires_grad)

    def disable_adapter_layers(self) -> None:
        """Run the base model until :meth:`enable_adapter_layers` (PEFT's tuner method; ``with
        model.disable_adapter():`` is the block form). Merged adapters are unmerged first."""
        if self.active_adapter is None:
            return
        if self.merged_adapters:
            warnings.warn("unmerging the merged adapter(s) to disable them", stacklevel=2)
            self.unmerge_adapter()
        self._disabled_adapter = self.active_adapter
        self.base_model.set_adapter(None)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the adapter that was active is active again."""
        name = self.__dict__.pop("_disabled_adapter", None)
        if name in self.peft_config and self.active_adapter is None:
            self.base_model.set_adapter(name)

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in the wrapped model) of the modules an adapter was injected into, as PEFT lists
        them (``modules_to_save`` copies are not among them)."""
        return [
            name
            for name, module in self.get_base_model().named_modules()
            if isinstance(module, AdapterModule) and not isinstance(module, ModulesToSaveWrapper)
        ]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The ``modules_to_save`` names of all adapters (a task's head included), or None (PEFT's)."""
        names = {n for c in self.peft_config.values() for n in getattr(c, "modules_to_save", None) or []}
        return names or None

    def _check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter(s) named {unknown}; adapters: {', '.join(self.peft_config)}")

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        params = dict(self.base_model.named_parameters(remove_duplicate=False))
        keys = self.base_model.adapter_state_keys(adapter_name).values()
        return [params[key] for key in keys if key in params]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without any adapter inside the block (e.g. a DPO reference pass).

        While merged (``merge_adapter``) the exact base weights are put back for the block and
        the same adapters merged again after it."""
        active, merged = self.active_adapter, self.merged_adapters
        if merged:
            self.unmerge_adapter()
        self.base_model.set_adapter(None)
        try:
            yield
        finally:
            self.base_model.set_adapter(active)
            if merged:
                self.base_model.merge_adapter(merged)

    def _update_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapter's parameters (PEFT's rule)."""
        for param in self.parameters():
            param.requires_grad_(False)
        if self.active_adapter is None or self.active_peft_config.inference_mode:
            return
        for param in self._adapter_parameters(self.active_adapter):
            param.requires_grad_(True)

    # -- running -------------------------------------------------------------------------------

    @wrapped_signature
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.base_model.refuse_adapter_names(kwargs)  # transformers would silently drop it
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.base_model.refuse_adapter_names(kwargs)
        return self.base_model.generate(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, counted like PEFT (works on the meta device)."""
        trainable = total = 0  # a packed 4-bit weight stands for 2 parameters per byte
        for _, param in self.named_parameters():
            total += logical_numel(param)
            if param.requires_grad:
                trainable += logical_numel(param)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- merging and unloading -----------------------------------------------------------------

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters ``merge_adapter`` folded into the weights, in order (PEFT's name)."""
        return list(getattr(self.base_model, "merged_adapters", []))

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active adapter (or each of ``adapter_names``, in turn) into the base weights
        in place, keeping the adapter so that :meth:`unmerge_adapter` restores the base weights
        bit-exactly (from a CPU copy; PEFT subtracts, with rounding error). Forward then runs
        the plain layers at the base model's speed.

        All-or-nothing as ``merge_and_unload``; a bitsandbytes-quantized layer is refused (merging
        it would dequantize it: use ``merge_and_unload()``). Methods whose trained values are the
        weights (full, bitfit, partial) only record the merge. While merged, ``set_adapter``
        unmerges first (with a warning), ``disable_adapter()`` still gives the base model, and
        adding/deleting/combining adapters or mixed batches are refused until ``unmerge_adapter()``.
        """
        self._merge_hook("merge_adapter")(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`: the base weights exactly as before, the adapter active again."""
        self._merge_hook("unmerge_adapter")()

    def _merge_hook(self, name: str) -> Any:
        hook = getattr(self.base_model, name, None)
        if hook is None:
            method = getattr(self.base_model, "method_name", type(self.base_model).__name__)
            raise PeftkitError(
                f"{method} cannot be merged into the model's weights ({name}): the adapter is not a change to "
                "the weights of existing layers -- soft prompts and prefixes add virtual tokens or attention "
                "key/value positions, adaption prompts add attention to learned tokens -- so there is nothing "
                "to fold in. Keep the adapter active to use it, or unload() to get the base model back."
            )
        return hook

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold the active adapter (or each of ``adapter_names``, in turn) into the base weights;
        return the plain model (this wrapper is spent).

        Merging is all-or-nothing: if any layer's update holds NaN/inf the error names the layer
        and no weight is changed. ``safe_merge`` (PEFT's option) also checks the merged weights
        themselves are finite. ``progressbar`` is accepted for PEFT compatibility and ignored.
        After ``merge_adapter`` the merged weights are kept as they are (not merged twice).
        """
        if self.base_model.merge_options:
            names = None if adapter_names is None else list(adapter_names)
            return self.base_model.unload(merge=True, safe_merge=safe_merge, adapter_names=names)
        # Methods that keep trained values or cannot merge: nothing is computed, so safe_merge has
        # nothing to check; only the active adapter can be kept.
        if adapter_names is not None and list(adapter_names) != [self.active_adapter]:
            raise PeftkitError(
                f"{type(self.base_model).__name__} merges only the active adapter; "
                "set_adapter(name) first, then merge_and_unload()"
            )
        return self.base_model.unload(merge=True)

    def unload(self) -> nn.Module:
        """Remove the adapter layers without merging (after ``merge_adapter``: the base weights
        are restored first); return the plain model."""
        return self.base_model.unload(merge=False)

    # -- saving and loading --------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        *,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT does
        (PEFT's arguments, in PEFT's order).

        The "default" adapter goes into ``save_directory``, others into ``save_directory/<name>``.
        ``is_main_process=False`` writes nothing (for multi-process training); as in PEFT, every
        process still reads the tensors, so that a ``state_dict`` which gathers shards when read
        (``peftkit.train.fsdp.FullStateDict``) sees every process take part.
        ``save_embedding_layers`` (PEFT's option): also save the full input/output embedding
        matrices; "auto" does so when ``embed_tokens``/``lm_head`` is a target or the vocabulary
        was resized (``config.vocab_size`` differs from the base model's).
        ``path_initial_model_for_weight_conversion`` (PEFT's option): the directory where this
        PiSSA / OLoRA adapter was saved right after ``get_peft_model``, before training; the adapter
        is then written as a plain LoRA adapter of twice the rank for the original, unchanged base
        model (``methods/lora/plain_conversion.py``).
        """
        if not safe_serialization:
            raise ValueError("peftkit writes adapters only as safetensors; drop safe_serialization=False")
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            initial = load_adapter_weights(resolve_adapter_dir(path_initial_model_for_weight_conversion))
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        self._check_names(names)
        tensors = {
            name: get_peft_model_state_dict(
                self, state_dict, name, save_embedding_layers=save_embedding_layers
            )
            for name in names
        }
        if not is_main_process:
            return
        base = self.get_base_model()
        adapters = {}
        for name in names:
            config = self.peft_config[name].to_peft_json()
            config["inference_mode"] = True
            config["base_model_name_or_path"] = config["base_model_name_or_path"] or _model_name(base)
            # Without a task type PEFT records the model class, so AutoPeftModel can rebuild it.
            config["auto_mapping"] = (
                {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
                if config["task_type"] is None
                else None
            )
            if initial is not None:
                tensors[name], config = self.base_model.as_plain_adapter(tensors[name], config, initial)
            adapters["" if name == "default" else name] = (tensors[name], config)
        save_adapters(save_directory, adapters)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        torch_device: str | torch.device | None = None,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` (a directory or Hub repo id;
        ``subfolder`` within it).

        Reads only safetensors. Called on ``PeftModel`` it returns the class for the saved
        ``task_type`` (``PeftModelForCausalLM`` for CAUSAL_LM, ...: see ``peftkit.task_models``).
        Without ``is_trainable`` the adapter is frozen and the model put in eval mode.
        ``autocast_adapter_dtype`` as in :func:`get_peft_model`. PEFT's ``ephemeral_gpu_offload``,
        ``low_cpu_mem_usage`` and ``torch_device`` are accepted and change nothing here: the saved
        tensors are copied into adapter weights that already sit on the model's device.
        """
        del ephemeral_gpu_offload, low_cpu_mem_usage, torch_device
        directory = resolve_adapter_dir(model_id, revision, subfolder)
        config = config if config is not None else PeftConfig.from_pretrained(directory)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        weights = load_adapter_weights(directory)  # before injecting: fail early on a missing/pickle file
        check_saved_vocabulary(model, weights)  # a resized vocabulary needs a resized base model
        if cls is PeftModel:
            from peftkit.task_models import model_class_for  # it imports this module

            model_cls = model_class_for(config.task_type)
        else:
            model_cls = cls
        peft_model = model_cls(model, config, adapter_name)
        set_peft_model_state_dict(peft_model, weights, adapter_name)
        if not autocast_adapter_dtype:
            peft_model._cast_adapter(adapter_name)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (not made active). The
        other arguments are PEFT's and mean what they do in :meth:`from_pretrained`."""
        del torch_device, ephemeral_gpu_offload, low_cpu_mem_usage
        directory = resolve_adapter_dir(model_id, revision, subfolder)
        config = dataclasses.replace(PeftConfig.from_pretrained(directory), inference_mode=not is_trainable)
        weights = load_adapter_weights(directory)
        self.add_adapter(adapter_name, config)
        set_peft_model_state_dict(self, weights, adapter_name)
        if not autocast_adapter_dtype:
            self._cast_adapter(adapter_name)

    def _cast_adapter(self, adapter_name: str) -> None:
        """Keep ``adapter_name``'s floating-point weights in the base model's dtype (fp16/bf16),
        not fp32 (``autocast_adapter_dtype=False``)."""
        dtype = self.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            return
        with torch.no_grad():
            for param in self._adapter_parameters(adapter_name):
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)


def __getattr__(name: str) -> Any:
    """Names that moved (the task classes to :mod:`peftkit.task_models`, ``get_peft_model`` to
    :mod:`peftkit.mapping`); their old import path still works."""
    if name in ("PeftModelForCausalLM", "TASK_MODEL_CLASSES"):
        from peftkit import task_models

        return getattr(task_models, name)
    if name == "get_peft_model":
        from peftkit.mapping import get_peft_model

        return get_peft_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
