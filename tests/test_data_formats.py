"""Formats and encoding: exactly which tokens carry labels, for every format and rendering."""

from __future__ import annotations

import copy
import json
import re

import pytest

from peftkit.configuration import ConfigError, from_dict
from peftkit.data import IGNORE_INDEX, DataConfig, build_datasets
from peftkit.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "quick fox?"},
    {"role": "assistant", "content": "lazy dog"},
]


def one(rows, tokenizer, **options):
    """The single training example built from ``rows``."""
    (example,) = build_datasets(DataConfig(train=rows, **options), tokenizer).train
    return example


def labelled_runs(example, tokenizer):
    """Decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for label in example.labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    return runs


@pytest.fixture
def plain_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    return tok


def test_chat_labels_only_assistant_content_and_end_token(tiny_tokenizer):
    example = one([{"messages": CHAT}], tiny_tokenizer)
    assert tiny_tokenizer.decode(example.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\nhi there<|im_end|>\n<|im_start|>user\nquick fox?<|im_end|>\n"
        "<|im_start|>assistant\nlazy dog<|im_end|>\n"
    )
    assert labelled_runs(example, tiny_tokenizer) == ["hi there<|im_end|>", "lazy dog<|im_end|>"]
    assert tiny_tokenizer.decode(example.prompt_ids).endswith("quick fox?<|im_end|>\n<|im_start|>assistant\n")
    assert example.input_ids[: len(example.prompt_ids)] == example.prompt_ids
    assert example.answer == "lazy dog"
    assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(example.labels, example.input_ids))


def test_chat_train_on_all_labels_every_token(tiny_tokenizer):
    example = one([{"messages": CHAT}], tiny_tokenizer, train_on="all")
    assert example.labels == example.input_ids
    assert tiny_tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")


def test_sharegpt_messages_and_system_prompt(tiny_tokenizer):
    convo = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]
    example = one(
        [{"conversations": convo}], tiny_tokenizer, columns={"messages": "conversations"}, system_prompt="S"
    )
    assert tiny_tokenizer.decode(example.input_ids).startswith(
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhello"
    )
    assert labelled_runs(example, tiny_tokenizer) == ["hi<|im_end|>"]
    # A conversation with its own system message keeps it (no second one).
    own = one([{"messages": CHAT}], tiny_tokenizer, system_prompt="S")
    assert tiny_tokenizer.decode(own.input_ids).count("system") == 1


def test_chat_without_assistant_turn_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match=r"data\.train\[0\]: conversation has no assistant message"):
        one([{"messages": CHAT[:2]}], tiny_tokenizer)


def test_unknown_chat_role_names_the_line_and_the_roles(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [*CHAT, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}
    bad = {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    expected = r"chat\.jsonl:2: unknown role 'usr' in message 0 \(expected one of: system, user, assistant, tool, developer, ipython\)"
    with pytest.raises(DataError, match=expected):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer)
    data = build_datasets(DataConfig(train=str(path), skip_bad_rows=True), tiny_tokenizer)
    assert len(data.train) == 1 and data.report.skipped == 1
    sharegpt = [{"from": "humn", "value": "hi"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(DataError, match=r"unknown role 'humn' .*ShareGPT 'from': human, gpt"):
        one([{"conversations": sharegpt}], tiny_tokenizer, columns={"messages": "conversations"})


def test_template_that_is_not_prefix_consistent_is_reported(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # Renders the final message differently from the same message mid-conversation.
    tok.chat_template = (  # like reasoning templates: earlier assistant turns are abridged
        "{% for m in messages %}{{ m['role'] + ': ' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}(...){% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-consistent"):
        one([{"messages": CHAT}], tok)
    every = one([{"messages": CHAT}], tok, train_on="all")  # needs no spans, only the last prompt
    assert tok.decode(every.input_ids).startswith("system: Be brief.\nuser: hello\nassistant: (...)\n")
    # The space after "assistant:" merges into the token " lazy": the prompt stops before that
    # token, exactly as the model saw the text in training.
    assert tok.decode(every.prompt_ids).endswith("user: quick fox?\nassistant:")


def test_prompt_completion_with_chat_template(tiny_tokenizer):
    example = one([{"prompt": "2+2=", "completion": "4"}], tiny_tokenizer)
    assert tiny_tokenizer.decode(example.input_ids) == (
        "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert labelled_runs(example, tiny_tokenizer) == ["4<|im_end|>"]
    assert (
        tiny_tokenizer.decode(example.prompt_ids)
        == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.answer == "4"


@pytest.mark.parametrize("use_template", [False, True])
def test_plain_concatenation(tiny_tokenizer, plain_tokenizer, use_template):
    # Either the tokenizer has no template, or the config turns it off: same plain rendering.
    tok = tiny_tokenizer if not use_template else plain_tokenizer
    example = one(
        [{"prompt": "2+2=", "completion": "4"}], tok, use_chat_template=use_template, system_prompt="Math."
    )
    assert tok.decode(example.input_ids) == "Math.\n2+2=\n4<|im_end|>"
    assert labelled_runs(example, tok) == ["4<|im_end|>"]
    assert tok.decode(example.prompt_ids) == "Math.\n2+2=\n"
    every = one([{"prompt": "2+2=", "completion": "4"}], tok, use_chat_template=use_template, train_on="all")
    assert every.labels == every.input_ids


def test_multi_turn_chat_without_template_is_an_error(plain_tokenizer):
    with pytest.raises(DataError, match=r"needs the tokenizer's chat template, but it has none"):
        one([{"messages": CHAT}], plain_tokenizer)
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        one([{"messages": CHAT}], plain_tokenizer, format="chat")


def test_instruction_format(tiny_tokenizer):
    rows = [{"instruction": "Translate to French.", "input": "hello", "output": "bonjour"}]
    example = one(rows, tiny_tokenizer)
    assert "user\nTranslate to French.\n\nhello<|im_end|>" in tiny_tokenizer.decode(example.input_ids)
    assert labelled_runs(example, tiny_tokenizer) == ["bonjour<|im_end|>"]
    no_input = one([{"instruction": "Count.", "input": "", "output": "1 2"}], tiny_tokenizer)
    assert "user\nCount.<|im_end|>" in tiny_tokenizer.decode(no_input.input_ids)


def test_text_format_trains_on_everything(tiny_tokenizer):
    example = one([{"text": "The quick brown fox."}], tiny_tokenizer)
    assert tiny_tokenizer.decode(example.input_ids) == "The quick brown fox.<|im_end|>"
    assert example.labels == example.input_ids
    assert example.prompt_ids == [] and example.answer is None


def test_bos_added_once(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = "<|endoftext|>"
    tok.add_bos_token = True
    bos = tok.bos_token_id
    text = one([{"text": "fox"}], tok)
    assert text.input_ids[0] == bos and text.input_ids[1] != bos and text.labels[0] == IGNORE_INDEX
    tok.chat_template = "<|endoftext|>" + tiny_tokenizer.chat_template  # template brings its own BOS
    chat = one([{"prompt": "a", "completion": "b"}], tok)
    assert chat.input_ids[:2] == [bos, tok.convert_tokens_to_ids("<|im_start|>")]
    assert chat.prompt_ids[0] == bos and chat.prompt_ids.count(bos) == 1


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"instruction": "i", "output": "o"}, "instruction"),
        ({"instruction": "i", "input": "x", "output": "o", "id": 3}, "instruction"),
        ({"messages": CHAT}, "chat"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t", "source": "web"}, "text"),
    ],
)
def test_auto_detection(tiny_tokenizer, row, expected):
    data = build_datasets(DataConfig(train=[row]), tiny_tokenizer)
    assert data.report.sources["train"].startswith(f"data.train (a list of 1 rows) ({expected}")


def test_auto_detection_failures_list_expected_keys(tiny_tokenizer):
    with pytest.raises(DataError) as err:
        one([{"question": "q", "answer": "a"}], tiny_tokenizer)
    message = str(err.value)
    assert "data.train[0]: cannot detect the data format" in message and "['answer', 'question']" in message
    assert (
        "instruction: instruction, [input], output; chat: messages; prompt_completion: prompt, completion"
        in message
    )
    with pytest.raises(DataError, match=r"fits several formats \(prompt_completion, text\)"):
        one([{"prompt": "p", "completion": "c", "text": "t"}], tiny_tokenizer)


def test_columns_mapping(tiny_tokenizer):
    rows = [{"question": "2+2=", "answer": "4"}]
    example = one(rows, tiny_tokenizer, columns={"prompt": "question", "completion": "answer"})
    assert example.answer == "4" and "user\n2+2=" in tiny_tokenizer.decode(example.input_ids)
    with pytest.raises(DataError, match=r"missing field 'completion' \(column 'answer'\)"):
        one(
            [{"question": "q", "reply": "a"}],
            tiny_tokenizer,
            columns={"prompt": "question", "completion": "answer"},
        )


def test_templates(tiny_tokenizer):
    rows = [{"text": "I love it", "sentiment": "positive", "confidence": 0.9}]
    example = one(
        rows, tiny_tokenizer, prompt_template="Tweet: {text} {{json}}", completion_template="{sentiment}"
    )
    assert "user\nTweet: I love it {json}<|im_end|>" in tiny_tokenizer.decode(example.input_ids)
    assert labelled_runs(example, tiny_tokenizer) == ["positive<|im_end|>"]
    # Even with skip_bad_rows, a template naming a missing column is a config error, not skipped rows.
    with pytest.raises(DataError) as err:
        one(
            rows,
            tiny_tokenizer,
            prompt_template="{tweet}",
            completion_template="{sentiment}",
            skip_bad_rows=True,
        )
    assert "data.prompt_template names column(s) 'tweet'" in str(err.value)
    assert "available columns: confidence, sentiment, text" in str(err.value)


def test_truncation_and_dropping(tiny_tokenizer):
    # Encoded lengths (prompt, total) with the chat template: (20, 24), (29, 71), (219, 222).
    rows = [
        {"prompt": "hi", "completion": "ok"},
        {"prompt": "x" * 10, "completion": "y" * 40},
        {"prompt": "z" * 200, "completion": "w"},
    ]
    data = build_datasets(DataConfig(train=rows, max_seq_len=40), tiny_tokenizer)
    assert sorted(e.answer for e in data.train) == ["ok", "y" * 40]
    cut = next(e for e in data.train if e.answer == "y" * 40)
    assert len(cut.input_ids) == len(cut.labels) == 40 and len(cut.prompt_ids) == 29
    assert cut.num_label_tokens == 40 - 29 and cut.labels[-1] != IGNORE_INDEX
    assert data.report.truncated == 2 and data.report.dropped == 1
    assert data.report.dropped_origins == ["data.train[2]"]
    assert "dropped (no trained token left after truncation): 1" in data.summary()
    with pytest.raises(DataError, match="no train examples left: 1 rows, 1 dropped"):
        build_datasets(DataConfig(train=rows[2:], max_seq_len=40), tiny_tokenizer)


def test_config_checks_report_every_problem():
    with pytest.raises(ConfigError) as err:
        from_dict(
            DataConfig,
            {
                "trian": "x.jsonl",
                "val_size": 1.5,
                "test": "t.jsonl",
                "test_size": 10,
                "format": "chats",
                "columns": {"promt": "q"},
                "prompt_template": "{}",
                "encoding": "utf-99",
            },
            where="data",
        )
    text = str(err.value)
    for expected in (
        "unknown key 'data.trian': did you mean 'train' or 'train_on'?",
        "'data.format' must be one of",
        "'val_size' as a fraction must be in (0, 1), got 1.5",
        "set either 'test' (a separate file) or 'test_size'",
        "'columns.promt' is not a field",
        "'prompt_template' must use named placeholders",
        "'encoding' 'utf-99' is not a known text encoding",
    ):
        assert expected in text
    cfg = from_dict(DataConfig, {"train": "builtin:tweet-sentiment", "val_size": 200, "test_size": 0.1})
    assert cfg.val_size == 200 and isinstance(cfg.val_size, int) and cfg.test_size == 0.1


class _SlowTokenizer:
    """A tokenizer without offsets (like a Python 'slow' tokenizer): only the public basics."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast
        self.chat_template = fast.chat_template
        self.eos_token_id, self.bos_token_id = fast.eos_token_id, fast.bos_token_id

    def __call__(self, text, **kwargs):
        return self._fast(text, **kwargs)

    def encode(self, text, **kwargs):
        return self._fast.encode(text, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        return self._fast.apply_chat_template(messages, **kwargs)


def test_tokenizers_without_offsets_label_the_same_tokens(tiny_tokenizer):
    slow = one([{"messages": CHAT}], _SlowTokenizer(tiny_tokenizer))
    fast = one([{"messages": CHAT}], tiny_tokenizer)
    # ChatML boundaries fall on special tokens, so piecewise tokenization matches here.
    assert (slow.input_ids, slow.labels, slow.prompt_ids) == (fast.input_ids, fast.labels, fast.prompt_ids)


# -- rows with nothing to learn, and conversations in an order no template expects ----------------


def test_empty_completions_are_counted_and_refused_with_their_lines(tmp_path, tiny_tokenizer):
    path = tmp_path / "pc.jsonl"
    rows = [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "Say hi", "completion": ""},
        {"prompt": "", "completion": " "},
        {"prompt": "Sky?", "completion": "blue"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer)
    message = str(err.value)
    assert message.startswith(f"{path}:2: field 'completion' is empty: with data.train_on: completion")
    assert f"2 rows of {path} have nothing to train on ({path}:2, {path}:3)" in message
    assert "skip_bad_rows" in message
    data = build_datasets(DataConfig(train=str(path), skip_bad_rows=True), tiny_tokenizer)
    assert sorted(e.answer for e in data.train) == ["4", "blue"]
    assert "skipped malformed rows: 2 (2 with nothing to train on)" in data.summary()
    assert f"{path}:3: field 'completion' is empty and so is the prompt" in data.summary()
    # train_on: all still learns the prompt of a row without completion; an all-empty row is refused.
    kept = build_datasets(DataConfig(train=rows[:2], train_on="all"), tiny_tokenizer)
    assert len(kept.train) == 2
    with pytest.raises(DataError, match=r"data\.train\[2\]: .* and so is the prompt"):
        build_datasets(DataConfig(train=rows, train_on="all"), tiny_tokenizer)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"instruction": "Count.", "output": ""}, "field 'output' is empty"),
        ({"q": "Count.", "a": "  "}, "field 'completion' (column 'a') is empty"),
        ({"text": ""}, "field 'text' is empty: nothing to train on"),
    ],
)
def test_empty_answers_of_every_format_are_refused(tiny_tokenizer, row, fragment):
    columns = {"prompt": "q", "completion": "a"} if "q" in row else {}
    with pytest.raises(DataError, match=r"data\.train\[0\]: " + re.escape(fragment)):
        build_datasets(DataConfig(train=[row], columns=columns), tiny_tokenizer)


