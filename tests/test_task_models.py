"""Task types in the Python API: PeftModelFor<Task>, the default trained heads, AutoPeftModelFor<Task>.

    task type            tiny model (random weights)             head trained by default
    SEQ_CLS              BERT, RoBERTa (classifier), Llama (score)  classifier / score
    TOKEN_CLS            BERT                                     classifier
    QUESTION_ANS         BERT                                     qa_outputs
    FEATURE_EXTRACTION   BERT without head                        -
    SEQ_2_SEQ_LM         T5                                       -

PEFT 0.21 is the oracle: same config on the same model -> same trainable counts and names, same
saved keys; an adapter saved by either library loads in the other with the same outputs. For
peftkit's own methods (no oracle) the head must be trainable, saved, and reloaded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
import peftkit.auto
from _peft_compat import let_peft_hand_over_prefix
from _tiny_models import _encoder_kwargs, _ids, tiny_bert_case, tiny_roberta_case, tiny_t5_case
from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit.errors import PeftkitError
from peftkit.methods import get_method

pytestmark = pytest.mark.usefixtures("single_thread")

peft = pytest.importorskip("peft")


# -- tiny models with each head ---------------------------------------------------------------------


def _bert(head: str, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    kwargs = {**_encoder_kwargs(), **({"num_labels": 2} if "QuestionAnswering" in head else {})}  # start, end
    config = transformers.BertConfig(vocab_size=100, max_position_embeddings=32, **kwargs)
    return getattr(transformers, head)(config).eval()


def _llama_seq_cls(seed: int = 0) -> nn.Module:
    from transformers import LlamaForSequenceClassification

    config = make_tiny_llama(vocab_size=100, seed=seed).config
    config.num_labels = 3
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert-seq_cls": lambda: tiny_bert_case().model,
    "roberta-seq_cls": lambda: tiny_roberta_case().model,
    "llama-seq_cls": _llama_seq_cls,
    "bert-token_cls": lambda: _bert("BertForTokenClassification"),
    "bert-qa": lambda: _bert("BertForQuestionAnswering"),
    "bert-features": lambda: _bert("BertModel"),
    "t5-seq2seq": lambda: tiny_t5_case().model,
}
TASK = {
    "bert-seq_cls": "SEQ_CLS",
    "roberta-seq_cls": "SEQ_CLS",
    "llama-seq_cls": "SEQ_CLS",
    "bert-token_cls": "TOKEN_CLS",
    "bert-qa": "QUESTION_ANS",
    "bert-features": "FEATURE_EXTRACTION",
    "t5-seq2seq": "SEQ_2_SEQ_LM",
}
HEAD = {  # the module trained in full by default
    "bert-seq_cls": "classifier",
    "roberta-seq_cls": "classifier",
    "llama-seq_cls": "score",
    "bert-token_cls": "classifier",
    "bert-qa": "qa_outputs",
}
HEAD_WEIGHT = {"roberta-seq_cls": "out_proj.weight"}  # RoBERTa's head: dense + out_proj
CLASS = {
    "SEQ_CLS": "PeftModelForSequenceClassification",
    "TOKEN_CLS": "PeftModelForTokenClassification",
    "QUESTION_ANS": "PeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "PeftModelForFeatureExtraction",
    "SEQ_2_SEQ_LM": "PeftModelForSeq2SeqLM",
    "CAUSAL_LM": "PeftModelForCausalLM",
}
AUTO = {task: "Auto" + name for task, name in CLASS.items()}


def inputs(arch: str, *, targets: bool = True, virtual: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of 2 x 9 tokens, with the task's targets (``virtual``: soft prompt length, for
    per-token labels, which then cover the virtual positions too)."""
    ids = _ids(100)
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    task = TASK[arch]
    if not targets:
        if task == "SEQ_2_SEQ_LM":  # no labels to shift into decoder inputs
            batch["decoder_input_ids"] = _ids(100, (2, 5), seed=2)
        return batch
    if task == "SEQ_CLS":
        batch["labels"] = torch.tensor([0, 2])
    elif task == "TOKEN_CLS":
        batch["labels"] = torch.randint(0, 3, (2, 9 + virtual), generator=torch.Generator().manual_seed(4))
    elif task == "QUESTION_ANS":
        batch.update(start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([4, 6]))
    elif task == "SEQ_2_SEQ_LM":
        batch["labels"] = _ids(100, (2, 5), seed=2)
    return batch


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Everything the task's output carries, flattened into one tensor."""
    with torch.no_grad():
        out = model(**batch)
    if hasattr(out, "start_logits"):
        parts = [out.start_logits, out.end_logits]
    elif hasattr(out, "logits"):
        parts = [out.logits]
    else:
        parts = [out.last_hidden_state]
    if getattr(out, "loss", None) is not None:
        parts.append(out.loss.reshape(1, 1))
    return torch.cat([p.reshape(-1) for p in parts])


