"""Values that type-check but mean nothing are refused before any model loads, naming the key;
target lists that partly miss the model warn (PEFT ignores such entries silently)."""

from __future__ import annotations

import warnings

import pytest

from _lora_helpers import lora, wrapped
from conftest import make_tiny_llama
from peftkit import LoraConfig, get_peft_model
from peftkit.configuration import ConfigError
from peftkit.errors import TargetModulesError
from peftkit.train.config import apply_overrides, build_job_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _problems(overrides: list[str]) -> str:
    raw = apply_overrides({"data": {"train": "x.jsonl"}}, overrides)
    with pytest.raises(ConfigError) as info:
        build_job_config(raw)
    return str(info.value)


# -- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "training.learning_rate=.nan",
        "training.learning_rate=inf",
        "training.weight_decay=.nan",
        "training.warmup_ratio=.nan",
        "training.max_grad_norm=.inf",
        "training.epochs=.inf",
        "training.adam_betas=[.nan, 0.999]",
        "lora.lora_alpha=nan",
        "lora.lora_alpha=.inf",
        "lora.lora_dropout=.nan",
        "lora.alpha_pattern={q_proj: .nan}",
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    message = _problems([override])
    assert f"'{key}" in message and "must be a finite number" in message


def test_a_word_for_a_number_says_number():
    assert "'lora.lora_alpha' must be a number, got 'ten'" in _problems(["lora.lora_alpha=ten"])


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_grad_norm_must_be_positive_or_null(value):
    message = _problems([f"training.max_grad_norm={value}"])
    assert "'training.max_grad_norm' must be > 0" in message and "null" in message
    job = build_job_config(apply_overrides({"data": {"train": "x.jsonl"}}, ["training.max_grad_norm=null"]))
    assert job.training.max_grad_norm is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.weight_decay=-0.1", "'training.weight_decay' must be >= 0"),
        ("training.adam_eps=-1e-8", "'training.adam_eps' must be >= 0"),
        ("training.adam_betas=[0.9, 1.0]", "'training.adam_betas' must both be in [0, 1)"),
    ],
)
def test_values_adamw_would_refuse_are_config_errors(override, fragment):
    assert fragment in _problems([override])


def test_negative_lora_alpha_is_allowed_as_in_peft():
    job = build_job_config(apply_overrides({"data": {"train": "x.jsonl"}}, ["lora.lora_alpha=-5"]))
    assert job.method_config.lora_alpha == -5


# -- run length, warm-up and seed ----------------------------------------------------------------


@pytest.mark.parametrize("epochs", ["-1", "0"])
def test_non_positive_epochs_is_refused_even_with_max_steps(epochs):
    message = _problems([f"training.epochs={epochs}", "training.max_steps=10"])
    assert f"'training.epochs' must be > 0, got {epochs}" in message


def test_warmup_longer_than_max_steps_is_an_error():
    message = _problems(["training.max_steps=10", "training.warmup_steps=100"])
    assert "'training.warmup_steps' (100) is more than 'training.max_steps' (10)" in message
    build_job_config(apply_overrides({}, ["training.max_steps=10", "training.warmup_steps=10"]))


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("1e15", "YAML reads a number in exponent form as text"),
        ("1.0e+15", "a float is not accepted"),
        ("5.0", "a float is not accepted"),
    ],
)
def test_float_for_an_integer_field_is_refused_with_the_reason(value, hint):
    message = _problems([f"training.max_steps={value}"])
    assert "'training.max_steps' must be an integer" in message and hint in message


