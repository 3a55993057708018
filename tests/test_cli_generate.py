"""``peftkit generate`` and ``peftkit chat`` end to end on a tiny model directory."""

from __future__ import annotations

import io
import json

import pytest

import peftkit
from conftest import make_tiny_llama
from peftkit.cli import main as cli_main
from peftkit.evaluation import generate_completions
from peftkit.loading import encode_chat, encode_plain

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def peftkit_cli(monkeypatch):
    """``peftkit.cli.main.main`` with only the commands under test, so others' modules cannot break these tests."""
    monkeypatch.setattr(
        cli_main, "COMMANDS", {name: cli_main.COMMANDS[name] for name in ("generate", "chat")}
    )

    def main(argv):  # the references here are computed in fp32; auto would be bf16 on some CPUs
        return cli_main.main(argv if "--precision" in argv else [*argv, "--precision", "fp32"])

    return main


def expected_reply(tokenizer, messages_or_text, *, max_new_tokens=8, chat=True) -> str:
    model = make_tiny_llama()
    ids = encode_chat(tokenizer, messages_or_text) if chat else encode_plain(tokenizer, messages_or_text)
    return generate_completions(model, tokenizer, [ids], max_new_tokens=max_new_tokens)[0]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- generate ------------------------------------------------------------------------------


def test_generate_one_prompt_uses_the_chat_template(peftkit_cli, model_dir, tiny_tokenizer, capsys):
    rc = peftkit_cli(
        ["generate", "--base-model", str(model_dir), "--prompt", "hello world", "--max-new-tokens", "8"]
    )
    assert rc == 0
    assert capsys.readouterr().out == expected_reply(tiny_tokenizer, user("hello world")) + "\n"


def test_generate_plain_text_without_chat_template(peftkit_cli, model_dir, tiny_tokenizer, capsys):
    argv = ["generate", "--base-model", str(model_dir), "--prompt", "The quick", "--no-chat-template"]
    assert peftkit_cli([*argv, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected_reply(tiny_tokenizer, "The quick", chat=False) + "\n"


def test_generate_many_prompts_from_args_and_files(peftkit_cli, model_dir, tiny_tokenizer, tmp_path, capsys):
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("positive or negative?\n\nTranslate to French\n")
    jsonl_file = tmp_path / "prompts.jsonl"
    jsonl_file.write_text(json.dumps({"prompt": "multi\nline"}) + "\n" + json.dumps("just a string") + "\n")
    prompts = ["a", "bb", "positive or negative?", "Translate to French"]
    rc = peftkit_cli(
        ["generate", "--base-model", str(model_dir), "--prompt", "a", "bb", "--prompts-file", str(text_file)]
        + ["--max-new-tokens", "8", "--jsonl", "--batch-size", "3"]
    )
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["completion"] for r in rows] == [expected_reply(tiny_tokenizer, user(p)) for p in prompts]

    rc = peftkit_cli(["generate", "--base-model", str(model_dir), "--prompts-file", str(jsonl_file)])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> multi\nline\n") and ">>> just a string\n" in out


def test_generate_sampling_is_reproducible_with_a_seed(peftkit_cli, model_dir, capsys):
    argv = [
        "generate",
        "--base-model",
        str(model_dir),
        "--prompt",
        "hi",
        "--temperature",
        "1.5",
        "--top-p",
        "0.9",
    ]
    outputs = []
    for seed in ("1", "1", "2"):
        assert peftkit_cli([*argv, "--seed", seed, "--max-new-tokens", "16"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "x", "--base-model", "./no/such/dir"], "does not exist"),
        (["--prompt", "x"], "--base-model"),
        (["--base-model", "MODEL"], "--prompt"),
        (["--base-model", "MODEL", "--prompt", "x", "--top-p", "0", "--temperature", "-1"], "--top-p"),
        (["--prompt", "x", "--adapter", "MODEL"], "adapter_config.json"),
    ],
)
def test_generate_errors_say_what_to_change(peftkit_cli, model_dir, capsys, argv, message):
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    assert peftkit_cli(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit generate: error:") and message in err


def test_adapter_supplies_the_base_model(peftkit_cli, model_dir, tmp_path, monkeypatch, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_dir)}))
    applied = []

    class FakePeftModel:  # stands in for peftkit.PeftModel: records how it is called
        @staticmethod
        def from_pretrained(model, adapter_dir, **kwargs):
            applied.append((type(model).__name__, adapter_dir))
            return model

    monkeypatch.setattr(peftkit, "PeftModel", FakePeftModel, raising=False)
    rc = peftkit_cli(["generate", "--adapter", str(adapter), "--prompt", "hello", "--max-new-tokens", "4"])
    assert rc == 0
    assert applied == [("LlamaForCausalLM", str(adapter))]
    assert capsys.readouterr().out.strip() != ""


# --- chat ----------------------------------------------------------------------------------


def run_chat(peftkit_cli, model_dir, monkeypatch, lines: str, *extra: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return peftkit_cli(["chat", "--base-model", str(model_dir), "--max-new-tokens", "8", *extra])


def test_chat_keeps_history_and_resets(peftkit_cli, model_dir, tiny_tokenizer, monkeypatch, capsys):
    import peftkit.cli.chat as chat

    conversations = []
    original = chat.encode_chat

    def spy(tokenizer, messages):
        conversations.append([dict(m) for m in messages])
        return original(tokenizer, messages)

    monkeypatch.setattr(chat, "encode_chat", spy)
    rc = run_chat(
        peftkit_cli,
        model_dir,
        monkeypatch,
        "hello\nand then?\n/reset\n\nagain\n/rset\n//etc is a folder\n/exit\nnever read\n",
        "--no-stream",
    )
    assert rc == 0
    first = expected_reply(tiny_tokenizer, user("hello"))
    assert [len(c) for c in conversations] == [1, 3, 1, 3]
    assert conversations[1] == [*user("hello"), {"role": "assistant", "content": first}, *user("and then?")]
    assert conversations[2] == user("again"), "/reset must forget the earlier turns"
    assert conversations[3][-1] == user("/etc is a folder")[0], "a mistyped command is not sent; // escapes"
    out = capsys.readouterr()
    replies = out.out.splitlines()
    assert replies[0] == first
    assert expected_reply(tiny_tokenizer, user("again")) in replies
    assert "conversation cleared" in out.err
    assert "unknown command /rset: the commands are /reset" in out.err


def test_chat_streams_and_ends_at_end_of_input(peftkit_cli, model_dir, tiny_tokenizer, monkeypatch, capsys):
    rc = run_chat(peftkit_cli, model_dir, monkeypatch, "hello\n", "--system", "Be brief.")
    assert rc == 0
    messages = [{"role": "system", "content": "Be brief."}, *user("hello")]
    assert capsys.readouterr().out.split() == expected_reply(tiny_tokenizer, messages).split()


def test_chat_needs_a_chat_template(peftkit_cli, tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    make_tiny_llama().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert run_chat(peftkit_cli, tmp_path, monkeypatch, "hello\n") == 2
    assert "--no-chat-template" in capsys.readouterr().err


def test_version(peftkit_cli, capsys):
    import peftkit

    with pytest.raises(SystemExit) as done:
        peftkit_cli(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"peftkit {peftkit.__version__}"
