"""peftkit.objectives.losses against each paper's formula (written out here with ``math``) and
against TRL 1.16's own loss code on the same inputs.

TRL is only an oracle: its trainers are built for real (tiny model, tiny dataset; a few ms each)
so every attribute the loss code reads comes from TRL's config handling, then the loss methods are
called with a stand-in model whose per-token log-probs we choose. DPO and KTO read the reference
log-probs from the batch (``precompute_ref_logps``), so the stand-in only plays the policy.
"""

from __future__ import annotations

import ast
import copy
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

import peftkit.objectives as objectives
from conftest import make_tiny_llama
from peftkit.objectives import (
    DPO_LOSS_TYPES,
    dpo_loss,
    kl_estimate,
    kto_loss,
    kto_metrics,
    orpo_loss,
    pairwise_accuracy,
    preference_metrics,
    reward_loss,
    reward_metrics,
    sequence_logps,
    sequence_logps_from_logits,
    simpo_loss,
    token_logps_from_logits,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
TOL64 = dict(rtol=0, atol=1e-9)  # float64 on both sides: only summation order differs
TOL32 = dict(rtol=0, atol=1e-6)  # TRL's ORPO computes in float32 whatever it is given


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Three pairs of summed completion log-probs (policy and reference) and completion lengths.
PC, PR = [-10.0, -12.0, -7.5], [-11.0, -9.0, -8.0]
RC, RR = [-10.5, -11.0, -8.0], [-10.0, -10.0, -7.0]
LC, LR = [4, 5, 2], [3, 6, 2]
BETAS = [0.1, 0.5]


# -- each loss equals its paper's formula ------------------------------------------------------


def paper_dpo(kind: str, beta: float, eps: float) -> list[float]:
    out = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        d = (pc - rc) - (pr - rr)
        if kind == "sigmoid":  # DPO Eq. 7; conservative DPO (Mitchell 2023) for eps > 0
            out.append(-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d))
        elif kind == "ipo":  # IPO Eq. 17, log-ratios per completion token
            out.append(((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2)
        elif kind == "hinge":  # SLiC-HF calibration loss with delta = 1/beta
            out.append(max(0.0, 1 - beta * d))
        else:  # robust DPO: [(1-eps) L(yw, yl) - eps L(yl, yw)] / (1 - 2 eps), L = -log sigma
            out.append(((1 - eps) * -logsig(beta * d) - eps * -logsig(-beta * d)) / (1 - 2 * eps))
    return out


def call_dpo(kind: str, beta: float, eps: float = 0.0, *, pc=PC, pr=PR, rc=RC, rr=RR):
    return dpo_loss(
        *map(t64, (pc, pr, rc, rr)),
        beta=beta,
        loss_type=kind,
        label_smoothing=eps,
        chosen_lengths=torch.tensor(LC),
        rejected_lengths=torch.tensor(LR),
    )


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
def test_dpo_equals_its_paper(kind, eps, beta):
    if kind in ("ipo", "hinge") and eps:
        with pytest.raises(ValueError, match="label_smoothing"):
            call_dpo(kind, beta, eps)
        return
    result = call_dpo(kind, beta, eps)
    torch.testing.assert_close(result.losses, t64(paper_dpo(kind, beta, eps)), **TOL64)
    torch.testing.assert_close(result.chosen_rewards, beta * (t64(PC) - t64(RC)), **TOL64)
    torch.testing.assert_close(result.rejected_rewards, beta * (t64(PR) - t64(RR)), **TOL64)


@pytest.mark.parametrize("kind", ["sigmoid", "robust"])
def test_dpo_of_an_unchanged_policy_is_ln2_with_zero_rewards(kind):
    """Step 0 with a no-op adapter: policy == reference."""
    result = call_dpo(kind, 0.1, 0.1 if kind == "robust" else 0.0, pc=RC, pr=RR)
    torch.testing.assert_close(result.losses, torch.full((3,), math.log(2), dtype=F64), **TOL64)
    metrics = preference_metrics(result, t64(RC), t64(RR))
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # a tie is not a win


def test_half_precision_log_probs_are_compared_in_float32():
    """Differences of summed log-probs keep only 2-3 digits in bfloat16."""
    bf16 = [torch.tensor(values, dtype=torch.bfloat16) for values in (PC, PR, RC, RR)]
    result = dpo_loss(*bf16, beta=0.5)
    assert result.losses.dtype == torch.float32
    expected = dpo_loss(*(values.float() for values in bf16), beta=0.5).losses
    torch.testing.assert_close(result.losses, expected, rtol=0, atol=0)


def test_dpo_rejects_unknown_settings():
    with pytest.raises(ValueError, match="one of"):
        call_dpo("kto_pair", 0.1)
    with pytest.raises(ValueError, match="0.5"):
        call_dpo("robust", 0.1, 0.5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*map(t64, (PC, PR, RC, RR)), loss_type="ipo")


def test_simpo_equals_its_paper():
    beta, gamma, alpha, nll = 2.0, 0.6, 0.3, 1.7
    averages = [[s / n for s, n in zip(PC, LC)], [s / n for s, n in zip(PR, LR)]]
    result = simpo_loss(*map(t64, averages), beta=beta, gamma=gamma, chosen_nll=t64(nll), nll_weight=alpha)
    # SimPO Eq. 6: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma); CPO adds alpha NLL
    expected = [
        -logsig(beta / lc * pc - beta / lr * pr - gamma) + alpha * nll
        for pc, pr, lc, lr in zip(PC, PR, LC, LR)
    ]
    torch.testing.assert_close(result.losses, t64(expected), **TOL64)
    with pytest.raises(ValueError, match="chosen_nll"):
        simpo_loss(*map(t64, averages), nll_weight=1.0)


def test_orpo_equals_its_paper():
    lam, nll, chosen, rejected = 0.25, t64([2.0, 1.5, 0.5]), [-0.3, -1.2, -2.5], [-0.9, -0.4, -3.0]
    result = orpo_loss(t64(chosen), t64(rejected), nll, beta=lam)

    def odds(avg_logp: float) -> float:  # ORPO Eq. 4, P = exp of the length-normalised log-likelihood
        p = math.exp(avg_logp)
        return p / (1 - p)

    log_or = [math.log(odds(c) / odds(r)) for c, r in zip(chosen, rejected)]
    expected = [n - lam * logsig(x) for n, x in zip(nll.tolist(), log_or)]  # Eq. 6-7: L_SFT + lam L_OR
    torch.testing.assert_close(result.losses, t64(expected), **TOL64)
    torch.testing.assert_close(result.extra["log_odds_chosen"], t64(log_or), **TOL64)


def test_kto_and_its_kl_estimate_equal_the_paper():
    beta, w_d, w_u = 0.5, 1.33, 0.7
    kl = kl_estimate(t64([-3.0, -5.0]), t64([-4.0, -5.5]))  # mean of (1.0, 0.5)
    assert kl.item() == pytest.approx(0.75) and not kl.requires_grad
    assert kl_estimate(t64([-3.0]), t64([-2.0])).item() == 0.0  # a KL is never negative
    desirable = torch.tensor([True, False, True])
    result = kto_loss(
        t64(PC), t64(RC), desirable, kl, beta=beta, desirable_weight=w_d, undesirable_weight=w_u
    )
    # KTO Eq. 7-8: lambda_y - v(x, y), v = lambda_D sigma(beta (r - z0)) or lambda_U sigma(beta (z0 - r))
    expected = []
    for pc, rc, good in zip(PC, RC, desirable.tolist()):
        r = pc - rc
        expected.append(
            w_d - w_d / (1 + math.exp(-beta * (r - 0.75)))
            if good
            else w_u - w_u / (1 + math.exp(-beta * (0.75 - r)))
        )
    torch.testing.assert_close(result.losses, t64(expected), **TOL64)
    metrics = kto_metrics(result, t64(PC))
    assert metrics["rewards/chosen"] == pytest.approx(beta * ((PC[0] - RC[0]) + (PC[2] - RC[2])) / 2)
    only_desirable = kto_loss(t64(PC), t64(RC), torch.ones(3, dtype=torch.bool), kl)
    assert set(kto_metrics(only_desirable, t64(PC))) == {"kl", "rewards/chosen", "logps/chosen"}


def test_reward_loss_equals_bradley_terry():
    chosen, rejected, margin, coef = t64([1.0, -0.5, 2.0]), t64([0.5, 0.5, 2.0]), t64([0.2, 0.0, 1.0]), 0.01
    expected = [
        -logsig(c - r - m) + coef * (c + r) ** 2
        for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())
    ]
    result = reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=coef)
    torch.testing.assert_close(result, t64(expected), **TOL64)
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx(1 / 3)  # the tie counts as wrong


