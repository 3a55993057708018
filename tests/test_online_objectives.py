"""Online objectives (grpo, online_dpo) in the one training loop, on the tiny Llama (fp32, no dropout).

accumulation   batch 4 x 1 == batch 2 x 2: the same sampled answers, losses, metrics, adapter
processes      2 DDP ranks == 1 process (forked as in tests/test_distributed.py)
resume         stop_after_step + resume == the straight run, bit for bit (timings aside)
sampling       sample_answers / SeededSampler: an answer depends on its seed only; draws follow
               the softmax after temperature, top-k and top-p (transformers' warpers)
metrics        what is logged is what the sampled answers and their rewards give
learning       a reward for the letter "e" is raised by grpo and by online_dpo
data           text and chat prompts, the row's columns at the judge, file:line errors, long
               prompts cut from the left
refusals       what cannot work is a config error (or an error at start) that says why
held-out       eval_results' rewards and KL (0 for the starting model), predictions_after.jsonl
methods        full fine-tuning, and LoRA over an 8-bit or 4-bit base (QLoRA)
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import save_tiny_model_dir
from peftkit.errors import DataError, PeftkitError
from peftkit.rlaif.config import SamplingConfig
from peftkit.rlaif.sampling import SeededSampler, sample_answers, step_seed
from peftkit.train.config import ConfigError, build_job_config
from peftkit.train.loop import run_training

pytestmark = pytest.mark.usefixtures("single_thread", "rewards")

MODULE = "peftkit_test_online_rewards"  # the reward functions below, importable during these tests
WORDS = ["good", "bad", "fox", "great", "awful", "okay", "nice", "poor"]
ROWS = [{"prompt": f"word {w} is", "target": w, "index": i} for i, w in enumerate(WORDS)]
# The metrics that may differ between equal runs: wall-clock times (time/generate_s, time/score_s ...).
TIMING = ("tokens_per_s", "step_time_s")


def timing(key: str) -> bool:
    return key in TIMING or key.startswith("time/")


REWARDS = f'''
"""Reward functions of tests/test_online_objectives.py."""

WORDS = {WORDS!r}
CALLS = []  # (prompts, completions, columns) of each call of `length` and `target_column`
STATE = {{"calls": 0}}


def _text(completion):
    return completion if isinstance(completion, str) else completion[0]["content"]


def length(prompts, completions, **columns):
    CALLS.append((list(prompts), list(completions), {{k: list(v) for k, v in columns.items()}}))
    return [len(_text(c)) / 10 for c in completions]


def constant(prompts, completions, **columns):
    return [1.0] * len(completions)


def letter_e(prompts, completions, **columns):
    return [float(_text(c).count("e")) for c in completions]


def some_none(prompts, completions, **columns):
    return [None if len(_text(c)) % 3 == 0 else len(_text(c)) / 10 for c in completions]


def never(prompts, completions, **columns):
    return [None] * len(completions)


def none_on_second_call(prompts, completions, **columns):
    STATE["calls"] += 1
    return [None if STATE["calls"] == 2 else len(_text(c)) / 10 for c in completions]


def target_column(prompts, completions, target, index, **rest):
    """Each answer arrives with its own row's columns; chat prompts as messages."""
    assert not rest, rest
    assert len(prompts) == len(completions) == len(target) == len(index)
    for prompt, completion, word, i in zip(prompts, completions, target, index):
        assert WORDS[i] == word
        if isinstance(prompt, str):
            assert prompt == f"word {{word}} is" and isinstance(completion, str), (prompt, completion)
        else:
            assert prompt[-1] == {{"role": "user", "content": f"word {{word}} is"}}, prompt
            assert isinstance(completion, list) and len(completion) == 1, completion
            assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)
    CALLS.append((list(prompts), list(completions), {{"target": list(target), "index": list(index)}}))
    return [len(_text(c)) / 10 for c in completions]