def test_absurd_max_steps_warns():
    with pytest.warns(
        UserWarning, match=r"'training.max_steps' is 1,000,000,000,000,000, more than 10,000,000"
    ):
        build_job_config(apply_overrides({}, ["training.max_steps=1000000000000000"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_job_config(apply_overrides({}, ["training.max_steps=100000"]))


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_out_of_range_is_refused_with_the_range(seed):
    assert f"'training.seed' must be in 0 .. 2**32 - 1, got {seed}" in _problems([f"training.seed={seed}"])


def test_schedule_warns_once_the_epoch_total_is_known():
    import torch

    from peftkit.train.schedule import build_scheduler, total_optimizer_steps

    job = build_job_config(apply_overrides({}, ["training.warmup_steps=50", "training.epochs=2"]))
    total = total_optimizer_steps(job, batches_per_epoch=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.warns(UserWarning, match=r"warmup_steps \(50\) is more than the run's 20 optimizer steps"):
        build_scheduler(optimizer, job.training, total)
    huge = build_job_config(apply_overrides({}, ["training.epochs=1000000"]))
    with pytest.warns(UserWarning, match=r"make 20,000,000 optimizer steps, more than 10,000,000"):
        assert total_optimizer_steps(huge, batches_per_epoch=20) == 20_000_000


# -- evaluation: answer matching ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["evaluation.match=number", "evaluation.relative_tolerance=0.01"], ("number", 0.01, None, None)),
        (
            ["evaluation.match=regex", r"evaluation.pattern=answer is (-?\d+)"],
            ("regex", 1e-6, r"answer is (-?\d+)", None),
        ),
        (
            ["evaluation.match=choice", "evaluation.choices=['yes', 'no']"],
            ("choice", 1e-6, None, ("yes", "no")),
        ),
        (["evaluation.match=choice"], ("choice", 1e-6, None, None)),  # labels from the answers
        (["evaluation.match=contains", "evaluation.case_sensitive=true"], ("contains", 1e-6, None, None)),
    ],
)
def test_valid_answer_matching_settings(overrides, check):
    job = build_job_config(apply_overrides({"data": {"train": "x.jsonl"}}, overrides))
    options = job.evaluation.match_options()
    assert (job.evaluation.match, options.relative_tolerance, options.pattern, options.choices) == check


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["evaluation.match=regex"], "'evaluation.pattern' is required by match mode 'regex'"),
        (
            ["evaluation.match=regex", r"evaluation.pattern=answer is (\d+"],
            "'evaluation.pattern' is not a valid regular expression (missing ), unterminated subpattern",
        ),
        (["evaluation.match=choice", "evaluation.choices=[]"], "'evaluation.choices' is an empty list"),
        (
            ["evaluation.match=choice", "evaluation.choices=['Yes', 'yes']"],
            "the same label after normalisation",
        ),
        (
            ["evaluation.match=number", "evaluation.absolute_tolerance=-1"],
            "'evaluation.absolute_tolerance' must be >= 0",
        ),
        (
            ["evaluation.pattern=(\\d+)"],
            "'evaluation.pattern' is set but match mode 'first_word' ignores it (it applies to regex)",
        ),
        (
            ["evaluation.match=exact", "evaluation.choices=[a, b]"],
            "'evaluation.choices' is set but match mode 'exact' ignores it",
        ),
        (
            ["evaluation.match=choice", "evaluation.choices=[yes, no]"],
            "'evaluation.choices[0]' must be a string, got True; YAML reads unquoted yes, no",
        ),
        (["evaluation.match=fuzzy"], "'evaluation.match' must be one of 'first_word' | 'exact' | 'contains'"),
    ],
)
def test_invalid_answer_matching_settings_name_the_key(overrides, fragment):
    assert fragment in _problems(overrides)


# -- section messages name the section ------------------------------------------------------------


def test_section_problems_name_the_section():
    message = _problems(["data.validation=v.jsonl", "data.val_size=6"])
    assert "  - data: set either 'validation'" in message
    assert (
        "data: 'val_size' as a row count must be at least 1, got 0; use null for no validation split"
        in _problems(["data.val_size=0"])
    )


# -- layers_to_transform --------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [-1, [0, -1]])
def test_negative_layer_index_is_a_config_error(layers):
    with pytest.raises(ValueError, match="layers_to_transform must hold layer indices counted from 0"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=layers)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj"], None])
def test_layers_outside_the_model_give_the_range(targets):
    with pytest.raises(TargetModulesError) as err:
        get_peft_model(make_tiny_llama(), lora(target_modules=targets, layers_to_transform=[5]))
    assert "layers_to_transform [5] selects no layer: the model has layers 0-1 (under model.layers)" in str(
        err.value
    )


def test_some_layers_outside_the_model_warn():
    with pytest.warns(UserWarning, match=r"layers_to_transform: index 5 names no layer .* layers 0-1"):
        model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj"], layers_to_transform=[1, 5]))
    assert wrapped(model) == {"model.layers.1.self_attn.q_proj"}


def test_unknown_layers_pattern_names_the_lists():
    config = lora(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks")
    with pytest.raises(TargetModulesError, match=r"layers_pattern='blocks' .* lists: model\.layers"):
        get_peft_model(make_tiny_llama(), config)


# -- entries of target lists that match nothing ---------------------------------------------------


def test_misspelled_target_entry_warns_with_closest_name():
    with pytest.warns(UserWarning) as record:
        model = get_peft_model(make_tiny_llama(), lora(target_modules=["q_proj", "qproj"]))
    message = str(record[0].message)
    assert "target_modules entry 'qproj' (did you mean 'q_proj'?) matched no module" in message
    assert "q_proj, k_proj, v_proj" in message  # the names that would match
    assert wrapped(model) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


def test_misspelled_exclude_entry_warns():
    with pytest.warns(UserWarning, match=r"exclude_modules entry 'oproj' \(did you mean 'o_proj'\?\)"):
        get_peft_model(make_tiny_llama(), lora(target_modules="all-linear", exclude_modules=["oproj"]))


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=None),
        dict(target_modules="all-linear"),
        dict(target_modules="all-linear", layers_to_transform=[0]),
        dict(target_modules=["q_proj", "self_attn.v_proj"], layers_to_transform=[1]),
        dict(target_modules=["model.layers.0.mlp.up_proj"], exclude_modules=["o_proj"]),
    ],
)
def test_matching_targets_do_not_warn(config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(make_tiny_llama(), lora(**config))


def test_method_configs_built_in_python_refuse_nan_too():
    from peftkit import IA3Config, LoraConfig

    with pytest.raises(ValueError, match="lora_alpha must be a finite number, got nan"):
        LoraConfig(lora_alpha=float("nan"))
    with pytest.raises(ValueError, match="lora_dropout must be a finite number, got inf"):
        LoraConfig(lora_dropout=float("inf"))
    IA3Config()  # defaults stay valid
