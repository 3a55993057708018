"""peftkit: fine-tune transformer models with full fine-tuning and parameter-efficient methods."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names that need torch, imported on first use so that ``import peftkit`` stays fast.
_LAZY_EXPORTS = {
    "AdaLoraConfig": "peftkit.methods.adalora",
    "AdaLoraModel": "peftkit.methods.adalora",
    "AdaptionPromptConfig": "peftkit.methods.adaption_prompt",
    "AdaptionPromptModel": "peftkit.methods.adaption_prompt",
    "AutoPeftModel": "peftkit.auto",
    "AutoPeftModelForCausalLM": "peftkit.auto",
    "AutoPeftModelForSeq2SeqLM": "peftkit.auto",
    "AutoPeftModelForSequenceClassification": "peftkit.auto",
    "AutoPeftModelForTokenClassification": "peftkit.auto",
    "AutoPeftModelForQuestionAnswering": "peftkit.auto",
    "AutoPeftModelForFeatureExtraction": "peftkit.auto",
    "BottleneckConfig": "peftkit.methods.adapters",
    "BitFitConfig": "peftkit.methods.selective",
    "FullFinetuneConfig": "peftkit.methods.selective",
    "PartialFinetuneConfig": "peftkit.methods.selective",
    "LoHaConfig": "peftkit.methods.loha",
    "LoHaModel": "peftkit.methods.loha",
    "LoKrConfig": "peftkit.methods.lokr",
    "LoKrModel": "peftkit.methods.lokr",
    "OFTConfig": "peftkit.methods.oft",
    "OFTModel": "peftkit.methods.oft",
    "BOFTConfig": "peftkit.methods.boft",
    "BOFTModel": "peftkit.methods.boft",
    "IA3Config": "peftkit.methods.ia3",
    "IA3Model": "peftkit.methods.ia3",
    "LoraConfig": "peftkit.methods.lora",
    "LoraModel": "peftkit.methods.lora",
    "PromptLearningConfig": "peftkit.methods.prompt_learning",
    "PromptTuningConfig": "peftkit.methods.prompt_tuning",
    "PromptTuningInit": "peftkit.methods.prompt_tuning",
    "PromptEmbedding": "peftkit.methods.prompt_tuning",
    "PrefixTuningConfig": "peftkit.methods.prefix_tuning",
    "PrefixEncoder": "peftkit.methods.prefix_tuning",
    "PromptEncoderConfig": "peftkit.methods.p_tuning",
    "PromptEncoderReparameterizationType": "peftkit.methods.p_tuning",
    "PromptEncoder": "peftkit.methods.p_tuning",
    "PTuningV2Config": "peftkit.methods.p_tuning_v2",
    "MAMConfig": "peftkit.methods.mam",
    "UniPELTConfig": "peftkit.methods.unipelt",
    "PeftConfig": "peftkit.methods.base",
    "TaskType": "peftkit.methods.base",
    "PeftType": "peftkit.methods.peft_type",
    "PeftModel": "peftkit.peft_model",
    "PeftModelForCausalLM": "peftkit.task_models",
    "PeftModelForSeq2SeqLM": "peftkit.task_models",
    "PeftModelForSequenceClassification": "peftkit.task_models",
    "PeftModelForTokenClassification": "peftkit.task_models",
    "PeftModelForQuestionAnswering": "peftkit.task_models",
    "PeftModelForFeatureExtraction": "peftkit.task_models",
    "get_peft_model": "peftkit.mapping",
    "get_peft_config": "peftkit.mapping",
    "PEFT_TYPE_TO_CONFIG_MAPPING": "peftkit.mapping",
    "QuantizationConfig": "peftkit.quantization",
    "prepare_model_for_kbit_training": "peftkit.quantization",
    "get_peft_model_state_dict": "peftkit.serialization",
    "set_peft_model_state_dict": "peftkit.serialization",
    "load_peft_weights": "peftkit.serialization",
}

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    "BOFTConfig",
    "BOFTModel",
    "BottleneckConfig",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "OFTConfig",
    "OFTModel",
    "BitFitConfig",
    "FullFinetuneConfig",
    "PartialFinetuneConfig",
    "IA3Config",
    "IA3Model",
    "LoraConfig",
    "LoraModel",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEmbedding",
    "PrefixTuningConfig",
    "PrefixEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptEncoder",
    "PTuningV2Config",
    "MAMConfig",
    "UniPELTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "TaskType",
    "PeftType",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "__version__",
    "get_peft_model",
    "get_peft_config",
    "QuantizationConfig",
    "prepare_model_for_kbit_training",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "load_peft_weights",
]

if TYPE_CHECKING:
    from peftkit.auto import (
        AutoPeftModel,
        AutoPeftModelForCausalLM,
        AutoPeftModelForFeatureExtraction,
        AutoPeftModelForQuestionAnswering,
        AutoPeftModelForSeq2SeqLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForTokenClassification,
    )
    from peftkit.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_config, get_peft_model
    from peftkit.methods.adalora import AdaLoraConfig, AdaLoraModel
    from peftkit.methods.adapters import BottleneckConfig
    from peftkit.methods.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
    from peftkit.methods.base import PeftConfig, TaskType
    from peftkit.methods.boft import BOFTConfig, BOFTModel
    from peftkit.methods.ia3 import IA3Config, IA3Model
    from peftkit.methods.loha import LoHaConfig, LoHaModel
    from peftkit.methods.lokr import LoKrConfig, LoKrModel
    from peftkit.methods.lora import LoraConfig, LoraModel
    from peftkit.methods.mam import MAMConfig
    from peftkit.methods.oft import OFTConfig, OFTModel
    from peftkit.methods.p_tuning import (
        PromptEncoder,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
    )
    from peftkit.methods.p_tuning_v2 import PTuningV2Config
    from peftkit.methods.peft_type import PeftType
    from peftkit.methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
    from peftkit.methods.prompt_learning import PromptLearningConfig
    from peftkit.methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
    from peftkit.methods.selective import BitFitConfig, FullFinetuneConfig, PartialFinetuneConfig
    from peftkit.methods.unipelt import UniPELTConfig
    from peftkit.peft_model import PeftModel
    from peftkit.quantization import QuantizationConfig, prepare_model_for_kbit_training
    from peftkit.serialization import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
    from peftkit.task_models import (
        PeftModelForCausalLM,
        PeftModelForFeatureExtraction,
        PeftModelForQuestionAnswering,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
    )


def __getattr__(name: str) -> Any:
    """Resolve the names in ``_LAZY_EXPORTS`` only; anything else is a plain AttributeError."""
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
