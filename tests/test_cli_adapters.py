"""``peftkit generate`` / ``chat`` with several adapters: one per prompt, mixed batches, switching.

Reference outputs come from the same CLI run with one ``--adapter`` (or none) per prompt, so a
mixed run must reproduce what each adapter gives alone (greedy decoding, fp32).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
import peftkit.auto
from _serve_helpers import save_random_adapter
from peftkit.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [  # equal lengths with different adapters, so batch order matters
    ("word good is", "lora_a"),
    ("word bad is", "lora_b"),
    ("The quick brown fox jumps over the lazy dog.", "__base__"),
    ("word bad is", "lora_a"),
    ("hello world", None),
    ("Translate to French", "lora_b"),
    ("positive or negative?", "lora_a"),
]


_save_adapter = save_random_adapter  # the same random-weights adapter the server tests use


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    lora = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ia3 = dict(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    return {
        "lora_a": _save_adapter(tiny_model_dir, root / "lora_a", peftkit.LoraConfig(**lora), 1),
        "lora_b": _save_adapter(tiny_model_dir, root / "lora_b", peftkit.LoraConfig(**lora), 2),
        "ia3_a": _save_adapter(tiny_model_dir, root / "ia3_a", peftkit.IA3Config(**ia3), 3),
        "ia3_b": _save_adapter(tiny_model_dir, root / "ia3_b" / "adapter", peftkit.IA3Config(**ia3), 4),
        "dora_a": _save_adapter(
            tiny_model_dir, root / "dora_a", peftkit.LoraConfig(**lora, use_dora=True), 5
        ),
        "dora_b": _save_adapter(
            tiny_model_dir, root / "dora_b", peftkit.LoraConfig(**lora, use_dora=True), 6
        ),
    }


@pytest.fixture
def peftkit_cli(monkeypatch):
    """``peftkit.cli.main.main`` with only the commands under test, so others' modules cannot break these tests."""
    monkeypatch.setattr(
        cli_main, "COMMANDS", {name: cli_main.COMMANDS[name] for name in ("generate", "chat")}
    )

    def main(argv):  # the references here are computed in fp32; auto would be bf16 on some CPUs
        return cli_main.main(argv if "--precision" in argv else [*argv, "--precision", "fp32"])

    return main