def _losses_for(name: str, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    ref = t64(RC), t64(RR)
    if name in DPO_LOSS_TYPES:
        lengths = dict(chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR))
        return dpo_loss(chosen, rejected, *ref, loss_type=name, **lengths).losses
    if name == "simpo":
        return simpo_loss(chosen / 4, rejected / 4).losses
    if name == "orpo":
        return orpo_loss(chosen / 20, rejected / 20, t64(1.0)).losses
    if name == "kto":
        both = torch.cat([chosen, rejected])
        labels = torch.tensor([True] * 3 + [False] * 3)
        return kto_loss(both, torch.cat(ref), labels, t64(0.1)).losses
    return reward_loss(chosen / 10, rejected / 10)


@pytest.mark.parametrize("name", [*DPO_LOSS_TYPES, "simpo", "orpo", "kto", "reward"])
def test_raising_the_chosen_logp_lowers_the_loss(name):
    chosen, rejected = t64(RC).requires_grad_(), t64(RR).requires_grad_()  # policy == reference
    _losses_for(name, chosen, rejected).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all(), (chosen.grad, rejected.grad)


# -- sequence log-probabilities ----------------------------------------------------------------


def test_sequence_logps_ignore_whatever_masked_positions_hold():
    token_logps = t64([[-1.0, -2.0, float("nan")], [-0.5, float("-inf"), -3.0], [float("nan")] * 3])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), t64([-3.0, -3.5, 0.0]))
    torch.testing.assert_close(sequence_logps(token_logps, mask, average=True), t64([-1.5, -1.75, 0.0]))


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_from_logits_equal_trl_get_batch_logps(average):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, dtype=F64)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding
    (cpo_trainer,) = trl_names("trl.experimental.cpo", "CPOTrainer")
    expected = cpo_trainer.get_batch_logps(logits, labels.clone(), average_log_prob=average)
    torch.testing.assert_close(sequence_logps_from_logits(logits, labels, average=average), expected, **TOL64)
    token_logps, mask = token_logps_from_logits(logits, labels)
    assert mask.sum().item() == 3 * 5 - 2 and token_logps.shape == (3, 6)


