"""AdaLoRA against PEFT: counts, outputs, files both ways, and the rank allocator step by step.

The allocator test runs the same training steps (same weights, same batch, same AdamW) through
PEFT's ``update_and_allocate`` and ours and requires bit-identical E masks, sensitivity averages
and the same final rank_pattern; the training-loop tests check the hooks (total_step filled in,
regulariser, exact resume before and after the final budgeting).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from conftest import make_tiny_llama
from peftkit.methods.adalora import AdaLoraConfig, AdaLoraLinear
from peftkit.serialization import set_peft_model_state_dict
from peftkit.train.config import build_job_config
from peftkit.train.loop import run_training

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=10, deltaT=1)


def kwargs(**overrides):
    # CAUSAL_LM: PEFT's plain PeftModel (no task type) calls the transformers model directly and so
    # skips AdaLoraModel.forward's regulariser; peftkit adds it whenever the model computes a loss.
    return {"target_modules": TARGETS, "task_type": "CAUSAL_LM", **SCHEDULE, **overrides}


def peft_model(**overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(make_tiny_llama(vocab_size=100), peft.AdaLoraConfig(**kwargs(**overrides)))


def our_model(**overrides):
    return peftkit.get_peft_model(make_tiny_llama(vocab_size=100), AdaLoraConfig(**kwargs(**overrides)))


def copy_from_peft(ours, theirs):
    """Load PEFT's current adapter tensors into ours through the file format's keys."""
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))


def batch():
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def normalised(pattern):
    return {k.removesuffix(".default"): v for k, v in (pattern or {}).items()}


def test_counts_names_and_init_equal_peft():
    torch.manual_seed(0)
    theirs = peft_model()
    torch.manual_seed(0)
    ours = our_model()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable(ours) == trainable(theirs)
    # Same RNG draws at creation: the same seed gives PEFT's initial A, E, B exactly.
    theirs_sd, ours_sd = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert theirs_sd.keys() == ours_sd.keys()
    for key in theirs_sd:
        assert torch.equal(theirs_sd[key], ours_sd[key]), key
    assert {k for k in ours.state_dict() if "ranknum" in k} == {
        k for k in theirs.state_dict() if "ranknum" in k
    }


def test_same_weights_same_logits_and_loss():
    theirs = peft_model()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ours = our_model()
    copy_from_peft(ours, theirs)
    out_theirs, out_ours = theirs(**batch()), ours(**batch())
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    # Both add orth_reg_weight x the orthogonality term to the loss the model computes.
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-6, rtol=0)
    base_loss = ours.get_base_model()(**batch()).loss  # the adapter layers' plain output, no regulariser
    reg = ours.base_model.regularization_loss()
    torch.testing.assert_close(out_ours.loss, base_loss + reg, atol=1e-6, rtol=0)


def test_bf16_base_gives_peft_s_logits_exactly():
    """The fp32 update is added to the bf16 base output with one rounding, as PEFT's in-place add."""
    theirs = peft.get_peft_model(
        make_tiny_llama(vocab_size=100).to(torch.bfloat16), peft.AdaLoraConfig(**kwargs())
    ).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:  # PEFT makes ranknum trainable on a bf16 base: leave it alone
                p.add_(0.3 * torch.randn_like(p))
    ours = peftkit.get_peft_model(
        make_tiny_llama(vocab_size=100).to(torch.bfloat16), AdaLoraConfig(**kwargs())
    )
    copy_from_peft(ours.eval(), theirs)
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, theirs(**batch()).logits)


def test_regulariser_is_the_papers_formula():
    ours = our_model(orth_reg_weight=0.3)
    terms = []
    for module in ours.modules():
        if isinstance(module, AdaLoraLinear):
            a, b = module.lora_A["default"], module.lora_B["default"]
            terms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])))
            terms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1])))
    expected = 0.3 * torch.stack(terms).mean()
    torch.testing.assert_close(ours.base_model.regularization_loss(), expected, atol=1e-6, rtol=1e-6)