def _generate(peftkit_cli, capsys, *argv: str) -> list[dict]:
    rc = peftkit_cli(["generate", "--max-new-tokens", "6", "--jsonl", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return [json.loads(line) for line in out.out.splitlines()]


def _alone(peftkit_cli, capsys, model_dir, adapters, prompt: str, adapter: str) -> str:
    """The completion of ``prompt`` with only ``adapter`` loaded (``__base__``: no adapter at all)."""
    argv = ["--base-model", str(model_dir)] if adapter == "__base__" else ["--adapter", adapters[adapter]]
    [row] = _generate(peftkit_cli, capsys, *argv, "--prompt", prompt)
    return row["completion"]


def _write_prompts(path, rows) -> str:
    lines = []
    for prompt, adapter in rows:
        row = {"prompt": prompt} if adapter is None else {"prompt": prompt, "adapter": adapter}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --- generate ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", ["3", "8"])
def test_lora_mixed_batches_match_each_adapter_alone(
    peftkit_cli, capsys, tiny_model_dir, adapters, tmp_path, batch_size
):
    file = _write_prompts(tmp_path / "p.jsonl", PROMPTS)
    argv = ["--adapter", f"lora_a={adapters['lora_a']}", "--adapter", adapters["lora_b"]]
    calls = []
    original = peftkit.PeftModelForCausalLM.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("adapter_names"))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peftkit.PeftModelForCausalLM, "generate", spy)
        rows = _generate(peftkit_cli, capsys, *argv, "--prompts-file", file, "--batch-size", batch_size)
    # one generate call per batch, each mixing adapters row by row
    assert len(calls) == -(-len(PROMPTS) // int(batch_size))
    assert all(names is not None for names in calls) and any(len(set(names)) > 1 for names in calls)
    used = [adapter or "lora_a" for _, adapter in PROMPTS]  # no "adapter" key: the first adapter
    assert [(r["prompt"], r["adapter"]) for r in rows] == [(p, a) for (p, _), a in zip(PROMPTS, used)]
    expected = [
        _alone(peftkit_cli, capsys, tiny_model_dir, adapters, p, a) for (p, _), a in zip(PROMPTS, used)
    ]
    assert [r["completion"] for r in rows] == expected
    # the adapters do change the output, so the comparison above can fail
    base = [_alone(peftkit_cli, capsys, tiny_model_dir, adapters, p, "__base__") for p, _ in PROMPTS]
    assert len({tuple(expected), tuple(base)}) == 2
    assert (
        len(
            {
                expected[0],
                base[0],
                _alone(peftkit_cli, capsys, tiny_model_dir, adapters, PROMPTS[0][0], "lora_b"),
            }
        )
        == 3
    )


def test_use_adapter_sets_the_default_and_null_means_base(
    peftkit_cli, capsys, tiny_model_dir, adapters, tmp_path
):
    file = tmp_path / "p.jsonl"
    file.write_text(
        json.dumps({"prompt": "word good is", "adapter": None}) + "\n" + json.dumps("word bad is") + "\n"
    )
    argv = ["--adapter", f"lora_a={adapters['lora_a']}", "--adapter", f"lora_b={adapters['lora_b']}"]
    rows = _generate(
        peftkit_cli,
        capsys,
        *argv,
        "--use-adapter",
        "lora_b",
        "--prompts-file",
        str(file),
        "--prompt",
        "hello world",
    )
    assert [(r["prompt"], r["adapter"]) for r in rows] == [
        ("hello world", "lora_b"),
        ("word good is", "__base__"),
        ("word bad is", "lora_b"),
    ]
    assert [r["completion"] for r in rows] == [
        _alone(peftkit_cli, capsys, tiny_model_dir, adapters, r["prompt"], r["adapter"]) for r in rows
    ]


# IA3 has no mixed batches at all; LoRA has them, but not for DoRA adapters (as in PEFT).
@pytest.mark.parametrize("first, second", [("ia3_a", "ia3_b"), ("dora_a", "dora_b")])
def test_adapters_that_cannot_share_a_batch_run_as_groups_in_input_order(
    peftkit_cli, capsys, tiny_model_dir, adapters, tmp_path, first, second
):
    rows_in = [(p, {"lora_a": first, "lora_b": second}.get(a, a)) for p, a in PROMPTS]
    file = _write_prompts(tmp_path / "p.jsonl", rows_in)
    calls = []
    original = peftkit.PeftModelForCausalLM.generate

    def spy(self, *args, **kwargs):
        assert "adapter_names" not in kwargs
        calls.append((self.active_adapter, kwargs["input_ids"].shape[0]))
        return original(self, *args, **kwargs)

    argv = ["--adapter", adapters[first], "--adapter", adapters[second]]  # ia3_b/adapter is named ia3_b
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(peftkit.PeftModelForCausalLM, "generate", spy)
        rows = _generate(peftkit_cli, capsys, *argv, "--prompts-file", file, "--batch-size", "8")
    # one call per adapter, in first-appearance order; __base__ runs with the adapters disabled
    assert calls == [(first, 4), (second, 2), (None, 1)]
    used = [a or first for _, a in rows_in]
    assert [(r["prompt"], r["adapter"]) for r in rows] == [(p, a) for (p, _), a in zip(rows_in, used)]
    assert [r["completion"] for r in rows] == [
        _alone(peftkit_cli, capsys, tiny_model_dir, adapters, p, a) for (p, _), a in zip(rows_in, used)
    ]
    base = _alone(peftkit_cli, capsys, tiny_model_dir, adapters, rows_in[0][0], "__base__")
    assert rows[0]["completion"] != base


def test_plain_output_tags_prompts_with_their_adapter(peftkit_cli, capsys, adapters, tmp_path):
    file = _write_prompts(tmp_path / "p.jsonl", [("hi", "lora_b"), ("yo", "__base__")])
    argv = ["--adapter", f"lora_a={adapters['lora_a']}", "--adapter", f"lora_b={adapters['lora_b']}"]
    assert peftkit_cli(["generate", *argv, "--prompts-file", file, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> [lora_b] hi\n") and "\n>>> [__base__] yo\n" in out


def _error(peftkit_cli, capsys, argv) -> str:
    assert peftkit_cli(["generate", "--max-new-tokens", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert "peftkit generate: error:" in err
    return err


def test_unknown_adapter_names_are_listed_with_file_and_line(peftkit_cli, capsys, adapters, tmp_path):
    file = _write_prompts(tmp_path / "p.jsonl", [("a", "lora_a"), ("b", "lora_c"), ("c", None), ("d", "x")])
    argv = ["--adapter", f"lora_a={adapters['lora_a']}", "--adapter", f"lora_b={adapters['lora_b']}"]
    err = _error(peftkit_cli, capsys, [*argv, "--prompts-file", file])
    assert f"{file}:2: unknown adapter 'lora_c'" in err and "(did you mean 'lora_b' or 'lora_a'?)" in err
    assert f"{file}:4: unknown adapter 'x'" in err and "loaded adapters: lora_a, lora_b, __base__" in err
    err = _error(peftkit_cli, capsys, [*argv, "--prompt", "a", "--use-adapter", "nope"])
    assert "--use-adapter: unknown adapter 'nope'" in err


def test_a_run_directory_or_a_truncated_adapter_is_a_clean_error(peftkit_cli, capsys, adapters, tmp_path):
    run_dir = str(Path(adapters["ia3_b"]).parent)  # OUTPUT_DIR of OUTPUT_DIR/adapter
    err = _error(peftkit_cli, capsys, ["--adapter", run_dir, "--prompt", "a"])
    assert f"did you mean {adapters['ia3_b']}?" in err
    broken = tmp_path / "broken"
    shutil.copytree(adapters["lora_a"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    err = _error(peftkit_cli, capsys, ["--adapter", str(broken), "--prompt", "a"])
    assert f"{weights} is not a readable safetensors file (incomplete metadata" in err
    assert "truncated or still being copied" in err


def test_adapters_must_share_base_method_and_unique_names(
    peftkit_cli, capsys, tiny_model_dir, adapters, tmp_path
):
    err = _error(
        peftkit_cli,
        capsys,
        ["--adapter", adapters["lora_a"], "--adapter", adapters["ia3_a"], "--prompt", "x"],
    )
    assert "different methods (LORA: lora_a; IA3: ia3_a)" in err

    other = tmp_path / "other"
    shutil.copytree(adapters["lora_b"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/another-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    err = _error(
        peftkit_cli, capsys, ["--adapter", adapters["lora_a"], "--adapter", str(other), "--prompt", "x"]
    )
    assert f"different base models: {tiny_model_dir} and org/another-model" in err and "--base-model" in err
    # an explicit --base-model loads both onto it (a warning, not an error)
    rc = peftkit_cli(
        [
            "generate",
            "--base-model",
            str(tiny_model_dir),
            "--adapter",
            adapters["lora_a"],
            "--adapter",
            str(other),
        ]
        + ["--prompt", "x", "--max-new-tokens", "2"]
    )
    assert rc == 0 and "warning:" in capsys.readouterr().err

    err = _error(
        peftkit_cli,
        capsys,
        ["--adapter", f"x={adapters['lora_a']}", "--adapter", f"x={adapters['lora_b']}", "--prompt", "x"],
    )
    assert "two adapters are named 'x'" in err
    err = _error(peftkit_cli, capsys, ["--adapter", f"__base__={adapters['lora_a']}", "--prompt", "x"])
    assert "adapter name '__base__'" in err


def test_adapters_with_different_added_tokens_are_refused(
    peftkit_cli, capsys, tiny_model_dir, adapters, tmp_path
):
    from transformers import AutoTokenizer

    grown = tmp_path / "grown"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<new_tok>"])
    model.resize_token_embeddings(len(tokenizer))
    peft_model = peftkit.get_peft_model(
        model, peftkit.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    peft_model.save_pretrained(grown)
    tokenizer.save_pretrained(grown)
    capsys.readouterr()  # forget the loading messages above
    err = _error(
        peftkit_cli, capsys, ["--adapter", adapters["lora_a"], "--adapter", str(grown), "--prompt", "x"]
    )
    assert "different vocabularies" in err and "'<new_tok>'" in err
    assert err.startswith("peftkit generate: error:"), "checked before the base model's weights load"


# --- chat ----------------------------------------------------------------------------------


def test_chat_switches_adapters_and_keeps_history(peftkit_cli, capsys, tiny_model_dir, adapters, monkeypatch):
    import peftkit.cli.chat as chat
    from peftkit.loading import encode_chat

    conversations = []

    def spy(tokenizer, messages):
        conversations.append([dict(m) for m in messages])
        return encode_chat(tokenizer, messages)

    monkeypatch.setattr(chat, "encode_chat", spy)
    script = "hello\n/adapter\n/adapter lora_a\nand then?\n/adapter nope\n/base\nagain\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    argv = ["chat", "--adapter", f"lora_a={adapters['lora_a']}", "--adapter", f"lora_b={adapters['lora_b']}"]
    assert (
        peftkit_cli(
            [*argv, "--use-adapter", "lora_b", "--max-new-tokens", "6", "--no-stream", "--precision", "fp32"]
        )
        == 0
    )
    out = capsys.readouterr()
    replies = out.out.splitlines()
    assert len(replies) == 3 and [len(c) for c in conversations] == [1, 3, 5]
    assert conversations[2][:4] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": replies[1]},
    ], "the history must survive adapter switches"
    assert "* lora_b" in out.err and "  lora_a" in out.err and "  __base__" in out.err
    assert "unknown adapter 'nope'" in out.err

    # each reply equals a generate run of that conversation with only that adapter
    def reference(messages, adapter):  # a fresh model with only that adapter (any one for __base__)
        from peftkit.adapter_sets import using_adapter
        from peftkit.evaluation import generate_completions

        name = "lora_a" if adapter == "__base__" else adapter
        model, tokenizer = peftkit.auto.load_adapter_with_base(adapters[name], adapter_name=name)
        with using_adapter(model, adapter):
            return generate_completions(
                model, tokenizer, [encode_chat(tokenizer, messages)], max_new_tokens=6
            )[0]

    assert replies[0] == reference(conversations[0], "lora_b")
    assert replies[1] == reference(conversations[1], "lora_a")
    assert replies[2] == reference(conversations[2], "__base__")
    assert len(set(replies[:2])) == 2 or replies[0] != reference(conversations[0], "lora_a")


def test_adapters_carrying_different_embeddings_are_refused(
    peftkit_cli, capsys, tiny_model_dir, adapters, tmp_path
):
    """Both added the same token (vocabularies agree), so both files carry full embedding matrices:
    equal ones can share the base, different ones (new rows trained apart) cannot."""
    from transformers import AutoTokenizer

    def grown_adapter(out, seed):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        tokenizer.add_tokens(["<new_tok>"])
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.get_input_embeddings().weight[-1].normal_()
            model.get_output_embeddings().weight[-1].normal_()
        config = peftkit.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
        peftkit.get_peft_model(model, config).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return str(out)

    one, same, other = (grown_adapter(tmp_path / n, s) for n, s in [("one", 0), ("same", 0), ("other", 1)])
    capsys.readouterr()
    rows = _generate(peftkit_cli, capsys, "--adapter", one, "--adapter", same, "--prompt", "x <new_tok>")
    assert [r["adapter"] for r in rows] == ["one"]
    err = _error(peftkit_cli, capsys, ["--adapter", one, "--adapter", other, "--prompt", "x"])
    assert "adapter 'other'" in err and "carries its own embedding matrices" in err


def test_plain_prompts_from_stdin_use_the_default_adapter(peftkit_cli, capsys, adapters, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a\n\nb\n"))
    argv = ["--adapter", adapters["lora_a"], "--adapter", adapters["lora_b"], "--use-adapter", "lora_b"]
    rows = _generate(peftkit_cli, capsys, *argv, "--prompts-file", "-", "--max-new-tokens", "2")
    assert [(r["prompt"], r["adapter"]) for r in rows] == [("a", "lora_b"), ("b", "lora_b")]