def test_peftkit_objectives_never_imports_trl():
    for path in Path(objectives.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "trl" for n in names), path


# -- each loss equals TRL 1.16's value -----------------------------------------------------------

SEQ = 8  # tokens per row of the stand-in batches
PAIRED = {"prompt": ["a b", "c d"], "chosen": [" e", " f"], "rejected": [" f", " e"]}
UNPAIRED = {"prompt": ["a b", "c d"], "completion": [" e", " f"], "label": [True, False]}
# What TRL logs about the model's outputs rather than the loss (the loss functions never see them).
MODEL_STATISTICS = {"logits/chosen", "logits/rejected", "entropy", "num_tokens", "mean_token_accuracy"}


def trl_names(module: str, names: str) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental's "unstable API" notice
        imported = __import__(module, fromlist=names.split())
    return [getattr(imported, name) for name in names.split()]


def build(module: str, kind: str, tokenizer, tmp_path, data=PAIRED, model=None, **config):
    """A real TRL trainer for a tiny model: its loss code reads what TRL's own __init__ set up."""
    config_cls, trainer_cls = trl_names(module, f"{kind}Config {kind}Trainer")
    args = config_cls(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2, **config
    )
    model = model if model is not None else make_tiny_llama(vocab_size=len(tokenizer))
    extra = {"ref_model": copy.deepcopy(model)} if kind in ("DPO", "KTO") else {}
    data = datasets.Dataset.from_dict(data)
    return trainer_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, **extra)