def run_both(steps: int, **overrides):
    """Train PEFT's and our model side by side; check every step; return both."""
    theirs = peft_model(**overrides)
    ours = our_model(**overrides)
    copy_from_peft(ours, theirs)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    n_modules = len(ours.base_model.adapted_modules("default"))
    for step in range(1, steps + 1):
        for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
            model(**batch()).loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
        alloc_t, alloc_o = theirs.base_model.rankallocator, ours.base_model.rankallocator
        assert alloc_t.exp_avg_ipt.keys() == alloc_o.exp_avg_ipt.keys(), step
        for key in alloc_t.exp_avg_ipt:
            assert torch.equal(alloc_t.exp_avg_ipt[key], alloc_o.exp_avg_ipt[key]), (step, key)
            assert torch.equal(alloc_t.exp_avg_unc[key], alloc_o.exp_avg_unc[key]), (step, key)
        params_t = dict(theirs.named_parameters())
        for name, param in ours.named_parameters():
            if param.requires_grad:
                assert torch.equal(param, params_t[name]), (step, name)
        assert normalised(ours.peft_config["default"].rank_pattern) == normalised(
            theirs.peft_config["default"].rank_pattern
        ), step
    return theirs, ours, n_modules


def test_rank_allocator_matches_peft_step_by_step():
    theirs, ours, n_modules = run_both(10)
    pattern = ours.peft_config["default"].rank_pattern
    assert pattern is not None and len(pattern) == n_modules
    # The final budget: target_r ranks per module on average, as PEFT's target_bgt.
    assert (
        sum(sum(keep) for keep in pattern.values())
        == 2 * n_modules
        == theirs.base_model.rankallocator.target_bgt
    )
    kept = {len([k for k in keep if k]) for keep in pattern.values()}
    assert len(kept) > 1, "the budget was not re-distributed between modules"
    for name, keep in pattern.items():
        e = ours.get_base_model().get_submodule(name.removesuffix(".lora_E")).lora_E["default"]
        assert bool((e.view(-1)[~torch.tensor(keep)] == 0).all()), name  # pruned: E = 0 in memory


def test_deltaT_and_budget_schedule_match_peft():
    run_both(9, deltaT=2, tinit=1, tfinal=2)


def test_budgeted_files_load_both_ways(tmp_path):
    theirs, ours, _ = run_both(10)
    with warnings.catch_warnings():  # PEFT warns about the fully pruned module's empty tensors
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    files_t = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    files_o = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert files_t.keys() == files_o.keys()
    for key in files_t:  # cut to the kept ranks in both
        assert torch.equal(files_t[key], files_o[key]), key
    config_t = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    config_o = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config_o["rank_pattern"] == config_t["rank_pattern"]
    assert {k for k in config_t if k not in ("peft_version",)} <= config_o.keys()

    expected = ours.eval()(**batch()).logits
    mine = peftkit.PeftModel.from_pretrained(make_tiny_llama(vocab_size=100), tmp_path / "theirs")
    torch.testing.assert_close(mine(**batch()).logits, expected, atol=1e-5, rtol=0)
    assert mine.get_nb_trainable_parameters()[1] < ours.get_nb_trainable_parameters()[1]  # smaller ranks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(make_tiny_llama(vocab_size=100), tmp_path / "ours")
    # No labels: PEFT's frozen AdaLoraModel fails computing its regulariser (no trainable adapter).
    ids = batch()["input_ids"]
    torch.testing.assert_close(peft_loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert mine.get_nb_trainable_parameters() == peft_loaded.get_nb_trainable_parameters()


def test_fresh_files_load_both_ways(tmp_path):
    theirs = peft_model()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    expected = theirs.eval()(**batch()).logits
    theirs.save_pretrained(tmp_path / "theirs")
    mine = peftkit.PeftModel.from_pretrained(make_tiny_llama(vocab_size=100), tmp_path / "theirs")
    torch.testing.assert_close(mine(**batch()).logits, expected, atol=1e-5, rtol=0)
    mine.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(make_tiny_llama(vocab_size=100), tmp_path / "ours")
    torch.testing.assert_close(back(input_ids=batch()["input_ids"]).logits, expected, atol=1e-5, rtol=0)


def test_merge_and_unload_equals_unmerged():
    _, ours, _ = run_both(10)
    ours.eval()
    expected = ours(**batch()).logits
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, AdaLoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(**batch()).logits, expected, atol=1e-4, rtol=0)


