"""GRPO advantages and token loss, online DPO's pair choice (peftkit.objectives.grpo_loss).

Hand-computed tables first; then TRL 1.16 as the oracle: a tiny GRPOTrainer scores a batch
whose rewards the test sets (a dataset column its reward function returns), and its
``_compute_loss`` runs on inputs the test builds, against our loss on the same model's log-probs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark, make_tiny_tokenizer, save_tiny_model_dir
from peftkit.objectives.grpo_loss import best_and_worst, group_advantages, grpo_token_loss

# its helper names TRL's checkpointing switch as the installed transformers does
LOSS_PARITY = Path(__file__).resolve().parent.parent / "benchmarks" / "loss_parity.py"

pytestmark = pytest.mark.usefixtures("single_thread")
NAN = math.nan


def _close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual).float(), torch.tensor(expected).float(), atol=atol, rtol=0
    )


# -- 1. advantages by hand ----------------------------------------------------------------------
# Groups of 4: [1, 2, 3, 4] has mean 2.5 and unbiased std sqrt(5/3) = 1.2909944; [5, 5, 5, 5] has
# std 0. The batch of all 8: mean 3.75, unbiased std sqrt(17.5 / 7) = 1.5811388.
TWO_GROUPS = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]
CENTRED = [-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "scale, divisor",
    [("group", 1.2909944 + 1e-4), ("batch", 1.5811388 + 1e-4), ("none", 1.0)],
)
def test_advantages_by_hand_for_each_scaling(scale, divisor):
    result = group_advantages(torch.tensor(TWO_GROUPS), group_size=4, scale_rewards=scale)
    _close(result.advantages, [c / divisor for c in CENTRED])
    _close(result.group_std, [1.2909944, 0.0])
    assert result.valid.all()
    assert result.zero_std_fraction == 0.5  # the all-5 group
    assert result.mean == pytest.approx(3.75) and result.std == pytest.approx(1.5811388)


def test_unscored_answers_are_left_out_and_get_zero_advantage():
    # group 0: [1, -, 3, -] mean 2, std sqrt(2); group 1: nothing scored; group 2: one score (7)
    rewards = torch.tensor([1.0, NAN, 3.0, NAN, NAN, NAN, NAN, NAN, 7.0, NAN, NAN, NAN])
    result = group_advantages(rewards, group_size=4)
    s = 2**0.5 + 1e-4
    _close(result.advantages, [-1 / s, 0, 1 / s, 0] + [0.0] * 8)
    assert result.valid.tolist() == [True, False, True, False] + [False] * 4 + [True] + [False] * 3
    _close(result.group_std, [2**0.5, 0.0, 0.0])
    assert result.zero_std_fraction == pytest.approx(2 / 3)  # groups 1 and 2 have no spread
    # over the scored 1, 3, 7: mean 11/3, unbiased std sqrt((64 + 4 + 100) / 9 / 2)
    assert result.mean == pytest.approx(11 / 3) and result.std == pytest.approx((168 / 18) ** 0.5)
    for scale in ("batch", "none"):
        advantages = group_advantages(rewards, 4, scale).advantages
        assert torch.isfinite(advantages).all() and (advantages[~result.valid] == 0).all()


def test_equal_rewards_count_as_zero_spread_despite_float_rounding():
    # float32 mean of three 0.9s is not 0.9: std 7e-8, which TRL's isclose(std, 0) (atol 1e-8)
    # would not call zero; the advantages, 6e-4 (as TRL's), are noise
    rewards = torch.tensor([0.9, 0.9, 0.9, 0.7, 0.2, 0.7])
    result = group_advantages(rewards, group_size=3)
    assert result.group_std[0] > 1e-8
    assert result.zero_std_fraction == 0.5
    _close(result.advantages[:3], [0.0, 0.0, 0.0], atol=1e-3)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), 2)


# -- 2. token loss by hand ----------------------------------------------------------------------
# eps_low 0.2, eps_high 0.28: the band is [0.8, 1.28]. (ratio, A, loss, low clipped, high clipped)
CLIP_TABLE = [
    (1.0, 2.0, -2.0, False, False),  # inside the band: -ratio * A
    (1.5, 2.0, -2.56, False, True),  # above with A > 0: capped at 1.28 * A, no gradient
    (1.5, -2.0, 3.0, False, False),  # above with A < 0: min keeps the unclipped (worse) value
    (0.5, -2.0, 1.6, True, False),  # below with A < 0: capped at 0.8 * A, no gradient
    (0.5, 2.0, -1.0, False, False),  # below with A > 0: unclipped
    (1.1, -1.0, 1.1, False, False),
    (0.7, 0.0, 0.0, False, False),  # A = 0: nothing to clip
]


def test_clipping_table():
    ratio, advantage, expected, low, high = (torch.tensor(column) for column in zip(*CLIP_TABLE))
    old = torch.linspace(-3.0, -0.5, len(CLIP_TABLE))
    logps = (old + ratio.log()).requires_grad_()
    out = grpo_token_loss(logps, old, None, advantage, epsilon_low=0.2, epsilon_high=0.28)
    _close(out.per_token.detach(), expected.tolist())
    assert out.low_clipped.tolist() == low.tolist() and out.high_clipped.tolist() == high.tolist()
    assert out.region_clipped.tolist() == (low | high).tolist() and out.kl is None
    out.per_token.sum().backward()
    # d(-ratio * A)/d logp = -ratio * A where unclipped; a capped token has no gradient
    capped = torch.tensor([False, True, False, True, False, False, False])
    _close(logps.grad, torch.where(capped, 0.0, -ratio * advantage).tolist())


def test_epsilon_high_defaults_to_epsilon_low():
    old = torch.zeros(2)
    logps = torch.tensor([1.25, 0.78]).log()
    out = grpo_token_loss(logps, old, None, torch.tensor([1.0, -1.0]), epsilon_low=0.2)
    _close(out.per_token, [-1.2, 0.8])
    assert out.high_clipped.tolist() == [True, False] and out.low_clipped.tolist() == [False, True]


def test_k3_kl_by_hand():
    logps = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])  # ref - logp = -0.5, 1, 0
    out = grpo_token_loss(logps, None, ref, torch.zeros(3), beta=0.1)
    kl = [0.6065307 + 0.5 - 1, 2.7182818 - 1 - 1, 0.0]  # exp(d) - d - 1
    _close(out.kl, kl)
    _close(out.per_token, [0.1 * k for k in kl])  # A = 0: only the KL term


@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_at_ratio_one(weighted):
    g = torch.Generator().manual_seed(0)
    logps = (-3 * torch.rand(10, generator=g)).requires_grad_()
    ref = logps.detach() + torch.randn(10, generator=g)
    advantage = torch.randn(10, generator=g)
    beta = 0.3
    out = grpo_token_loss(logps, None, ref, advantage, beta=beta, kl_ratio_weighted=weighted)
    (grad,) = torch.autograd.grad(out.per_token.sum(), logps)
    expected = -advantage + beta * (1 - torch.exp(ref - logps.detach()))
    if weighted:  # the ratio's gradient (1 at ratio 1) times the KL value
        expected = expected + beta * out.kl.detach()
    torch.testing.assert_close(grad, expected)
    assert not out.region_clipped.any()


def test_reference_log_probs_are_needed_exactly_with_beta():
    logps = torch.zeros(2)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_token_loss(logps, None, None, logps, beta=0.1)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_token_loss(logps, None, logps, logps, beta=0.0)


# -- 3. online DPO's pair -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, pair",
    [
        ([0.1, 0.9, None, 0.5], (1, 0)),
        ([1.0, 3.0, 3.0, 0.0, 0.0], (1, 3)),  # ties: the first index
        ([NAN, 1.0, 2.0], (2, 1)),  # NaN is unscored too
        ([None, 1.0], None),  # one scored answer
        ([2.0, None, 2.0], None),  # a tie teaches nothing
        ([], None),
    ],
)
def test_best_and_worst(scores, pair):
    assert best_and_worst(scores) == pair


# -- 4. TRL 1.16 as the oracle ------------------------------------------------------------------

G = 4  # answers per prompt


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model_dir = save_tiny_model_dir(tmp_path_factory.mktemp("grpo-model"))
    data = datasets.Dataset.from_dict({"prompt": ["word good is", "word bad is"] * 2, "reward": [0.0] * 4})
    return model_dir, data, tmp_path_factory.mktemp("grpo-out")


def _reward_column(completions, reward, **kwargs):
    """The reward the test put in the row's ``reward`` column (None: unscored)."""
    return list(reward)


