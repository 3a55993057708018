"""The shared matrix: every method × every architecture × every scenario, on tiny random models.

    methods        lora, ia3, loha, lokr, oft, boft, adalora (adapters), bottleneck (an adapter PEFT lacks)
                   and bitfit, partial, full (selective)
    architectures  Llama, BLOOM (fused qkv), GPT-2 (Conv1D), T5 / mT5 (encoder-decoder),
                   BERT / RoBERTa (sequence classification), ViT (images), a user's own MLP
    scenarios      forward equals the base model at init; backward reaches exactly the trainable
                   parameters; training lowers the loss and changes only them; save -> load into a
                   fresh base gives the same outputs; counts on the meta device; counts = PEFT's

A case is (method, architecture); its config comes from :func:`config_kwargs`, the same keyword
arguments for peftkit's config class and (where PEFT has the method) PEFT's. Combinations that
are invalid by definition are skipped with their reason, not left out silently.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from _tiny_models import (
    TinyCase,
    tiny_bert_case,
    tiny_bloom_case,
    tiny_gpt2_case,
    tiny_llama_case,
    tiny_mlp_case,
    tiny_mt5_case,
    tiny_roberta_case,
    tiny_t5_case,
    tiny_vit_case,
)
from peftkit.methods import get_method
from peftkit.methods.selective import find_blocks

pytestmark = pytest.mark.usefixtures("single_thread")

# inject layers; PEFT has them (the oracle for counts)
ADAPTERS = ("lora", "ia3", "loha", "lokr", "oft", "boft", "adalora")
SELECTIVE = ("bitfit", "partial", "full")  # train the model's own parameters
# inject layers; PEFT lacks them (no oracle for counts). adapterdrop: bottleneck adapters without the
# lowest layer's (a config variant, see VARIANT_OF); adapter_fusion: fuses two saved random bottleneck
# adapters per architecture (see fusion_sources).
OWN_ADAPTERS = ("bottleneck", "adapterdrop", "adapter_fusion")
VARIANT_OF = {"adapterdrop": "bottleneck"}  # matrix name -> registered method whose config it uses
# wrap attention modules (PEFT has them; nothing to merge, so not in ADAPTERS' merge tests)
ATTENTION_ADAPTERS = ("adaption_prompt",)
# soft prompts: virtual tokens or per-layer key/values, nothing injected (PEFT has them; P-tuning v2 is
# PEFT's prefix tuning under another name). They change the output from the start (see the forward test).
SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_v2")
# a prefix (past key/values) plus injected layers; PEFT lacks them. Like soft prompts, they change the
# output from the start (the prefix), see the forward test.
COMPOSITE = ("mam", "unipelt")
METHODS = ADAPTERS + SELECTIVE + OWN_ADAPTERS + ATTENTION_ADAPTERS + SOFT_PROMPTS + COMPOSITE
PEFT_CONFIGS = {
    "lora": "LoraConfig",
    "ia3": "IA3Config",
    "loha": "LoHaConfig",
    "lokr": "LoKrConfig",
    "oft": "OFTConfig",
    "boft": "BOFTConfig",
    "adalora": "AdaLoraConfig",
    "adaption_prompt": "AdaptionPromptConfig",
    "prompt_tuning": "PromptTuningConfig",
    "prefix_tuning": "PrefixTuningConfig",
    "p_tuning": "PromptEncoderConfig",
    "p_tuning_v2": "PrefixTuningConfig",
}

BUILDERS: dict[str, Callable[[], TinyCase]] = {
    "llama": tiny_llama_case,
    "bloom": tiny_bloom_case,
    "gpt2": tiny_gpt2_case,
    "t5": tiny_t5_case,
    "mt5": tiny_mt5_case,
    "bert": tiny_bert_case,
    "roberta": tiny_roberta_case,
    "vit": tiny_vit_case,
    "mlp": tiny_mlp_case,
}
TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "bloom": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "t5": "SEQ_2_SEQ_LM",
    "mt5": "SEQ_2_SEQ_LM",
    "bert": "SEQ_CLS",
    "roberta": "SEQ_CLS",
}
# Randomly initialised classifier heads: trained in full next to every method but "full" (named in
# modules_to_save where no task type does it: BERT / RoBERTa's SEQ_CLS adds the head by default, as in PEFT).
HEADS = {"bert": ["classifier"], "roberta": ["classifier"], "vit": ["classifier"], "mlp": ["head"]}

# Targets where PEFT has no default: ViT and the user's MLP.
LORA_TARGETS = {"vit": ["q_proj", "v_proj"], "mlp": ["fc1", "fc2"]}
IA3_TARGETS = {
    "vit": dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]),
    "mlp": dict(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
}
CONV1D = {"gpt2"}  # GPT-2's transformers Conv1D layers store weights as (in, out)

# name of a parameter -> whether the method trains it (besides the heads in HEADS)
ADAPTER_PARAMETER = {
    "lora": ".lora_",
    "ia3": ".ia3_l.",
    "loha": ".hada_",
    "lokr": ".lokr_",
    "oft": ".oft_R.",
    "boft": ".boft_",  # boft_R and boft_s
    "adalora": ".lora_",  # lora_A, lora_E, lora_B (ranknum is frozen)
    "bottleneck": ".adapter_",
    "adapterdrop": ".adapter_",
    "adapter_fusion": ".fusion_",  # the fused adapters' .adapter_ weights stay frozen
    "adaption_prompt": ".adaption_",
    **{method: ".prompt_encoder." for method in SOFT_PROMPTS},
    "mam": (".prompt_encoder.", ".adapter_"),
    "unipelt": (".prompt_encoder.", ".prefix_gate.", ".lora_", ".adapter_"),
}
# Bottleneck adapters: Houlsby placement (after attention and feed-forward) where the architecture
# has a default; the user's MLP has no attention, so one Pfeiffer adapter after each fc2.
BOTTLENECK = {"mlp": dict(adapter_type="pfeiffer", mlp_modules=["fc2"])}


def skip_reason(method: str, arch: str) -> str | None:
    """Why (method, arch) is invalid by definition, or None."""
    if method in SOFT_PROMPTS + COMPOSITE and arch in ("vit", "mlp"):
        return f"{arch} has no word embeddings: soft prompts are virtual tokens (refused with an error)"
    if method == "mam" and arch in ("bert", "roberta"):
        return (
            f"{arch} splits its feed-forward block in two, so there is no block whose input a parallel adapter "
            "could read (no default placement; refused with an error naming mlp_modules)"
        )
    if method == "unipelt" and arch in ("t5", "mt5"):
        return "UniPELT's prefix gate needs one layer stack; encoder-decoder models are refused with an error"
    if method in ("loha", "lokr", "oft") and arch in CONV1D:
        return f"{method} adapts nn.Linear only; GPT-2's layers are Conv1D (PEFT refuses them too)"
    if method == "boft" and arch in CONV1D:
        return "boft adapts nn.Linear and nn.Conv2d only; GPT-2's layers are Conv1D (PEFT refuses them too)"
    if method == "adaption_prompt" and arch not in ("llama", "gpt2"):
        return (
            f"adaption prompts support the llama, mistral and gpt2 model types only, as in PEFT; {arch} is "
            "refused with an error naming them (tests/test_adaption_prompt.py)"
        )
    if method == "adapterdrop" and arch == "mlp":
        return (
            "AdapterDrop drops by layer number; the user's MLP has no numbered layers (refused with an error)"
        )
    return None


_FUSION_SOURCES: dict[str, list[str]] = {}


def fusion_sources(arch: str) -> list[str]:
    """Two saved bottleneck adapters with random (as if trained) weights on ``arch``, made once."""
    if arch not in _FUSION_SOURCES:
        root = Path(tempfile.mkdtemp(prefix=f"peftkit-fusion-{arch}-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(5)
        for name in ("a", "b"):
            config = make_config("bottleneck", arch, init="random")
            peftkit.get_peft_model(BUILDERS[arch]().model, config).save_pretrained(root / name)
        torch.random.set_rng_state(generator_state)
        _FUSION_SOURCES[arch] = [str(root / "a"), str(root / "b")]
    return _FUSION_SOURCES[arch]


def config_kwargs(method: str, arch: str) -> dict[str, Any]:
    """The config keyword arguments for ``method`` on ``arch`` (valid for PEFT's class too)."""
    kwargs: dict[str, Any] = {}
    if arch in TASK_TYPES:
        kwargs["task_type"] = TASK_TYPES[arch]
    if method != "full" and arch in HEADS and arch not in TASK_TYPES:  # a SEQ_CLS task trains its head itself
        kwargs["modules_to_save"] = HEADS[arch]
    if method in ("lora", "loha", "lokr"):
        kwargs["target_modules"] = LORA_TARGETS.get(arch)  # None: the architecture's default
        kwargs["r"] = 4
        if method == "lora" and arch in CONV1D:
            kwargs["fan_in_fan_out"] = True
    elif method == "adalora":  # PEFT requires total_step; the budget shrinks from 4 to 2 ranks
        kwargs.update(target_modules=LORA_TARGETS.get(arch), init_r=4, target_r=2, total_step=10)
        if arch in CONV1D:
            kwargs["fan_in_fan_out"] = True
    elif method == "oft":
        kwargs["target_modules"] = LORA_TARGETS.get(arch)
        kwargs.update(r=0, oft_block_size=4)  # tiny layers: blocks of 4 features
    elif method == "boft":  # one butterfly factor: PEFT on CPU (no CUDA extension) allows no more
        kwargs.update(target_modules=LORA_TARGETS.get(arch), boft_block_size=4)
    elif method == "ia3":
        kwargs.update(IA3_TARGETS.get(arch, {}))
        if arch in CONV1D:
            kwargs["fan_in_fan_out"] = True
    elif method == "partial":
        kwargs["train_top_n_layers"] = 1
    elif method == "bitfit" and arch in ("llama", "t5", "mt5"):  # no biases: train added zero biases
        kwargs["add_missing_biases"] = True
    elif method == "adaption_prompt":
        kwargs.update(adapter_len=3, adapter_layers=1)  # the top one of two layers
    elif method in ("bottleneck", "adapterdrop"):
        kwargs.update(bottleneck_size=4, **BOTTLENECK.get(arch, {}))
        if method == "adapterdrop":
            kwargs["drop_lowest_layers"] = 1  # of two: only the top layer keeps its adapters
    elif method == "adapter_fusion":
        kwargs["adapters"] = fusion_sources(arch)
    elif method in SOFT_PROMPTS:
        kwargs["num_virtual_tokens"] = 3
    elif method in COMPOSITE:  # small prefix MLP and bottleneck for tiny models
        kwargs.update(num_virtual_tokens=3, encoder_hidden_size=8, bottleneck_size=4)
    return kwargs


def make_config(method: str, arch: str, **overrides: Any) -> peftkit.PeftConfig:
    return get_method(VARIANT_OF.get(method, method)).config_cls(
        **{**config_kwargs(method, arch), **overrides}
    )


CASES = [
    pytest.param(
        method, arch, id=f"{method}-{arch}", marks=[pytest.mark.skip(reason=reason)] if reason else []
    )
    for method in METHODS
    for arch in BUILDERS
    for reason in [skip_reason(method, arch)]
]
PEFT_CASES = [p for p in CASES if p.values[0] in ADAPTERS + ATTENTION_ADAPTERS + SOFT_PROMPTS]


# -- helpers ----------------------------------------------------------------------------------------


def wrap(method: str, arch: str) -> tuple[peftkit.PeftModel, TinyCase]:
    case = BUILDERS[arch]()
    return peftkit.get_peft_model(case.model, make_config(method, arch)), case


def output_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def run(model: nn.Module, case: TinyCase) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**case.inputs))


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def intended_names(model: peftkit.PeftModel, method: str, arch: str) -> set[str]:
    """What ``method`` should train, decided from parameter names alone (independently of peftkit)."""
    heads = tuple(f".{head}." for head in HEADS.get(arch, []) if method != "full")
    if method == "partial":
        blocks_name, blocks = find_blocks(BUILDERS[arch]().model)
        heads += (f".{blocks_name}.{len(blocks) - 1}.",)

    def wanted(name: str) -> bool:
        if method == "full":
            return True
        if method in ADAPTER_PARAMETER:
            parts = ADAPTER_PARAMETER[method]
            parts = (parts,) if isinstance(parts, str) else parts
            return any(part in name for part in parts) or ".modules_to_save." in name
        if any(h in f".{name.removeprefix('base_model.model.')}" for h in heads):
            return True
        return method == "bitfit" and name.endswith(".bias")

    return {name for name, _ in model.named_parameters() if wanted(name)}