def test_config_checks_say_what_to_change():
    with pytest.raises(ValueError, match="lower tinit or tfinal"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ValueError, match="must not exceed init_r"):
        AdaLoraConfig(init_r=4, target_r=8)
    with pytest.raises(ValueError, match="DoRA"):
        AdaLoraConfig(use_dora=True)
    with pytest.raises(ValueError, match="beta1"):
        AdaLoraConfig(beta1=1.0)
    assert AdaLoraConfig().total_step is None  # allowed here: the training loop fills it in


def test_on_train_start_fills_total_step_and_checks_it():
    ours = our_model(total_step=None)
    ours.base_model.on_train_start(12)
    assert ours.peft_config["default"].total_step == 12
    short = our_model(total_step=None, tinit=4, tfinal=4)
    with pytest.raises(ValueError, match="lower tinit or tfinal, or train for more steps"):
        short.base_model.on_train_start(8)
    with pytest.raises(ValueError, match="set total_step"):
        our_model(total_step=None).base_model.update_and_allocate(1)


def test_only_one_trainable_adapter():
    ours = our_model()
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        ours.add_adapter("other", AdaLoraConfig(**kwargs()))
    ours.add_adapter("frozen", AdaLoraConfig(**kwargs(), inference_mode=True))


# -- the training loop ------------------------------------------------------------------------------

ROWS = [
    {"prompt": f"word {w} is", "completion": c} for w, c in [("good", "positive"), ("bad", "negative")]
] * 8


def job(model_dir, out, data, **training):
    settings = {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 7}
    settings.update(training)
    return build_job_config(
        {
            "base_model": str(model_dir),
            "method": "adalora",
            "adalora": {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "target_modules": "all-linear"},
            "data": {"train": str(data), "test_size": 4},
            "training": settings,
            "evaluation": {"accuracy_after": False},
            "output_dir": str(out),
        }
    )


@pytest.mark.parametrize("save_every, stop", [(4, 6), (10, 11)], ids=["budgeting", "after-final-budget"])
def test_resume_is_exact(tiny_model_dir, tmp_path, save_every, stop):
    """Interrupt and resume vs one straight run: identical adapter files and rank_pattern.

    With 12 steps, tinit 2 and tfinal 3 the final budget is fixed at step 9: the first case
    resumes from a checkpoint in the budgeting phase, the second from one after it. Either fails
    when the allocator's state is not restored (checked by hand when this test was written).
    """
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_training(job(tiny_model_dir, tmp_path / "straight", data, save_every=save_every), progress=False)
    interrupted = job(tiny_model_dir, tmp_path / "resumed", data, save_every=save_every)
    assert run_training(interrupted, progress=False, stop_after_step=stop) == {"interrupted_at": stop}
    run_training(interrupted, resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config_a = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    config_b = json.loads((tmp_path / "resumed" / "adapter" / "adapter_config.json").read_text())
    assert config_a["total_step"] == 12  # filled in from the run
    assert config_a["rank_pattern"] == config_b["rank_pattern"]
    assert sum(sum(keep) for keep in config_a["rank_pattern"].values()) == 2 * len(config_a["rank_pattern"])
    # The saved adapter is cut to the kept ranks and loads in PEFT.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoModelForCausalLM

        peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "straight" / "adapter"
        )


class TinyConvNet(torch.nn.Module):
    """Two Conv2d layers (PEFT's SVDConv2d targets) and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = torch.nn.Conv2d(6, 4, 3, stride=2)
        self.head = torch.nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def test_conv2d_matches_peft(tmp_path):
    conv_kwargs = dict(target_modules=["c1", "c2", "head"], init_r=3, target_r=1, total_step=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(TinyConvNet(), peft.AdaLoraConfig(**conv_kwargs))
    ours = peftkit.get_peft_model(TinyConvNet(), AdaLoraConfig(**conv_kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable(ours) == trainable(theirs)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    copy_from_peft(ours, theirs)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(TinyConvNet(), tmp_path)
    torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.merge_and_unload()(x), expected, atol=1e-4, rtol=0)