def completion_rows(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``[rows, SEQ-1]`` (0 off the completion, as TRL's fused head gives) and
    the ``[rows, SEQ]`` completion mask: each row's last ``length`` tokens are its completion."""
    mask = torch.zeros(len(lengths), SEQ, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, SEQ - n :] = 1
    values = -3 * torch.rand(len(lengths), SEQ - 1, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return values * mask[:, 1:], mask


def policy_stand_in(**per_token_by_id):
    """A model answering each call with the given per-token log-probs, keyed on the batch's token id."""

    def forward(input_ids, **kwargs):
        logps = per_token_by_id[f"id{int(input_ids[0, 0])}"]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return forward


def logged(trainer) -> dict[str, float]:
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    return {name: values[-1] for name, values in metrics.items()}


def assert_logged_like_trl(mine: dict[str, float], trl: dict[str, float], tol: float) -> None:
    assert set(mine) == set(trl) - MODEL_STATISTICS
    assert mine == pytest.approx({name: trl[name] for name in mine}, abs=tol)


DPO_ROWS = completion_rows(LC + LR, seed=1)  # the three chosen rows, then the three rejected


def our_dpo(**settings):
    token_logps, mask = DPO_ROWS
    logps, lengths = sequence_logps(token_logps, mask[:, 1:]), mask.sum(-1)
    lengths = dict(chosen_lengths=lengths[:3], rejected_lengths=lengths[3:])
    return dpo_loss(logps[:3], logps[3:], t64(RC), t64(RR), **lengths, **settings), logps


def trl_dpo(tokenizer, tmp_path, **config) -> tuple[torch.Tensor, dict[str, float]]:
    """DPOTrainer._compute_loss per pair (one pair a call), and its metrics for the whole batch."""
    trainer = build("trl", "DPO", tokenizer, tmp_path, **config)
    trainer.precompute_ref_logps = True  # reference log-probs from the batch (module docstring)
    token_logps, mask = DPO_ROWS

    def loss(pairs: list[int]) -> float:
        rows = pairs + [3 + i for i in pairs]
        inputs = {"input_ids": torch.full((len(rows), SEQ), 5), "attention_mask": torch.ones_like(mask[rows])}
        inputs.update(
            completion_mask=mask[rows], ref_chosen_logps=t64(RC)[pairs], ref_rejected_logps=t64(RR)[pairs]
        )
        return trainer._compute_loss(policy_stand_in(id5=token_logps[rows]), inputs, False).item()

    per_pair = t64([loss([i]) for i in range(3)])
    loss([0, 1, 2])
    return per_pair, logged(trainer)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    "kind,eps", [("sigmoid", 0), ("ipo", 0), ("hinge", 0), *[("robust", e) for e in (0, 0.1, 0.3)]]
)
def test_dpo_equals_trl(kind, eps, beta, tiny_tokenizer, tmp_path):
    ours, logps = our_dpo(beta=beta, loss_type=kind, label_smoothing=eps)
    trl_losses, trl_metrics = trl_dpo(
        tiny_tokenizer, tmp_path, beta=beta, loss_type=kind, label_smoothing=eps
    )
    torch.testing.assert_close(ours.losses, trl_losses, **TOL64)
    assert_logged_like_trl(preference_metrics(ours, logps[:3], logps[3:]), trl_metrics, 1e-9)


def test_conservative_dpo_is_not_in_trl_1_16_dpo_but_equals_its_cpo_sigmoid(tiny_tokenizer, tmp_path):
    """TRL 1.16's DPOTrainer ignores label_smoothing for "sigmoid" (older TRL applied cDPO there);
    its CPOTrainer's "sigmoid" still computes cDPO, on whatever log-ratios it is given."""
    (conservative, logps), (plain, _) = our_dpo(label_smoothing=0.2), our_dpo()
    trl_ignoring, _ = trl_dpo(tiny_tokenizer, tmp_path / "dpo", label_smoothing=0.2)
    torch.testing.assert_close(trl_ignoring, plain.losses, **TOL64)
    assert not torch.allclose(conservative.losses, plain.losses)
    cpo = build(
        "trl.experimental.cpo", "CPO", tiny_tokenizer, tmp_path / "cpo", beta=0.1, label_smoothing=0.2
    )
    trl_conservative, _, _ = cpo.cpo_loss(logps[:3] - t64(RC), logps[3:] - t64(RR))
    torch.testing.assert_close(conservative.losses, trl_conservative, **TOL64)


def stand_in_forward(chosen, rejected, nll):
    """CPO/ORPO's concatenated_forward, returning the given average log-probs and NLL."""
    logits = torch.zeros(len(chosen), 2, 3)
    return lambda model, batch: (chosen, rejected, logits, logits, nll)


@pytest.mark.parametrize("beta,gamma,eps,alpha", [(2.0, 0.5, 0, 0), (2.5, 1.0, 0, 1.0), (0.1, 0.3, 0.2, 0.5)])
def test_simpo_equals_trl_cpo(beta, gamma, eps, alpha, tiny_tokenizer, tmp_path):
    config = dict(loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps, cpo_alpha=alpha)
    trainer = build("trl.experimental.cpo", "CPO", tiny_tokenizer, tmp_path, **config)
    chosen, rejected, nll = t64([-1.2, -0.4, -2.0]), t64([-1.0, -1.5, -2.2]), t64(1.3)
    settings = dict(beta=beta, gamma=gamma, label_smoothing=eps, chosen_nll=nll, nll_weight=alpha)
    ours = simpo_loss(chosen, rejected, **settings)
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(chosen, rejected)
    torch.testing.assert_close(ours.losses - alpha * nll, trl_losses, **TOL64)
    torch.testing.assert_close(
        (ours.chosen_rewards, ours.rejected_rewards), (trl_chosen, trl_rejected), **TOL64
    )
    trainer.concatenated_forward = stand_in_forward(chosen, rejected, nll)
    loss, trl_metrics = trainer.get_batch_loss_metrics(None, {})
    torch.testing.assert_close(ours.losses.mean(), loss, **TOL64)
    assert_logged_like_trl(preference_metrics(ours, chosen, rejected), trl_metrics, 1e-9)


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo_equals_trl(beta, tiny_tokenizer, tmp_path):
    trainer = build("trl.experimental.orpo", "ORPO", tiny_tokenizer, tmp_path, beta=beta)
    # -0.5 / -0.9 lie either side of log1mexp's switch at -ln 2; log(1 - exp(-1e-8)) is -inf in float32
    chosen, rejected = torch.tensor([-0.5, -1.2, -3.0, -0.01]), torch.tensor([-0.9, -0.6, -1e-8, -5.0])
    nll = torch.tensor(1.7)
    ours = orpo_loss(chosen, rejected, nll, beta=beta)
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = trainer.odds_ratio_loss(chosen, rejected)
    torch.testing.assert_close(ours.losses, nll - trl_losses, **TOL32)
    torch.testing.assert_close(
        (ours.chosen_rewards, ours.rejected_rewards), (trl_chosen, trl_rejected), **TOL32
    )
    torch.testing.assert_close(ours.extra["log_odds_ratio"].mean(), trl_ratio, **TOL32)
    torch.testing.assert_close(ours.extra["log_odds_chosen"].mean(), trl_log_odds, **TOL32)
    trainer.concatenated_forward = stand_in_forward(chosen, rejected, nll)
    loss, trl_metrics = trainer.get_batch_loss_metrics(None, {})
    torch.testing.assert_close(ours.losses.mean(), loss, **TOL32)
    assert_logged_like_trl(preference_metrics(ours, chosen, rejected), trl_metrics, 1e-6)


def trl_kto(trainer, rows, labels, kl_rows, ref_logps, ref_kl_logps) -> float:
    (token_logps, mask), (kl_token_logps, kl_mask) = rows, kl_rows
    inputs = {
        "input_ids": torch.full(mask.shape, 5),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
    }
    inputs.update(KL_input_ids=torch.full(kl_mask.shape, 7), KL_attention_mask=torch.ones_like(kl_mask))
    inputs.update(KL_completion_mask=kl_mask, label=labels, ref_logps=ref_logps, ref_KL_logps=ref_kl_logps)
    model = policy_stand_in(id5=token_logps, id7=kl_token_logps)
    return trainer._compute_loss(model, inputs, return_outputs=False).item()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
@pytest.mark.parametrize("kl_shift", [0.8, -0.8], ids=["kl>0", "kl<0:clamped"])
def test_kto_equals_trl(beta, weights, kl_shift, tiny_tokenizer, tmp_path):
    config = dict(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    trainer = build("trl", "KTO", tiny_tokenizer, tmp_path, data=UNPAIRED, **config)
    trainer.precompute_ref_logps = True  # reference log-probs from the batch (module docstring)
    rows, kl_rows = completion_rows([3, 2, 4, 1, 5], seed=2), completion_rows([2, 4, 1, 5, 3], seed=3)
    labels = torch.tensor([True, False, True, False, False])
    logps, kl_logps = (sequence_logps(values, mask[:, 1:]) for values, mask in (rows, kl_rows))
    ref_logps, ref_kl_logps = logps + t64([0.5, -1.0, 2.0, 0.3, -0.2]), kl_logps - kl_shift
    kl = kl_estimate(kl_logps, ref_kl_logps)
    ours = kto_loss(logps, ref_logps, labels, kl, **config)
    trl_loss = trl_kto(trainer, rows, labels, kl_rows, ref_logps, ref_kl_logps)
    assert ours.losses.mean().item() == pytest.approx(trl_loss, abs=1e-9)
    assert_logged_like_trl(kto_metrics(ours, logps), logged(trainer), 1e-9)
    for i in range(5):  # per example: a one-row KL batch whose estimate is the same kl
        one = [(values[i : i + 1], mask[i : i + 1]) for values, mask in (rows, kl_rows)]
        trl_one = trl_kto(
            trainer, one[0], labels[i : i + 1], one[1], ref_logps[i : i + 1], kl_logps[i : i + 1] - kl
        )
        assert ours.losses[i].item() == pytest.approx(trl_one, abs=1e-9)


@pytest.mark.parametrize("margin", [None, [0.3, 0.0, -0.5]], ids=["no-margin", "margin"])
@pytest.mark.parametrize("coef", [None, 0.01])
def test_reward_loss_equals_trl(margin, coef, tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_labels=1
    )
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id, **sizes)
    data = {"chosen": ["a b e", "c d f"], "rejected": ["a b f", "c d e"]}
    model = LlamaForSequenceClassification(config)
    trainer = build("trl", "Reward", tiny_tokenizer, tmp_path, data, model, center_rewards_coefficient=coef)
    chosen, rejected = t64([1.5, -0.2, 0.7]), t64([0.5, 0.3, 0.7])
    margins = t64(margin) if margin is not None else None
    ours = reward_loss(chosen, rejected, margin=margins, center_rewards_coefficient=coef)

    def trl_reward(rows: slice) -> float:
        scores = torch.cat([chosen[rows], rejected[rows]]).unsqueeze(-1)
        inputs = {
            "input_ids": torch.zeros(len(scores), 3, dtype=torch.long),
            "attention_mask": torch.ones(len(scores), 3),
        }
        if margins is not None:
            inputs["margin"] = margins[rows]
        return trainer.compute_loss(lambda **kwargs: SimpleNamespace(logits=scores), inputs).item()

    for i in range(3):
        assert ours[i].item() == pytest.approx(trl_reward(slice(i, i + 1)), abs=1e-9)
    assert ours.mean().item() == pytest.approx(trl_reward(slice(None)), abs=1e-9)
    assert_logged_like_trl(reward_metrics(chosen, rejected), logged(trainer), 1e-9)