def _trainer(trl_setup, **config):
    from trl import GRPOConfig, GRPOTrainer

    model_dir, data, out = trl_setup
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=G,
        num_generations=G,
        max_completion_length=4,
        temperature=1.0,
        report_to=[],
        use_cpu=True,
        bf16=False,
        **load_benchmark(LOSS_PARITY).no_activation_checkpointing(),
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **config,
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=_reward_column,
        args=args,
        train_dataset=data,
        processing_class=make_tiny_tokenizer(),
    )
    trainer.model.train()  # TRL reads train/eval mode from the model: train metrics and normaliser
    # set by Trainer's training loop, which these tests do not run (1 here: no accumulation)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(trl_setup, scale):
    rewards = [0.5, 2.0, -1.0, 4.0] + [3.0] * 4 + [1.0, None, 0.0, 2.5]  # spread, zero spread, unscored
    trainer = _trainer(trl_setup, scale_rewards=scale)
    rows = [
        {"prompt": ["word good is", "word bad is", "word good is"][i // G], "reward": r}
        for i, r in enumerate(rewards)
    ]
    trl_advantages = trainer._generate_and_score_completions(rows)["advantages"]

    ours = group_advantages(torch.tensor([NAN if r is None else r for r in rewards]), G, scale)
    torch.testing.assert_close(ours.advantages, trl_advantages, atol=1e-6, rtol=1e-6)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert ours.mean == pytest.approx(metrics["reward"]) and ours.std == pytest.approx(metrics["reward_std"])
    if scale != "batch":  # TRL's "batch" flag is about the batch std, not the groups
        assert ours.zero_std_fraction == pytest.approx(metrics["frac_reward_zero_std"]) == 1 / 3


def test_groups_with_fewer_than_two_scores_match_trl_but_count_as_zero_spread(trl_setup):
    rewards = [1.0, None, None, None, 2.0, 2.5, 0.0, 1.0]
    trainer = _trainer(trl_setup)
    rows = [{"prompt": "word good is", "reward": r} for r in rewards]
    trl_advantages = trainer._generate_and_score_completions(rows)["advantages"]
    ours = group_advantages(torch.tensor([NAN if r is None else r for r in rewards]), G)
    torch.testing.assert_close(ours.advantages, trl_advantages, atol=1e-6, rtol=1e-6)
    # TRL's std of a lone score is NaN, which is not "close to 0": it reports 0, we report 1/2
    assert ours.zero_std_fraction == 0.5 and trainer._metrics["train"]["frac_reward_zero_std"][-1] == 0.0


def _loss_inputs(vocab: int):
    """A micro-batch as TRL's _generate_and_score_completions hands it over: 4 rows, prompts
    left-padded, completions right-padded (lengths 5, 3, 5, 1)."""
    g = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(3, vocab, (4, 3), generator=g)
    prompt_mask = torch.ones(4, 3, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_ids = torch.randint(3, vocab, (4, 5), generator=g)
    completion_mask = (torch.arange(5) < torch.tensor([5, 3, 5, 1])[:, None]).long()
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.2, -0.7, 0.0, 2.0]),
    }