'''


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    """The reward module, importable by name (also in forked ranks: they get the parent's sys.path)."""
    root = tmp_path_factory.mktemp("rewards")
    (root / f"{MODULE}.py").write_text(REWARDS)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(MODULE, None)


@pytest.fixture
def calls(rewards):
    rewards.CALLS.clear()
    rewards.STATE["calls"] = 0
    return rewards.CALLS


@pytest.fixture
def sampled(monkeypatch):
    """Every training step's (prompt ids, sampled answers), recorded from objectives/online.py."""
    from peftkit.objectives import online

    found = []
    original = online.sample_answers

    def recording(model, tokenizer, prompts, cfg, **options):
        answers = original(model, tokenizer, prompts, cfg, **options)
        if not options.get("greedy") and options.get("num_generations") is None:  # training, not eval
            found.append(([list(p) for p in prompts], answers))
        return answers

    monkeypatch.setattr(online, "sample_answers", recording)
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prompt files: ``prompts`` (8 text rows with columns target and index), ``chat`` (the same
    as system + user messages), ``test`` (4 rows)."""
    root = tmp_path_factory.mktemp("prompts")
    chat = [
        {
            **r,
            "prompt": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": r["prompt"]},
            ],
        }
        for r in ROWS
    ]
    files = {"prompts": ROWS, "chat": chat, "test": ROWS[4:]}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: root / f"{name}.jsonl" for name in files}


@pytest.fixture(scope="module")
def ending_model_dir(tmp_path_factory):
    """The tiny Llama whose end token is likely (its output row along the hidden states' mean
    direction): answers of many lengths, some ended, some cut at max_completion_length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model_dir(tmp_path_factory.mktemp("ending-llama"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "word good is"}])
    with torch.no_grad():
        direction = model.model(torch.tensor([prompt])).last_hidden_state[0].mean(0)
        rows = model.lm_head.weight
        rows[tokenizer.eos_token_id] = 1.5 * direction / direction.norm() * rows.norm(dim=1).mean()
    model.save_pretrained(path)
    return path


def raw_job(
    model_dir, train, out, *, objective="grpo", reward="length", preference=None, sampling=None, **training
) -> dict:
    settings = {
        "max_steps": 4,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "precision": "fp32",
        "seed": 7,
        "group_by_length": False,  # batch 4 and batch 2 x 2 cut the same seeded order the same way
        "num_threads": 1,
    }
    settings.update(training)
    raw = {
        "base_model": str(model_dir),
        "objective": objective,
        "method": "lora",
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(train)},
        "reward": {"functions": [f"{MODULE}:{reward}"]},
        "sampling": {"num_generations": 4, "max_completion_length": 8, **(sampling or {})},
        "training": settings,
        "evaluation": {"accuracy_after": False},
        "output_dir": str(out),
    }
    if preference is not None:
        raw["preference"] = preference
    return raw


def train(raw: dict, **options) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Run ``raw``; its per-step metrics lines and the saved adapter's tensors."""
    run_training(build_job_config(raw), progress=False, **options)
    return steps(raw["output_dir"]), adapter(raw["output_dir"])


def lines(out) -> list[dict]:
    text = Path(out, "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def steps(out) -> list[dict]:
    """The per-step lines of metrics.jsonl (validation lines have val_*, not loss)."""
    return [record for record in lines(out) if "loss" in record]


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out, "adapter", "adapter_model.safetensors"))


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not timing(k)} for r in records]


def assert_same_steps(a: list[dict], b: list[dict], tol: float) -> None:
    """Same steps, token counts and (within ``tol``, relative above 1) every logged value."""
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["tokens_seen"] == y["tokens_seen"]
        for key in x.keys() - {"step", "epoch", "tokens_seen"}:
            if timing(key):
                continue
            assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])


def assert_close_adapters(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= atol, key


def lora_b_is_zero(weights: dict[str, torch.Tensor]) -> bool:
    found = [t for k, t in weights.items() if "lora_B" in k]
    assert found
    return all(float(t.abs().max()) == 0 for t in found)


def answer_ids(recorded) -> list:
    return [[[a.ids for a in group] for group in answers] for _, answers in recorded]


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- 1. accumulation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "objective,preference,atol",
    [
        # One lora_A entry (of 128) with a near-zero gradient ends 1.9e-5 apart (all others within
        # 3e-7): fp32 rounding of a sum that cancels (a group's advantages add up to 0), which
        # Adam's normalisation scales up; losses and gradient norms still agree to 1e-7.
        ("grpo", {"beta": 0.0}, 1e-4),
        ("grpo", {"beta": 0.05, "scale_rewards": "group"}, 1e-5),
        ("grpo", {"beta": 0.05, "scale_rewards": "batch"}, 1e-5),
        ("online_dpo", None, 1e-5),
    ],
    ids=["grpo-beta0", "grpo-group", "grpo-batch", "online_dpo"],
)
def test_accumulation_equals_one_large_batch(
    ending_model_dir, data, tmp_path, sampled, objective, preference, atol
):
    """4 prompts in one micro-batch, or in 2 of 2 (answers of many lengths: other padding): each
    answer is seeded by its prompt's place in the step, advantages are computed over the whole
    step and the loss is normalised by the step's tokens (pairs), so the answers, losses,
    metrics, gradient norms and adapters agree."""
    big, big_adapter = train(
        raw_job(
            ending_model_dir, data["prompts"], tmp_path / "big", objective=objective, preference=preference
        )
    )
    big_answers = answer_ids(sampled)
    sampled.clear()
    small_raw = raw_job(
        ending_model_dir, data["prompts"], tmp_path / "small", objective=objective, preference=preference
    )
    small_raw["training"].update(batch_size=2, gradient_accumulation_steps=2)
    small, small_adapter = train(small_raw)
    assert len(big_answers) == 4 and answer_ids(sampled) == big_answers
    assert_same_steps(big, small, tol=1e-5)
    assert "grad_norm" in big[0] and "reward" in big[0]
    assert ("kl" in big[0]) == bool(preference and preference["beta"] > 0)
    assert_close_adapters(big_adapter, small_adapter, atol=atol)
    assert not lora_b_is_zero(big_adapter)  # it trained


# -- 2. two processes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "objective,preference",
    [("grpo", {"beta": 0.05, "scale_rewards": "batch"}), ("online_dpo", None)],
    ids=["grpo", "online_dpo"],
)
def test_two_processes_equal_one(ending_model_dir, data, tmp_path, objective, preference):
    """2 DDP ranks of 2 prompts x 2 micro-batches == 1 process of 4 x 2: the same answers (seeded by
    the prompt's place in the global batch), scale_rewards batch's std over both ranks' rewards,
    losses, metrics, gradient norms and adapter (1e-5)."""
    from test_distributed import _train

    def job(out, batch_size):
        raw = raw_job(
            ending_model_dir,
            data["prompts"],
            out,
            objective=objective,
            preference=preference,
            batch_size=batch_size,
        )
        raw["training"].update(gradient_accumulation_steps=2, max_steps=3)
        raw["distributed"] = "ddp"
        return raw

    _train(job(tmp_path / "one", 4), tmp_path, 1)
    _train(job(tmp_path / "two", 2), tmp_path, 2)
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(one) == 3 and "reward" in one[0]
    assert_same_steps(one, two, tol=1e-5)
    assert_close_adapters(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=1e-5)


# -- 3. exact resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "objective,preference", [("grpo", {"beta": 0.05}), ("online_dpo", None)], ids=["grpo", "online_dpo"]
)
def test_interrupted_run_resumes_bit_identically(
    ending_model_dir, data, tmp_path, capsys, objective, preference
):
    """Interrupted after step 3 (last checkpoint at 2), resumed: the same answers are sampled again
    (seeded by step), so the adapter tensors are equal and every metrics line (validation lines
    included) but the timings is the straight run's."""

    def job(out):
        raw = raw_job(
            ending_model_dir,
            data["prompts"],
            out,
            objective=objective,
            preference=preference,
            max_steps=6,
            save_every=2,
        )
        raw["data"]["val_size"] = 2
        raw["training"]["eval_every"] = 3
        return raw

    _, straight_adapter = train(job(tmp_path / "straight"))
    interrupted = job(tmp_path / "resumed")
    assert run_training(build_job_config(interrupted), progress=False, stop_after_step=3) == {
        "interrupted_at": 3
    }
    capsys.readouterr()
    _, resumed_adapter = train(interrupted, resume=True)
    assert "Resumed from" in capsys.readouterr().err
    assert straight_adapter.keys() == resumed_adapter.keys()
    for key in straight_adapter:
        assert torch.equal(straight_adapter[key], resumed_adapter[key]), key
    straight, resumed = lines(tmp_path / "straight"), lines(tmp_path / "resumed")
    assert [r["step"] for r in straight if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in straight if "val_reward" in r][:1] == [3]  # validation after step 3
    assert untimed(resumed) == untimed(straight)


# -- 4. sampling -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peaked(tiny_model_dir):
    """The tiny Llama with its output layer x 5: a peaked next-token distribution, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_an_answer_depends_on_its_seed_only(peaked):
    """Whatever sampling.batch_size, the other prompts sampled alongside, their order, or the number
    of answers per prompt, answer g of a prompt with seed s is the same; other seeds give other
    answers, the answers of a group differ, and the caller's RNG is not touched."""
    model, tokenizer = peaked
    texts = ["word good is", "The quick brown fox jumps over the lazy dog again and again", "fox"]
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    assert len({len(p) for p in prompts}) == 3  # left padding differs with the batch

    def ids(prompts, seeds, batch_size=32, generations=3):
        cfg = SamplingConfig(num_generations=generations, max_completion_length=6, batch_size=batch_size)
        found = sample_answers(model, tokenizer, prompts, cfg, seeds=seeds)
        for group in found:
            assert len(group) == generations
            for a in group:
                assert 1 <= len(a.ids) <= 6 and a.finished == (a.ids[-1] == tokenizer.eos_token_id)
        return [[a.ids for a in group] for group in found]

    rng = torch.get_rng_state()
    first = ids(prompts, [11, 12, 13])
    assert torch.equal(torch.get_rng_state(), rng)
    for batch_size in (1, 2, 5):
        assert ids(prompts, [11, 12, 13], batch_size) == first
    assert ids(prompts[::-1], [13, 12, 11]) == first[::-1]
    assert ids(prompts[1:], [12, 13], 4) == first[1:]
    assert [group[:3] for group in ids(prompts, [11, 12, 13], 4, generations=5)] == first
    other = ids(prompts, [21, 22, 23])
    assert all(a != b for a, b in zip(other, first))
    assert all(len({tuple(a) for a in group}) > 1 for group in first)
    with pytest.raises(ValueError, match="one seed per prompt"):
        ids(prompts, [11, 12])


def test_the_first_token_follows_the_tempered_softmax(peaked):
    """3,000 answers of one token to one prompt: the frequencies of the first token are the model's
    softmax(logits / 0.7) within 0.025 (and measurably not softmax(logits))."""
    model, tokenizer = peaked
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "word good is"}])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    expected, untempered = torch.softmax(logits / 0.7, -1), torch.softmax(logits, -1)
    assert float(expected.max()) > 0.2  # peaked
    cfg = SamplingConfig(num_generations=3, max_completion_length=1, temperature=0.7, batch_size=3000)
    found = sample_answers(
        model, tokenizer, [prompt] * 1000, cfg, seeds=[step_seed(3, i) for i in range(1000)]
    )
    first = torch.tensor([a.ids[0] for group in found for a in group])
    frequency = torch.bincount(first, minlength=logits.numel()).float() / first.numel()
    assert float((frequency - expected).abs().max()) <= 0.025
    assert float((frequency - untempered).abs().max()) > 0.05


# Two rows of hand-made scores over 10 tokens, not sorted (the filters must map back to token ids).
SCORES = torch.tensor(
    [
        [0.0, 3.0, -1.0, 1.5, 2.2, -3.0, 0.6, 1.0, -0.5, -2.0],
        [1.0, -2.0, 0.5, 2.5, 0.0, 2.4, -1.0, -0.2, 1.9, 0.3],
    ]
)


def warped_probs(scores: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """transformers' sampling distribution: temperature, then top-k, then top-p, then softmax."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(cfg.temperature)]
    if cfg.top_k is not None:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    for warper in warpers:
        scores = warper(None, scores.clone())
    return torch.softmax(scores, -1)


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.8}, {"top_k": 6, "top_p": 0.7, "temperature": 1.5}],
    ids=["plain", "temperature", "top_k", "top_p", "all"],
)
def test_seeded_sampler_draws_from_transformers_distribution(options):
    """SeededSampler leaves exactly one token possible per row; over 4,000 draws the tokens drawn
    are exactly the support of transformers' warpers (top_k: the k likeliest; top_p: the smallest
    set whose mass reaches top_p) and their frequencies its probabilities within 0.03."""
    cfg = SamplingConfig(**options)
    n = 4000
    scores = SCORES.repeat(n // 2, 1)  # rows alternate between the two distributions
    out = SeededSampler([step_seed(5, i) for i in range(n)], cfg)(torch.zeros(n, 1, dtype=torch.long), scores)
    assert bool(((out == 0).sum(-1) == 1).all()) and bool((out[out != 0] == -math.inf).all())
    chosen = out.argmax(-1)
    for row in (0, 1):
        expected = warped_probs(SCORES[row : row + 1], cfg)[0]
        support = {int(t) for t in expected.nonzero()}
        logits = SCORES[row] / cfg.temperature
        if cfg.top_k is not None:  # the k likeliest
            kept = logits.topk(cfg.top_k).indices
            assert support <= set(kept.tolist())
            logits = torch.full_like(logits, -math.inf).scatter(0, kept, logits[kept])
        if cfg.top_p < 1:  # the smallest set of the likeliest tokens whose mass reaches top_p
            ordered, order = torch.softmax(logits, -1).sort(descending=True)
            size = int((ordered.cumsum(0) < cfg.top_p).sum()) + 1
            assert support == set(order[:size].tolist())
        elif cfg.top_k is not None:
            assert len(support) == cfg.top_k
        drawn = chosen[row::2]
        frequency = torch.bincount(drawn, minlength=10).float() / drawn.numel()
        assert {int(t) for t in drawn.unique()} <= support
        assert {t for t in support if expected[t] > 0.01} <= {int(t) for t in drawn.unique()}
        assert float((frequency - expected).abs().max()) <= 0.03, (row, frequency, expected)


# -- 5. metrics --------------------------------------------------------------------------------------
def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.parametrize(
    "objective,beta",
    [("grpo", 0.0), ("grpo", 0.05), ("online_dpo", 0.1)],
    ids=["grpo-beta0", "grpo", "online_dpo"],
)
def test_logged_metrics_are_those_of_the_sampled_answers(
    ending_model_dir, data, tmp_path, sampled, calls, objective, beta
):
    """Per step: reward and rewards/length/mean (the mean reward), reward_std (the mean of the
    groups' sample stds), frac_reward_zero_std, completion_length (tokens), completions/truncated,
    rewards/skipped; grpo's clip ratios (0 on-policy) and kl iff beta > 0 (0 at the first step,
    where the policy is the reference); online_dpo's pairs_fraction. The judge saw each answer's
    text and its row's columns."""
    raw = raw_job(
        ending_model_dir,
        data["prompts"],
        tmp_path / "run",
        objective=objective,
        preference={"beta": beta},
        sampling={"max_completion_length": 12},
        max_steps=3,
    )
    logged, _ = train(raw)
    assert len(logged) == len(sampled) == len(calls) == 3
    truncated = []
    for record, (_, groups), (prompts, completions, columns) in zip(logged, sampled, calls):
        answers = [a for group in groups for a in group]
        assert completions == [a.text for a in answers]
        assert prompts == [f"word {w} is" for w in columns["target"]]
        rewards = [[len(a.text) / 10 for a in group] for group in groups]
        stds = [statistics.stdev(group) for group in rewards]
        expected = {
            "reward": mean(r for group in rewards for r in group),
            "rewards/length/mean": mean(r for group in rewards for r in group),
            "reward_std": mean(stds),
            "rewards/length/std": mean(stds),  # the only judge: its groups' stds are the reward's
            "frac_reward_zero_std": mean(s == 0 for s in stds),
            "completion_length": mean(len(a.ids) for a in answers),
            "completions/truncated": mean(not a.finished for a in answers),
            "rewards/skipped": 0.0,
        }
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, abs=1e-9), key
        truncated.append(record["completions/truncated"])
        if objective == "grpo":
            for side in ("low", "high", "region"):
                assert record[f"clip_ratio/{side}_mean"] == 0.0
        else:
            pairs = [  # best and worst (the first of equals) differ in reward and in tokens
                max(scores) != min(scores)
                and group[scores.index(max(scores))].ids != group[scores.index(min(scores))].ids
                for scores, group in zip(rewards, groups)
            ]
            assert record["pairs_fraction"] == pytest.approx(mean(pairs))
            assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= record.keys()
        assert ("kl" in record) == (objective == "grpo" and beta > 0)
    assert any(0 < t < 1 for t in truncated), truncated  # some answers ended, some were cut
    if "kl" in logged[0]:
        assert logged[0]["kl"] == 0.0 and logged[-1]["kl"] > 0


@pytest.mark.parametrize("objective", ["grpo", "online_dpo"])
def test_a_reward_without_spread_teaches_nothing(tiny_model_dir, data, tmp_path, objective):
    """A constant reward: every group has zero std (frac_reward_zero_std 1); grpo's advantages are 0,
    online_dpo finds no pair (pairs_fraction 0, only a weight-0 placeholder runs): loss and
    gradient are exactly 0 and the adapter's B stays 0."""
    preference = {"beta": 0.0} if objective == "grpo" else None
    raw = raw_job(
        tiny_model_dir,
        data["prompts"],
        tmp_path / "run",
        objective=objective,
        reward="constant",
        preference=preference,
        max_steps=2,
    )
    logged, weights = train(raw)
    for record in logged:
        assert record["reward"] == 1.0 and record["reward_std"] == 0.0
        assert record["frac_reward_zero_std"] == 1.0
        assert record["loss"] == 0.0 and record["grad_norm"] == 0.0
        if objective == "online_dpo":
            assert record["pairs_fraction"] == 0.0
            assert "rewards/margins" not in record  # a placeholder's metrics are not the step's
    assert lora_b_is_zero(weights)


def test_unscored_answers_are_left_out(ending_model_dir, data, tmp_path, sampled):
    """A function that returns None for some answers: rewards/skipped is their share, the reward is
    the mean of the others, and training goes on."""
    raw = raw_job(
        ending_model_dir,
        data["prompts"],
        tmp_path / "run",
        reward="some_none",
        sampling={"max_completion_length": 12},
        max_steps=3,
    )
    logged, weights = train(raw)
    skipped = []
    for record, (_, groups) in zip(logged, sampled):
        scores = [None if len(a.text) % 3 == 0 else len(a.text) / 10 for group in groups for a in group]
        assert record["rewards/skipped"] == pytest.approx(mean(s is None for s in scores))
        assert record["reward"] == pytest.approx(mean(s for s in scores if s is not None))
        skipped.append(record["rewards/skipped"])
    assert any(0 < s < 1 for s in skipped), skipped
    assert not lora_b_is_zero(weights)


def start_adapter(model_dir, path) -> dict[str, torch.Tensor]:
    """The adapter training starts from: LoRA initialised after torch.manual_seed(training.seed)."""
    from transformers import AutoModelForCausalLM

    import peftkit

    torch.manual_seed(7)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    peftkit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(path)
    return load_file(Path(path, "adapter_model.safetensors"))


def test_a_step_without_any_score_trains_on_nothing(tiny_model_dir, data, tmp_path, calls):
    """No answer of a step scored: the step runs a weight-0 placeholder. Its loss and gradient are
    exactly 0 and it logs no reward (nor kl, clip ratios); with no step before it (AdamW without
    history, weight decay 0) it leaves the adapter exactly as it started. A later such step still moves the adapter: AdamW
    applies its momentum of the earlier steps (as any optimizer step with a zero gradient does)."""
    never = raw_job(
        tiny_model_dir,
        data["prompts"],
        tmp_path / "never",
        reward="never",
        max_steps=3,
        preference={"beta": 0.05},
    )
    logged, weights = train(never)
    for record in logged:
        assert record["rewards/skipped"] == 1.0 and record["loss"] == 0.0 and record["grad_norm"] == 0.0
        assert not {"reward", "reward_std", "kl", "clip_ratio/low_mean"} & record.keys()
    assert_close_adapters(weights, start_adapter(tiny_model_dir, tmp_path / "start"), atol=0.0)

    second = raw_job(
        tiny_model_dir,
        data["prompts"],
        tmp_path / "second",
        reward="none_on_second_call",
        max_steps=3,
        save_every=1,
        keep_checkpoints=5,
    )
    logged, _ = train(second)
    assert [r["rewards/skipped"] for r in logged] == [0.0, 1.0, 0.0]
    assert logged[1]["loss"] == 0.0 and logged[1]["grad_norm"] == 0.0 and "reward" not in logged[1]
    assert logged[0]["grad_norm"] > 0 and logged[2]["grad_norm"] > 0
    after = [adapter(tmp_path / "second" / "checkpoints" / f"step-{s:06d}") for s in (1, 2)]
    assert any(not torch.equal(after[0][k], after[1][k]) for k in after[0])  # momentum


# -- 6. learning -------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["grpo", "online_dpo"])
def test_the_policy_learns_what_the_reward_prefers(tiny_model_dir, data, tmp_path, objective):
    """A reward counting the letter e in the answer: 30 steps raise the mean sampled reward several
    fold (from under 1 e per answer)."""
    raw = raw_job(
        tiny_model_dir,
        data["prompts"],
        tmp_path / "run",
        objective=objective,
        reward="letter_e",
        sampling={"num_generations": 8},
        max_steps=30,
        learning_rate=5e-2,
        lr_scheduler="constant",
    )
    reward = [r["reward"] for r in train(raw)[0]]
    first, last = mean(reward[:5]), mean(reward[-5:])
    assert first < 1 and last > 3 * first + 1, reward


# -- 7. data -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["prompts", "chat"])
def test_prompts_and_their_columns_reach_the_judge(tiny_model_dir, data, tmp_path, sampled, calls, kind):
    """Text prompts arrive at the function as the row's text and answers as text; chat prompts as
    the row's messages and answers as one assistant message (TRL's convention). Each answer comes
    with its own row's other columns (checked inside target_column). Both are rendered with the
    tokenizer's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = raw_job(tiny_model_dir, data[kind], tmp_path / "run", reward="target_column", max_steps=2)
    train(raw)
    assert len(calls) == 2
    for (prompt_ids, _), (prompts, completions, columns) in zip(sampled, calls):
        assert len(prompts) == 16 and len(set(columns["index"])) == 4
        for i, ids in enumerate(prompt_ids):
            row = ROWS[columns["index"][4 * i]]
            messages = [{"role": "user", "content": row["prompt"]}]
            if kind == "chat":
                messages.insert(0, {"role": "system", "content": "Answer in one word."})
                assert prompts[4 * i] == messages
            else:
                assert prompts[4 * i] == row["prompt"] and isinstance(completions[0], str)
            assert ids == chat_ids(tokenizer, messages)


def test_without_a_chat_template_a_prompt_is_its_text(tiny_model_dir, data, tmp_path, sampled):
    """use_chat_template false: a text prompt is its text and the separator; a conversation cannot
    be rendered and is a file:line error."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = raw_job(tiny_model_dir, data["prompts"], tmp_path / "run", max_steps=1)
    raw["data"]["use_chat_template"] = False
    train(raw)
    texts = {tuple(tokenizer(r["prompt"] + "\n", add_special_tokens=False)["input_ids"]) for r in ROWS}
    assert {tuple(ids) for ids in sampled[0][0]} <= texts
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "word good is"},
    ]
    path = tmp_path / "conversation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROWS[0], {**ROWS[1], "prompt": conversation}]))
    raw = raw_job(tiny_model_dir, path, tmp_path / "conversation", max_steps=1)
    raw["data"]["use_chat_template"] = False
    with pytest.raises(
        DataError,
        match=r"conversation\.jsonl:2: a conversation with roles .* needs the tokenizer's chat template",
    ):
        run_training(build_job_config(raw), progress=False)


def test_a_row_without_a_prompt_is_a_file_line_error(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROWS[0], {"question": "2+2?", "target": "4"}]))
    raw = raw_job(tiny_model_dir, path, tmp_path / "run", max_steps=1)
    with pytest.raises(
        DataError, match=r"bad\.jsonl:2: missing field 'prompt'; the row has: question, target"
    ):
        run_training(build_job_config(raw), progress=False)


def test_a_long_prompt_keeps_its_last_tokens(tiny_model_dir, tmp_path, sampled):
    """data.max_seq_len 40 with answers of up to 8 tokens: a prompt keeps its last 32 tokens (the
    end of the question and the assistant header, where the answer starts); short ones are whole."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long = "The quick brown fox jumps over the lazy dog. " * 3 + "word good is"
    rows = [
        {"prompt": long, "target": "good"},
        *({"prompt": r["prompt"], "target": r["target"]} for r in ROWS[1:4]),
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = raw_job(tiny_model_dir, path, tmp_path / "run", max_steps=1)
    raw["data"]["max_seq_len"] = 40
    train(raw)
    full = {r["prompt"]: chat_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows}
    assert len(full[long]) > 32 and all(len(ids) <= 32 for p, ids in full.items() if p != long)
    expected = sorted([full[long][-32:], *(ids for p, ids in full.items() if p != long)])
    assert sorted(sampled[0][0]) == expected


# -- 8. refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"reward": None},
            r"objective grpo learns from judges of the answers it samples, but section 'reward' names none",
        ),
        ({"reward": {}}, r"section 'reward' names none: add reward.functions"),
        ({"objective": "sft"}, r"section 'reward' is given but objective sft does not sample answers"),
        (
            {"objective": "dpo", "reward": None},
            r"section 'sampling' is given but objective dpo does not sample answers",
        ),
        ({"sampling": {"num_generations": 1}}, r"'sampling.num_generations' must be >= 2 .*got 1"),
        (
            {"data": {"max_seq_len": 8}},
            r"'data.max_seq_len' \(8\) leaves no room for a prompt before an answer of up to sampling.max_completion_length \(8\)",
        ),
        (
            {"preference": {"reference": "precompute", "beta": 0.1}},
            r"'preference.reference' is precompute but objective grpo scores answers it samples",
        ),
        (
            {"objective": "online_dpo", "preference": {"reference": "precompute"}},
            r"objective online_dpo scores answers it samples during training",
        ),
        (
            {"objective": "online_dpo", "preference": {"beta": 0}},
            r"'preference.beta' is 0 but objective online_dpo needs a positive beta",
        ),
        (
            {"preference": {"loss_type": "ipo"}},
            r"'preference.loss_type' is set but objective grpo does not use it",
        ),
        (
            {"reward": {"functions": ["lengths"]}},
            r"'reward.functions\[0\]' is 'lengths': write module:function",
        ),
        ({"training": {"packing": True}}, r"'training.packing' is true but objective grpo needs"),
    ],
    ids=[
        "no-reward",
        "empty-reward",
        "sft-reward",
        "dpo-sampling",
        "one-generation",
        "no-room",
        "grpo-precompute",
        "online_dpo-precompute",
        "online_dpo-beta0",
        "dpo-option",
        "function-spec",
        "packing",
    ],
)
def test_what_cannot_work_is_refused_at_config_time(tiny_model_dir, data, tmp_path, change, message):
    raw = raw_job(tiny_model_dir, data["prompts"], tmp_path / "out")
    for key, value in change.items():
        if value is None:
            raw.pop(key)
        elif isinstance(raw.get(key), dict) and value:
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ConfigError, match=message):
        build_job_config(raw)
    assert build_job_config(raw_job(tiny_model_dir, data["prompts"], tmp_path / "out")).objective == "grpo"


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "no_such_reward_module:score",
            r"cannot find module 'no_such_reward_module'.*Put no_such_reward_module\.py next to the config",
        ),
        (f"{MODULE}:lenght", rf"{MODULE}.* has no 'lenght'; did you mean length\?"),
    ],
    ids=["module", "function"],
)
def test_a_reward_function_that_cannot_be_loaded_stops_the_run_at_start(
    tiny_model_dir, data, tmp_path, spec, message
):
    """Named in the error before any step: which module or function is missing, and what to do."""
    raw = raw_job(tiny_model_dir, data["prompts"], tmp_path / "out")
    raw["reward"]["functions"] = [spec]
    with pytest.raises(PeftkitError, match=message):
        run_training(build_job_config(raw), progress=False)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# -- 9. held-out evaluation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "objective,beta",
    [("grpo", 0.0), ("grpo", 0.05), ("online_dpo", 0.1)],
    ids=["grpo-beta0", "grpo", "online_dpo"],
)
def test_held_out_results_and_predictions(ending_model_dir, data, tmp_path, objective, beta):
    """With a test split: before and after have the greedy answers' reward and the sampled ones';
    after has the KL to the reference (grpo with beta 0: to the base, as `peftkit eval` reports
    it), > 0 once trained; the starting model has no KL to report or 0; predictions_after.jsonl
    has one line per prompt with its origin, prompt, answer and that answer's reward."""
    raw = raw_job(
        ending_model_dir,
        data["prompts"],
        tmp_path / "run",
        objective=objective,
        preference={"beta": beta},
        learning_rate=3e-2,
    )
    raw["data"]["test"] = str(data["test"])
    raw["evaluation"] = {"accuracy_before": True, "accuracy_after": True}
    train(raw)
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    before, after = results["before"], results["after"]
    for found in (before, after):
        assert found["n"] == 4
        assert {"reward", "sampled_reward", "rewards/length/mean", "completion_length"} <= found.keys()
    assert after["kl"] > 0 and before.get("kl", 0.0) == 0.0
    predictions = [
        json.loads(line) for line in (tmp_path / "run" / "predictions_after.jsonl").read_text().splitlines()
    ]
    assert [p["origin"] for p in predictions] == [f"{data['test']}:{i}" for i in range(1, 5)]
    assert [p["prompt"] for p in predictions] == [r["prompt"] for r in ROWS[4:]]
    for p in predictions:
        assert isinstance(p["predicted"], str) and p["reward"] == pytest.approx(len(p["predicted"]) / 10)
        assert p["scores"] == {"length": p["reward"]}
    assert mean(p["reward"] for p in predictions) == pytest.approx(after["reward"])


def test_held_out_kl_is_zero_for_the_starting_model_and_the_k3_estimate(tiny_model_dir):
    """The task's evaluate on a new LoRA adapter (a no-op): KL 0 exactly. With a changed adapter: the
    mean over sampled answers of the summed per-token k3 estimator exp(r) - r - 1 (r = ref - policy
    log-prob), recomputed here from full logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftkit
    from peftkit.objectives.config import PreferenceConfig
    from peftkit.objectives.grpo import GRPOTask
    from peftkit.objectives.online import EVAL_SEED, PromptExample
    from peftkit.rlaif.config import RewardConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    ).eval()
    sampling = SamplingConfig(num_generations=2, max_completion_length=8)
    task = GRPOTask(PreferenceConfig(beta=0.05), RewardConfig(functions=[f"{MODULE}:length"]), sampling)
    examples = [
        PromptExample(
            chat_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]),
            [{"role": "user", "content": r["prompt"]}],
            True,
            {},
            f"row {i}",
        )
        for i, r in enumerate(ROWS[:4])
    ]
    task.start_evaluation(model, None)

    def evaluate():
        return task.evaluate(model, tokenizer, examples, eval_cfg=None, autocast_dtype=None)

    start = evaluate()
    assert start["kl"] == 0.0 and start["n"] == 4
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    changed = evaluate()
    answers = sample_answers(
        model,
        tokenizer,
        [e.prompt_ids for e in examples],
        sampling,
        seeds=[step_seed(EVAL_SEED, i) for i in range(4)],
        num_generations=1,
    )
    assert changed["sampled_reward"] == pytest.approx(mean(len(g[0].text) / 10 for g in answers))
    total = 0.0
    for example, (answer,) in zip(examples, answers):
        ids = torch.tensor([example.prompt_ids + answer.ids])
        with torch.no_grad():
            policy = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            with model.disable_adapter():
                reference = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:, None]
        at = slice(len(example.prompt_ids) - 1, None)
        log_ratio = (reference.gather(-1, targets) - policy.gather(-1, targets))[at]
        total += float((log_ratio.exp() - log_ratio - 1).sum())
    assert changed["kl"] > 0.01
    assert changed["kl"] == pytest.approx(total / 4, rel=1e-4)


# -- 10. methods -------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_full_fine_tuning(tiny_model_dir, data, tmp_path, beta):
    """method full: the reference for beta > 0 is the starting weights (the originals swapped in),
    so the first step's KL is exactly 0, and it grows as the weights train."""
    raw = raw_job(
        tiny_model_dir,
        data["prompts"],
        tmp_path / "run",
        preference={"beta": beta},
        learning_rate=1e-3,
        max_steps=3,
    )
    raw.pop("lora")
    raw.update(method="full", full={})
    run_training(build_job_config(raw), progress=False)
    logged = steps(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in logged)
    if beta:
        assert logged[0]["kl"] == 0.0 and logged[-1]["kl"] > 0
    else:
        assert "kl" not in logged[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_grpo_over_a_quantized_base(tiny_model_dir, data, tmp_path, bits):
    """QLoRA: LoRA over a bitsandbytes 8-bit (or NF4) base samples, judges and trains; the reference
    (the base, adapter off) is computed as the policy is, so the first step's KL is exactly 0."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    if bits == 4:  # NF4 blocks of 64 need layers at least 64 wide
        tiny_model_dir = save_tiny_model_dir(tmp_path / "wide-model", hidden_size=64, intermediate_size=128)
    raw = raw_job(tiny_model_dir, data["prompts"], tmp_path / "run", preference={"beta": 0.05}, max_steps=2)
    raw["quantization"] = {"bits": bits}
    logged, weights = train(raw)
    assert logged[0]["kl"] == 0.0 and all(math.isfinite(r["loss"]) for r in logged)
    assert "reward" in logged[0] and not lora_b_is_zero(weights)


def test_eval_with_an_online_config_measures_an_offline_dpo_adapter(
    tiny_model_dir, data, rewards, tmp_path, capsys
):
    """`peftkit eval ONLINE.yaml --adapter DPO_ADAPTER`: the offline route (pairs + dpo) measured as
    the online job measures its own adapter: the config's held-out prompts answered and scored by
    its judges, KL to the base; the same numbers as the online task's evaluate on that adapter."""
    from peftkit.cli.main import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "chosen": "yes", "rejected": "no"}) + "\n" for r in ROWS)
    )
    dpo = raw_job(tiny_model_dir, pairs, tmp_path / "dpo", objective="dpo", max_steps=2)
    for key in ("reward", "sampling"):
        dpo.pop(key)
    run_training(build_job_config(dpo), progress=False)
    online = raw_job(tiny_model_dir, data["prompts"], tmp_path / "online")
    online["data"]["test"] = str(data["test"])
    config = tmp_path / "online.yaml"
    config.write_text(yaml.safe_dump(online))
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert (
        main(["eval", str(config), "--adapter", str(tmp_path / "dpo" / "adapter"), "--json", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "scored by its judges" in printed
    result = json.loads(out.read_text())
    assert result["objective"] == "dpo" and result["n"] == 4
    assert result["reward"] > 0 and result["kl"] > 0  # the DPO adapter moved away from the base
    lines = [
        json.loads(line)
        for line in Path(str(out).removesuffix(".json") + ".predictions.jsonl").read_text().splitlines()
    ]
    assert abs(sum(line["reward"] for line in lines) / len(lines) - result["reward"]) < 1e-9


def test_each_prompt_runs_once_per_group_and_the_answers_do_not_change(tiny_model_dir, monkeypatch):
    """sample_answers computes a prompt's KV cache once and repeats it for its answers
    (shared_prompt_cache): the same answers as one prompt pass per answer, with a LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import LoraConfig, get_peft_model
    from peftkit.rlaif import sampling
    from peftkit.rlaif.config import SamplingConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in ROWS[:3]]
    prompts[1] = prompts[1][:-2]  # rows of different lengths: left padding in the shared pass
    cfg = SamplingConfig(num_generations=3, max_completion_length=6, batch_size=6)
    passes = []
    original = sampling.shared_prompt_cache
    monkeypatch.setattr(
        sampling, "shared_prompt_cache", lambda *a, **k: passes.append(len(a[2])) or original(*a, **k)
    )
    shared = sampling.sample_answers(model, tokenizer, prompts, cfg, seeds=[1, 2, 3])
    assert passes == [2, 1]  # batches of whole groups: 2 prompts x 3 answers, then 1 x 3
    monkeypatch.setattr(sampling, "_acts_per_position", lambda _model: False)
    plain = sampling.sample_answers(model, tokenizer, prompts, cfg, seeds=[1, 2, 3])
    assert [[a.ids for a in g] for g in shared] == [[a.ids for a in g] for g in plain]


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_with_the_shared_prefix_equals_without(
    tiny_model_dir, data, rewards, tmp_path, monkeypatch, beta
):
    """training.shared_prefix: the chat template's tokens that every answer row of a micro-batch
    starts with run once (train/shared_prefix.py), in the policy's pass; the same losses, metrics
    and adapter as running every row whole (fp32, 1e-5), and the one-row path was really taken."""
    from peftkit.train.shared_prefix import SharedPrefix

    taken = []
    original = SharedPrefix.hidden_and_targets

    def counting(self, body, batch):
        found = original(self, body, batch)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(SharedPrefix, "hidden_and_targets", counting)
    runs = {}
    for shared in (True, False):
        raw = raw_job(tiny_model_dir, data["prompts"], tmp_path / str(shared), preference={"beta": beta})
        raw["training"]["shared_prefix"] = shared
        runs[shared] = train(raw)
    assert taken and all(taken)  # only the shared run asks, and every step used it
    assert_same_steps(runs[True][0], runs[False][0], tol=1e-5)
    assert_close_adapters(runs[True][1], runs[False][1], atol=1e-5)