def test_empty_seq2seq_target_is_refused():
    from peftkit.data import read_train_samples
    from peftkit.methods.base import TaskType
    from peftkit.tasks import get_task

    rows = [{"source": "a", "target": "b"}, {"source": "c", "target": ""}]
    with pytest.raises(DataError, match=r"data\.train\[1\]: field 'target' is empty"):
        read_train_samples(DataConfig(train=rows), get_task(TaskType.SEQ_2_SEQ_LM))


def _turns(*roles, empty=None):
    return {"messages": [{"role": r, "content": "" if i == empty else f"m{i}"} for i, r in enumerate(roles)]}


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (_turns("user", "user", "assistant"), "messages 0 and 1 are both user turns"),
        (_turns("user", "assistant", "assistant"), "messages 1 and 2 are both assistant turns"),
        (_turns("user", "system", "assistant"), "message 1 (system) comes after a user message"),
        (_turns("system", "assistant", "user", "assistant"), "message 1 (assistant) comes before any user"),
        (_turns("user", "assistant", "user"), "the conversation ends with a user message"),
        (_turns("user", "tool", "assistant"), "message 1 (tool) follows user"),
        (_turns("user", "assistant", "tool", "user", "assistant"), "message 3 (user) follows a tool result"),
        (_turns("system", "user", "assistant", empty=1), "message 1 (user) has empty content"),
        (_turns("system", "user", "assistant", empty=0), "message 0 (system) has empty content"),
        (_turns("user", "assistant", empty=1), "message 1 (assistant) has empty content"),
    ],
)
def test_chat_turn_order_and_empty_content_are_row_errors(tmp_path, tiny_tokenizer, row, fragment):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {fragment}")):
        build_datasets(DataConfig(train=str(path)), tiny_tokenizer)
    data = build_datasets(DataConfig(train=str(path), skip_bad_rows=True), tiny_tokenizer)
    assert len(data.train) == 1 and data.report.skipped == 1


def test_valid_turn_orders_are_accepted(tiny_tokenizer):
    for row in (
        _turns("system", "developer", "user", "assistant"),
        _turns("user", "assistant", "tool", "tool", "assistant", "user", "assistant"),
        _turns("user", "assistant", "ipython", "assistant", empty=2),  # an empty tool result is a result
    ):
        assert one([row], tiny_tokenizer).answer.startswith("m")