def _completion_logps(model, inputs):
    """Log-probs of the completion tokens, [rows, completion length] (temperature 1)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    length = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[
        :, -length - 1 : -1
    ]  # position t predicts t + 1
    return logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    "beta, off_policy, bias_correction",
    [(0.0, True, True), (0.5, True, False), (0.5, True, True), (0.5, False, True), (0.5, False, False)],
)
def test_loss_gradient_and_metrics_match_trl_dapo(trl_setup, beta, off_policy, bias_correction):
    trainer = _trainer(
        trl_setup,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        use_bias_correction_kl=bias_correction,
    )
    model = trainer.model
    inputs = _loss_inputs(model.config.vocab_size)
    mask = inputs["completion_mask"].bool()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        current = _completion_logps(model, inputs)
    old = current + 0.4 * torch.randn(current.shape, generator=g) if off_policy else None
    ref = current + 0.5 * torch.randn(current.shape, generator=g) if beta else None
    tokens_in_step = 3 * int(mask.sum())  # as if two more micro-batches shared the optimizer step
    trl_inputs = dict(inputs, num_items_in_batch=torch.tensor(tokens_in_step))
    if old is not None:
        trl_inputs["old_per_token_logps"] = old
    if ref is not None:
        trl_inputs["ref_per_token_logps"] = ref
    trl_loss = trainer._compute_loss(model, trl_inputs)
    trl_loss.backward()
    trl_grads = _grads(model)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # ours: flat over the completion tokens, each carrying its row's advantage
    rows = torch.arange(4)[:, None].expand_as(mask)[mask]
    out = grpo_token_loss(
        _completion_logps(model, inputs)[mask],
        None if old is None else old[mask],
        None if ref is None else ref[mask],
        inputs["advantages"][rows],
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        kl_ratio_weighted=bias_correction,
    )
    loss = out.per_token.sum() / tokens_in_step
    loss.backward()
    our_grads = _grads(model)

    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert our_grads.keys() == trl_grads.keys()
    for name in trl_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    for ours, theirs in [
        ("low_clipped", "low_mean"),
        ("high_clipped", "high_mean"),
        ("region_clipped", "region_mean"),
    ]:
        assert getattr(out, ours).float().mean().item() == pytest.approx(metrics[f"clip_ratio/{theirs}"])
    if off_policy:  # the band was crossed both ways, so the clip metrics compare something
        assert out.low_clipped.any() and out.high_clipped.any() and not out.region_clipped.all()
    if beta:
        assert out.kl.mean().item() == pytest.approx(metrics["kl"], rel=1e-5)