def perturb(model: nn.Module) -> None:
    """Move every trainable parameter off its init, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


# -- scenarios --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, arch", CASES)
def test_forward_equals_base_at_init(method, arch):
    """Every method's default init leaves the model's function unchanged (adapters start at identity)."""
    if method == "adapter_fusion":
        pytest.skip("fuses already-trained adapters: it starts as their mix (tests/test_adapter_fusion.py)")
    base = BUILDERS[arch]()
    expected = run(base.model, base)
    model, case = wrap(method, arch)
    if method in SOFT_PROMPTS + COMPOSITE:  # the prompt is the change: without it the output is the base's
        assert not torch.allclose(run(model, case)[..., -expected.shape[-2] :, :], expected, atol=1e-4)
        with model.disable_adapter():
            torch.testing.assert_close(run(model, case), expected, atol=1e-6, rtol=0)
        return
    got = run(model, case)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, arch", CASES)
def test_backward_reaches_exactly_the_trainable_parameters(method, arch):
    model, case = wrap(method, arch)
    assert trainable_names(model) == intended_names(model, method, arch)
    case.loss(model(**case.inputs)).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable_names(model)


@pytest.mark.parametrize("method, arch", CASES)
def test_training_lowers_loss_and_changes_only_trainable(method, arch):
    model, case = wrap(method, arch)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    losses, got_grad = [], set()
    for _ in range(5):  # eval mode: no dropout, so the batch's loss is deterministic
        loss = case.loss(model(**case.inputs))
        loss.backward()
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed <= trainable_names(model)
    assert got_grad <= changed  # every parameter with a gradient moved
    assert changed


@pytest.mark.parametrize("method, arch", CASES)
def test_save_and_load_into_a_fresh_base(method, arch, tmp_path):
    model, case = wrap(method, arch)
    perturb(model)
    expected = run(model, case)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(BUILDERS[arch]().model, tmp_path)
    torch.testing.assert_close(run(loaded, case), expected, atol=1e-6, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0


@pytest.mark.parametrize("method, arch", CASES)
def test_counts_on_meta_device_equal_real(method, arch):
    with torch.device("meta"):
        meta_case = BUILDERS[arch]()
    meta = peftkit.get_peft_model(meta_case.model, make_config(method, arch))
    assert all(p.is_meta for p in meta.parameters())
    real, _ = wrap(method, arch)
    assert meta.get_nb_trainable_parameters() == real.get_nb_trainable_parameters()


@pytest.mark.parametrize("method, arch", PEFT_CASES)
def test_counts_equal_peft(method, arch):
    peft = pytest.importorskip("peft")
    theirs_config = getattr(peft, PEFT_CONFIGS[method])(**config_kwargs(method, arch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(BUILDERS[arch]().model, theirs_config)
    ours, _ = wrap(method, arch)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    names = trainable_names(ours)
    if method in SOFT_PROMPTS:  # PEFT keeps prompt_encoder on PeftModel and base_model is the user's model
        names = {n.replace("base_model.prompt_encoder.", "prompt_encoder.", 1) for n in names}
        names = {n.replace("base_model.model.", "base_model.", 1) for n in names}
    assert names == trainable_names(theirs)


# -- default targets ------------------------------------------------------------------------------

DEFAULT_CASES = [
    pytest.param(method, arch, id=f"{method}-{arch}")
    for method in ADAPTERS
    for arch in ("llama", "bloom", "gpt2", "t5", "mt5", "bert", "roberta")
    if skip_reason(method, arch) is None
]


@pytest.mark.parametrize("method, arch", DEFAULT_CASES)
def test_default_targets_match_peft(method, arch):
    """With target_modules=None both libraries adapt the same modules (PEFT's per-model defaults)."""
    peft = pytest.importorskip("peft")
    kwargs = {**config_kwargs(method, arch), "target_modules": None}
    kwargs.pop("feedforward_modules", None)
    ours = peftkit.get_peft_model(BUILDERS[arch]().model, get_method(method).config_cls(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(BUILDERS[arch]().model, getattr(peft, PEFT_CONFIGS[method])(**kwargs))
    assert trainable_names(ours) == trainable_names(theirs)


@pytest.mark.parametrize("method", ADAPTERS)
def test_merge_refuses_nan_weights(method):
    """Folding a diverged adapter into the base weights is refused with an error that names the layer,
    and atomically: a NaN in the LAST adapted layer leaves every earlier layer unmerged too."""
    model, _ = wrap(method, "llama")
    perturb(model)  # so that merging the healthy layers would change their weights
    last_name, last_layer = model.base_model.adapter_modules()[-1]
    trainable = [p for p in last_layer.parameters() if p.requires_grad and p.dim() > 0]
    with torch.no_grad():
        trainable[-1].view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf") as raised:
        model.merge_and_unload(safe_merge=True)
    assert last_name in str(raised.value)
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k].nan_to_num(), after[k].nan_to_num())]
    assert not changed, f"merging changed {changed[:3]} before it failed"


@pytest.mark.parametrize("method, arch", [c for c in CASES if c.values[0] in ADAPTERS + SELECTIVE])
def test_merged_model_equals_adapter(method, arch):
    """merge_and_unload (fp32) gives a plain model computing what the model with the adapter computed
    (selective methods keep their trained values)."""
    model, case = wrap(method, arch)
    perturb(model)
    model.eval()
    expected = run(model, case)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, peftkit.methods.base.AdapterModule) for m in merged.modules())
    torch.testing.assert_close(run(merged, case), expected, atol=1e-4, rtol=1e-4)