PARITY_METHODS = {  # peftkit method -> PEFT config class and the keyword arguments both take
    "lora": ("LoraConfig", {"r": 4}),
    "ia3": ("IA3Config", {}),
    "loha": ("LoHaConfig", {"r": 4}),
    "prompt_tuning": ("PromptTuningConfig", {"num_virtual_tokens": 3}),
    "prefix_tuning": ("PrefixTuningConfig", {"num_virtual_tokens": 3}),
}
SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning")
PARITY_CASES = [pytest.param(m, a, id=f"{m}-{a}") for a in MODELS for m in PARITY_METHODS]


def config_kwargs(method: str, arch: str, **extra: Any) -> dict[str, Any]:
    return {"task_type": TASK[arch], **PARITY_METHODS[method][1], **extra}


def ours_model(method: str, arch: str, **extra: Any) -> peftkit.PeftModel:
    config = get_method(method).config_cls(**config_kwargs(method, arch, **extra))
    return peftkit.get_peft_model(MODELS[arch](), config)


def theirs_model(method: str, arch: str, **extra: Any) -> Any:
    config = getattr(peft, PARITY_METHODS[method][0])(**config_kwargs(method, arch, **extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return let_peft_hand_over_prefix(peft.get_peft_model(MODELS[arch](), config))


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def as_peft_names(names: set[str], method: str) -> set[str]:
    """PEFT keeps a soft prompt's encoder on PeftModel and the user's model as ``base_model``."""
    if method not in SOFT_PROMPTS:
        return names
    names = {n.replace("base_model.prompt_encoder.", "prompt_encoder.", 1) for n in names}
    return {n.replace("base_model.model.", "base_model.", 1) for n in names}


def perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable parameter off its init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def batch_for(method: str, arch: str) -> dict[str, torch.Tensor]:
    virtual = 3 if method == "prompt_tuning" else 0
    if method == "prompt_tuning" and TASK[arch] == "TOKEN_CLS":
        return inputs(arch, targets=False)  # logits cover the virtual tokens too: no per-token labels
    return inputs(arch, virtual=virtual)


# -- parity with PEFT -------------------------------------------------------------------------------


@pytest.mark.parametrize("method, arch", PARITY_CASES)
def test_class_counts_and_trainable_names_equal_peft(method, arch):
    ours, theirs = ours_model(method, arch), theirs_model(method, arch)
    assert type(ours).__name__ == type(theirs).__name__ == CLASS[TASK[arch]]
    assert isinstance(ours, getattr(peftkit, CLASS[TASK[arch]]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert as_peft_names(trainable(ours), method) == trainable(theirs)
    if arch in HEAD:  # the head's copy trains; its original stays frozen
        head = f".{HEAD[arch]}.modules_to_save.default."
        assert any(head in name for name in trainable(ours))
        assert not any(".original_module." in name for name in trainable(ours))
    assert ours.peft_config["default"].modules_to_save == (
        None
        if arch not in HEAD
        else (["qa_outputs"] if TASK[arch] == "QUESTION_ANS" else ["classifier", "score"])
    )


@pytest.mark.parametrize("method, arch", PARITY_CASES)
def test_saved_adapters_load_both_ways_with_the_same_outputs(method, arch, tmp_path):
    batch = batch_for(method, arch)
    ours, theirs = ours_model(method, arch), theirs_model(method, arch)
    perturb(ours, seed=1)
    perturb(theirs, seed=2)
    ours.eval()
    theirs.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    if arch in HEAD:  # the trained head copy is in the file, under PEFT's name
        prefix = "base_model." if method in SOFT_PROMPTS else "base_model.model."
        assert f"{prefix}{HEAD[arch]}.{HEAD_WEIGHT.get(arch, 'weight')}" in ours_keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_loaded = let_peft_hand_over_prefix(
            peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "ours")
        )
    ours_loaded = peftkit.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "theirs")
    assert type(ours_loaded).__name__ == type(theirs_loaded).__name__ == CLASS[TASK[arch]]
    # peftkit's adapter in PEFT, PEFT's adapter in peftkit: each computes what its source computed
    expected_ours, expected_theirs = outputs(ours, batch), outputs(theirs, batch)
    assert not torch.allclose(expected_ours, expected_theirs)  # two different adapters
    torch.testing.assert_close(outputs(theirs_loaded, batch), expected_ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(ours_loaded, batch), expected_theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_user_modules_to_save_is_kept_and_extended_like_peft(method):
    arch = "bert-seq_cls"
    user = get_method(method).config_cls(
        **config_kwargs(method, arch, modules_to_save=["classifier", "pooler"])
    )
    ours = peftkit.get_peft_model(MODELS[arch](), user)
    assert user.modules_to_save == ["classifier", "pooler"]  # the caller's config is not changed
    assert ours.peft_config["default"].modules_to_save == ["classifier", "pooler", "score"]
    theirs = theirs_model(method, arch, modules_to_save=["classifier", "pooler"])  # PEFT repeats names
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert as_peft_names(trainable(ours), method) == trainable(theirs)


def test_second_adapter_and_load_adapter_train_their_own_head_copy(tmp_path):
    arch = "bert-seq_cls"
    ours = ours_model("lora", arch)
    ours.add_adapter("other", peftkit.LoraConfig(task_type="SEQ_CLS", r=2))
    assert ours.peft_config["other"].modules_to_save == ["classifier", "score"]
    assert "base_model.model.classifier.modules_to_save.other.weight" in dict(ours.named_parameters())
    ours.save_pretrained(tmp_path)
    fresh = peftkit.PeftModel.from_pretrained(MODELS[arch](), tmp_path)
    fresh.load_adapter(tmp_path / "other", "other", is_trainable=True)
    fresh.set_adapter("other")
    names = trainable(fresh)
    assert "base_model.model.classifier.modules_to_save.other.weight" in names
    assert not any(".default." in n for n in names)


# -- peftkit's own methods (PEFT lacks them): the head still trains and is saved -----------------------

OWN_METHODS = {
    "bitfit": ("bert-seq_cls", {}),
    "partial": ("bert-seq_cls", {"train_top_n_layers": 1}),
    "full": ("bert-seq_cls", {}),
    "bottleneck": ("bert-seq_cls", {"bottleneck_size": 4}),
    "p_tuning_v2": ("bert-seq_cls", {"num_virtual_tokens": 3}),
    "unipelt": ("bert-seq_cls", {"num_virtual_tokens": 3, "encoder_hidden_size": 8, "bottleneck_size": 4}),
    # BERT has no feed-forward block for MAM's parallel adapter: Llama's score head instead
    "mam": ("llama-seq_cls", {"num_virtual_tokens": 3, "encoder_hidden_size": 8, "bottleneck_size": 4}),
    "adapter_fusion": ("bert-seq_cls", None),  # two saved bottleneck adapters, made in the test
}


@pytest.mark.parametrize("method", list(OWN_METHODS))
def test_own_methods_train_save_and_reload_the_head(method, tmp_path):
    arch, kwargs = OWN_METHODS[method]
    if kwargs is None:
        sources = []
        for name in ("a", "b"):
            source = peftkit.get_peft_model(
                MODELS[arch](),
                peftkit.BottleneckConfig(task_type="SEQ_CLS", bottleneck_size=4, init="random"),
            )
            source.save_pretrained(tmp_path / name)
            sources.append(str(tmp_path / name))
        kwargs = {"adapters": sources}
    config = get_method(method).config_cls(task_type="SEQ_CLS", **kwargs)
    model = peftkit.get_peft_model(MODELS[arch](), config)
    assert isinstance(model, peftkit.PeftModelForSequenceClassification)
    head = HEAD[arch]
    head_params = {
        n for n in dict(model.named_parameters()) if f".{head}." in n and ".original_module." not in n
    }
    assert head_params and head_params <= trainable(model)
    perturb(model, seed=3)
    model.eval()
    batch = inputs(arch)
    expected = outputs(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(f".{head}.weight" in key for key in saved), sorted(saved)
    loaded = peftkit.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "adapter")
    torch.testing.assert_close(outputs(loaded, batch), expected, atol=1e-6, rtol=0)


def test_full_finetuning_config_is_not_given_modules_to_save():
    model = peftkit.get_peft_model(MODELS["bert-seq_cls"](), peftkit.FullFinetuneConfig(task_type="SEQ_CLS"))
    assert model.peft_config["default"].modules_to_save is None
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_model_without_a_head_warns_and_is_not_refused():
    with pytest.warns(UserWarning, match="no classifier / score module"):
        model = peftkit.get_peft_model(
            MODELS["bert-features"](), peftkit.LoraConfig(task_type="SEQ_CLS", r=2)
        )
    assert model.peft_config["default"].modules_to_save is None


def test_a_head_named_by_the_user_needs_no_warning(recwarn):
    config = peftkit.LoraConfig(task_type="SEQ_CLS", r=2, modules_to_save=["pooler"])
    model = peftkit.get_peft_model(MODELS["bert-features"](), config)
    assert not [w for w in recwarn if "task head" in str(w.message)]
    assert model.peft_config["default"].modules_to_save == ["pooler"]
    assert "base_model.model.pooler.modules_to_save.default.dense.weight" in trainable(model)


# -- forward: losses and training --------------------------------------------------------------------


def _expected_loss(arch: str, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    cross_entropy = torch.nn.functional.cross_entropy
    if TASK[arch] == "QUESTION_ANS":
        start = cross_entropy(out.start_logits, batch["start_positions"])
        return (start + cross_entropy(out.end_logits, batch["end_positions"])) / 2
    logits = out.logits
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


@pytest.mark.parametrize("arch", ["bert-seq_cls", "llama-seq_cls", "bert-token_cls", "bert-qa", "t5-seq2seq"])
def test_labels_give_the_loss_of_the_head(arch):
    model = ours_model("lora", arch)
    perturb(model, seed=5)
    batch = inputs(arch)
    out = model(**batch)
    torch.testing.assert_close(out.loss, _expected_loss(arch, out, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
@pytest.mark.parametrize("arch", ["bert-seq_cls", "llama-seq_cls", "bert-token_cls", "bert-qa"])
def test_training_changes_only_the_head_copy_and_the_adapter(method, arch):
    if method == "prompt_tuning" and TASK[arch] == "TOKEN_CLS":
        pytest.skip("prompt tuning's token logits include the virtual tokens: per-token labels do not fit")
    model = ours_model(method, arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(arch)
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed <= trainable(model)
    head = f".{HEAD[arch]}.modules_to_save.default."
    assert any(head in n for n in changed)
    assert any(n.startswith("base_model.prompt_encoder.") or ".lora_" in n for n in changed)


def test_task_ids_are_refused():
    model = ours_model("lora", "bert-seq_cls")
    with pytest.raises(ValueError, match="task_ids"):
        model(**inputs("bert-seq_cls"), task_ids=torch.tensor([0, 0]))


def test_question_answering_passes_token_type_ids_on():
    model = ours_model("lora", "bert-qa")
    batch = inputs("bert-qa", targets=False)
    segments = torch.zeros_like(batch["input_ids"])
    segments[:, 5:] = 1
    base = outputs(model, batch)
    torch.testing.assert_close(outputs(model, {**batch, "token_type_ids": torch.zeros_like(segments)}), base)
    assert not torch.allclose(outputs(model, {**batch, "token_type_ids": segments}), base)


def test_soft_prompts_refuse_generate_for_classification():
    model = ours_model("prompt_tuning", "bert-token_cls")
    with pytest.raises(PeftkitError, match="TOKEN_CLS"):
        model.generate(input_ids=_ids(100))


def test_peft_model_for_causal_lm_keeps_its_import_path():
    from peftkit.peft_model import TASK_MODEL_CLASSES, PeftModelForCausalLM

    assert PeftModelForCausalLM is peftkit.PeftModelForCausalLM
    assert TASK_MODEL_CLASSES[peftkit.TaskType.CAUSAL_LM] is PeftModelForCausalLM
    assert set(TASK_MODEL_CLASSES) == set(peftkit.TaskType)


# -- AutoPeftModelFor<Task>: base model from the adapter directory alone ----------------------------


def save_base(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def trained_adapter(arch: str, tmp_path: Path, base: nn.Module | None = None) -> tuple[Path, torch.Tensor]:
    """An adapter saved for ``arch`` whose base is the directory it was loaded from, and its output."""
    import transformers

    base_dir = save_base(base if base is not None else MODELS[arch](), tmp_path / "base")
    auto_cls = getattr(transformers, peftkit.auto.AUTO_CLASS_OF_TYPE[TASK[arch]])
    model = peftkit.get_peft_model(
        auto_cls.from_pretrained(base_dir), peftkit.LoraConfig(task_type=TASK[arch], r=4)
    )
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
    perturb(model, seed=6)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", outputs(model, inputs(arch, targets=False))


@pytest.mark.parametrize(
    "arch", ["bert-seq_cls", "llama-seq_cls", "bert-token_cls", "bert-qa", "bert-features", "t5-seq2seq"]
)
def test_auto_peft_model_for_task_loads_base_and_adapter(arch, tmp_path):
    adapter, expected = trained_adapter(arch, tmp_path)
    auto = getattr(peftkit, AUTO[TASK[arch]])
    for loader in (auto, peftkit.AutoPeftModel):
        model = loader.from_pretrained(adapter)
        assert type(model).__name__ == CLASS[TASK[arch]]
        torch.testing.assert_close(outputs(model, inputs(arch, targets=False)), expected, atol=1e-5, rtol=0)
        assert model.get_nb_trainable_parameters()[0] == 0
    trainable_model = auto.from_pretrained(adapter, is_trainable=True)
    if arch in HEAD:
        assert any(f".{HEAD[arch]}.modules_to_save.default." in n for n in trainable(trainable_model))


@pytest.mark.parametrize("arch", ["bert-seq_cls", "bert-token_cls"])
def test_auto_sizes_the_head_from_the_adapter(arch, tmp_path):
    """A base saved without the head (BertModel) would get transformers' default 2 labels; the adapter's
    head copy has 3, so the head is built with 3."""
    adapter, expected = trained_adapter(arch, tmp_path / "trained")
    headless = MODELS["bert-features"]()
    headless.config.num_labels = 2  # transformers' default, as for a base model saved without any head
    base = save_base(headless, tmp_path / "headless")
    model = getattr(peftkit, AUTO[TASK[arch]]).from_pretrained(adapter, base_model=base)
    assert model.config.num_labels == 3
    assert outputs(model, inputs(arch, targets=False)).shape == expected.shape
    with pytest.raises(PeftkitError, match=r"classifier"):  # an explicit wrong count: the error names it
        getattr(peftkit, AUTO[TASK[arch]]).from_pretrained(adapter, base_model=base, num_labels=5)


@pytest.mark.parametrize("arch", ["bert-seq_cls", "bert-qa", "t5-seq2seq"])
def test_auto_names_mismatched_modules(arch, tmp_path):
    adapter, _ = trained_adapter(arch, tmp_path / "trained")
    wider = MODELS[arch]()
    wide_kwargs = {"d_model": 32} if TASK[arch] == "SEQ_2_SEQ_LM" else {"hidden_size": 32}
    config = type(wider.config)(**{**wider.config.to_dict(), **wide_kwargs})
    other = save_base(type(wider)(config), tmp_path / "wider")
    name = "q.lora_A" if TASK[arch] == "SEQ_2_SEQ_LM" else "query.lora_A"
    with pytest.raises(PeftkitError, match=name.replace(".", r"\.")):
        getattr(peftkit, AUTO[TASK[arch]]).from_pretrained(adapter, base_model=other)


def test_auto_class_for_another_task_is_refused(tmp_path):
    adapter, _ = trained_adapter("bert-seq_cls", tmp_path)
    with pytest.raises(PeftkitError, match="AutoPeftModelForSequenceClassification"):
        peftkit.AutoPeftModelForTokenClassification.from_pretrained(adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier", "score"]


@pytest.mark.parametrize("arch", ["bert-seq_cls", "llama-seq_cls", "bert-token_cls", "bert-qa", "t5-seq2seq"])
def test_cli_merge_exports_the_task_model(arch, tmp_path):
    """`peftkit merge` on a classifier / tagger / QA / seq2seq adapter writes a model with its head
    (the trained copy) that transformers' Auto class for the task loads alone, with the same outputs."""
    import transformers

    from peftkit.cli.main import main

    adapter, expected = trained_adapter(arch, tmp_path)
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    auto_cls = getattr(transformers, peftkit.auto.AUTO_CLASS_OF_TYPE[TASK[arch]])
    merged = auto_cls.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(outputs(merged, inputs(arch, targets=False)), expected, atol=1e-4, rtol=0)
