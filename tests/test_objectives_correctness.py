"""The preference objectives end to end, on tiny models (fp32, lora_dropout 0): what the loss
functions' own tests (test_preference_losses.py) cannot show, that the training loop gives them
the right log-probs, reference model, batches and adapter.

* DPO with a new (no-op) adapter starts at ln 2 with zero rewards; ``completion_logps`` (chunked
  head) equals log-probs from the full logits, for plain, LoRA and prompt-tuning models and left
  or right padding;
* TRL's own DPOTrainer is the oracle for one batch's loss and rewards (sigmoid, ipo; base and
  starting-adapter references);
* ``reference: precompute`` trains like ``auto``, stores its log-probs and reads them back on resume;
* ``init_adapter`` is the frozen reference and the "before" model; a method mismatch is refused;
* reward models, KTO, ORPO and SimPO train and log what they should; config errors name the key.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import datasets
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
import peftkit.objectives.precompute as precompute
from _tiny_models import make_tiny_gpt2
from conftest import make_tiny_llama, make_tiny_tokenizer
from peftkit.configuration import ConfigError
from peftkit.data.preference_encode import encode_pair, encode_unpaired
from peftkit.errors import PeftkitError
from peftkit.models import load_model_and_tokenizer
from peftkit.objectives import PreferenceConfig, sequence_logps_from_logits
from peftkit.objectives.kto import KTOTask
from peftkit.objectives.pairwise import DPOTask
from peftkit.objectives.reward import RewardTask
from peftkit.objectives.sequence import AdapterOff, FrozenStart, completion_logps
from peftkit.train.config import build_job_config
from peftkit.train.distributed import World
from peftkit.train.loop import run_training, train
from peftkit.train.loop import (
    setup as setup_session,  # not `setup`: pytest 8.0 runs a module's setup_session()
)

pytestmark = pytest.mark.usefixtures("single_thread")

LN2 = math.log(2)
PAIRS = [("good", "positive", "negative"), ("bad", "negative", "positive"), ("fox", "neutral", "positive")]
PAIR_ROWS = [{"prompt": f"word {w} is", "chosen": c, "rejected": r} for w, c, r in PAIRS] * 8
KTO_ROWS = [
    {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
    for row in PAIR_ROWS
    for side in ("chosen", "rejected")
]
SFT_ROWS = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in PAIR_ROWS]
PAIR_METRICS = {f"rewards/{n}" for n in ("chosen", "rejected", "accuracies", "margins")} | {
    "logps/chosen",
    "logps/rejected",
}  # what TRL's DPO, CPO (SimPO) and ORPO trainers log, beyond statistics of the logits
LOOP_KEYS = {"step", "epoch", "loss", "lr", "tokens_per_s", "tokens_seen", "step_time_s", "grad_norm"}


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective-data")
    for name, rows in (("pairs", PAIR_ROWS), ("kto", KTO_ROWS), ("sft", SFT_ROWS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def job_for(model_dir, data_dir, out, objective, *, data="pairs", method="lora", training=(), **top):
    """A 6-step run of ``objective`` (4 examples a step, lr 1e-2, seed 7) on the toy rows."""
    config = {
        "base_model": str(model_dir),
        "objective": objective,
        "method": method,
        "data": {"train": str(data_dir / f"{data}.jsonl"), "test_size": 6, "val_size": 3},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "seed": 7}
        | dict(training),
        "evaluation": {"batch_size": 4},
        "output_dir": str(out),
        **top,
    }
    if method == "lora":
        config["lora"] = {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.0}
    return build_job_config(config)


def step_records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def adapter_weights(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_tensors(mine, expected, atol=1e-6):
    assert mine.keys() == expected.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], expected[name], rtol=0, atol=atol, msg=name)


def first_batch(session):
    examples, _ = session.world.shard(session.stream.get(0))
    return examples, session.task.collate(examples, session.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def dpo_auto(tiny_model_dir, data_dir, tmp_path_factory):
    """A DPO run with a new adapter and the default reference (auto: adapter disabled)."""
    out = tmp_path_factory.mktemp("dpo-auto") / "run"
    run_training(job_for(tiny_model_dir, data_dir, out, "dpo"), progress=False)
    return out


# -- 1. the starting point ---------------------------------------------------------------------


def test_dpo_with_a_new_adapter_starts_at_ln2_with_zero_rewards(dpo_auto):
    records = step_records(dpo_auto)
    first = records[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert (first["rewards/margins"], first["rewards/chosen"], first["rewards/rejected"]) == (0.0, 0.0, 0.0)
    assert abs(records[-1]["loss"] - LN2) > 1e-3 and records[-1]["rewards/margins"] != 0.0  # it trained


# -- 2. completion log-probs -------------------------------------------------------------------


def padded(rows, *, left):
    """Rows of (prompt ids, completion ids) padded (id 0) on one side, labels on the completions."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        start = width - n if left else 0
        ids[i, start : start + n] = torch.tensor(prompt + completion)
        mask[i, start : start + n] = 1
        labels[i, start + len(prompt) : start + n] = torch.tensor(completion)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def varied_rows():
    g = torch.Generator().manual_seed(0)
    lengths = [(5, 3), (2, 6), (7, 1), (3, 4)]  # (prompt, completion): padding differs per row
    return [
        (torch.randint(3, 400, (p,), generator=g).tolist(), torch.randint(3, 400, (c,), generator=g).tolist())
        for p, c in lengths
    ]


def with_lora(model, targets):
    """``model`` with a LoRA adapter whose B factors are non-zero, so that it changes the result."""
    config = peftkit.LoraConfig(
        r=4, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=targets != "all-linear"
    )
    model = peftkit.get_peft_model(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))
    return model


def tiny_model(kind):
    model = make_tiny_llama(initializer_range=0.2)
    if kind == "lora":
        return with_lora(model, "all-linear")
    if kind == "prompt_tuning":
        return peftkit.get_peft_model(
            model, peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
        )
    return model


@pytest.mark.parametrize("kind", ["llama", "lora", "prompt_tuning"])
def test_completion_logps_equal_log_probs_from_the_full_logits(kind):
    model, batch = tiny_model(kind), padded(varied_rows(), left=False)
    with torch.no_grad():
        logps, counts = completion_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # prompt tuning returns logits for its virtual tokens too: keep the real positions
        expected = sequence_logps_from_logits(logits[:, -batch["input_ids"].shape[1] :], batch["labels"])
    assert counts.tolist() == [3, 6, 1, 4]
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    if kind == "prompt_tuning":  # the virtual tokens change the result: they were not dropped
        assert (logps - completion_logps(model.get_base_model(), batch)[0]).abs().max() > 1e-2
        with pytest.raises(ValueError, match="right-padded"):
            completion_logps(model, padded(varied_rows(), left=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: absolute positions, which left padding shifts
def test_completion_logps_do_not_depend_on_the_padding_side(arch):
    model = make_tiny_llama(initializer_range=0.2) if arch == "llama" else make_tiny_gpt2(vocab_size=400)
    model = with_lora(model, "all-linear" if arch == "llama" else ["c_attn", "c_proj"])
    rows = varied_rows()
    with torch.no_grad():
        right = completion_logps(model, padded(rows, left=False))
        left = completion_logps(model, padded(rows, left=True))
        alone = torch.cat([completion_logps(model, padded([row], left=False))[0] for row in rows])
    torch.testing.assert_close(left[0], right[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(left[0], alone, rtol=0, atol=1e-5)
    assert left[1].tolist() == right[1].tolist()


# -- 3. TRL's DPOTrainer as the oracle ---------------------------------------------------------


@pytest.mark.parametrize("reference", ["base", "start"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_batch_loss_and_rewards_equal_trl_dpo_trainer(loss_type, reference, tmp_path):
    """One batch's DPO loss and rewards: ``DPOTask.loss_sum / pairs`` against TRL 1.16's
    ``DPOTrainer.compute_loss`` on the same weights (peftkit's adapter saved in PEFT format, loaded
    by HF PEFT) and the same token ids (peftkit's tokenization, batched by TRL's own collator).

    TRL's reference for a PeftModel with ``ref_model=None`` is a "ref" adapter it copies from the
    loaded one, else the adapters disabled. ``base``: "ref" deleted, so TRL disables the adapter as
    for a new one (peftkit: AdapterOff). ``start``: "ref" kept, then both policies move away from
    it by the same change (peftkit: FrozenStart, i.e. init_adapter). TRL options: label_smoothing
    0 (TRL 1.16 ignores it for sigmoid, peftkit applies it); disable_dropout (default) and lora
    dropout 0, so both passes are deterministic; max_length 1024 (default) exceeds the rows, so
    TRL's collator cuts nothing; right padding on both sides.
    """
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    tok = make_tiny_tokenizer()
    base = make_tiny_llama(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
    )
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    ours = peftkit.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(3)

    def move(prefix):  # a random change of the LoRA factors of ours
        with torch.no_grad():
            for name, param in ours.named_parameters():
                if prefix in name:
                    param.add_(0.3 * torch.randn(param.shape, generator=g))

    move("lora_B")  # policy != base model
    ours.save_pretrained(tmp_path / "start")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "start", is_trainable=True)
    texts = [("word good is", "positive", "negative tweet"), ("The quick fox", "jumps over", "lazy dog")]
    texts.append(("hello world", "bonjour le monde", "answer"))
    dataset = {k: [t[i] for t in texts] for i, k in enumerate(("prompt", "chosen", "rejected"))}
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, beta=0.1, loss_type=loss_type
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=theirs, args=args, train_dataset=datasets.Dataset.from_dict(dataset), processing_class=tok
        )
    assert "ref" in trainer.model.peft_config  # TRL's copy of the loaded adapter
    task = DPOTask(PreferenceConfig(beta=0.1, loss_type=loss_type))
    if reference == "base":
        trainer.model.delete_adapter("ref")
        task.reference = AdapterOff()
    else:
        task.reference = FrozenStart(ours)
        move("lora_A")
        move("lora_B")
        ours.save_pretrained(tmp_path / "moved")
        peft.set_peft_model_state_dict(
            trainer.model, load_file(str(tmp_path / "moved" / "adapter_model.safetensors")), "default"
        )
    examples = [encode_pair(tok, user(p), assistant(c), assistant(r), max_seq_len=128) for p, c, r in texts]
    tokenized = [
        {"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids}
        for e in examples
    ]
    inputs = trainer.data_collator(tokenized)
    batch = task.collate(examples, tok.pad_token_id)
    assert torch.equal(inputs["input_ids"], batch["input_ids"])

    trainer.model.train()
    ours.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, inputs).item()
        total, pairs = task.loss_sum(ours, batch)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    mine = task.step_metrics(World(), torch.device("cpu"))
    assert total.item() / pairs == pytest.approx(trl_loss, rel=1e-6, abs=1e-6)  # ipo: ~32, fp32
    assert abs(trl_loss - LN2) > 1e-3  # the policy differs from the reference
    assert set(mine) == PAIR_METRICS
    assert mine == pytest.approx({name: trl_metrics[name] for name in mine}, abs=1e-5)


# -- 4. precomputed reference ------------------------------------------------------------------


def test_precomputed_reference_trains_like_auto_and_is_read_back_on_resume(
    dpo_auto, tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys
):
    full, pre = tmp_path / "precompute", {"reference": "precompute"}
    run_training(job_for(tiny_model_dir, data_dir, full, "dpo", preference=pre), progress=False)
    assert "log-probs computed once, stored in" in capsys.readouterr().err
    stored = load_file(str(full / precompute.REFERENCE_FILE))
    shapes = {"train": (15, 2), "validation": (3, 2), "test": (6, 2)}  # [examples, (chosen, rejected)]
    assert {name: tuple(v.shape) for name, v in stored.items()} == shapes
    auto_losses = [r["loss"] for r in step_records(dpo_auto)]
    assert [r["loss"] for r in step_records(full)] == pytest.approx(auto_losses, abs=1e-6)
    assert_same_tensors(adapter_weights(full), adapter_weights(dpo_auto))

    # Interrupted after step 3 (a checkpoint there), then resumed: the stored log-probs are read back.
    part = tmp_path / "resumed"
    job = job_for(tiny_model_dir, data_dir, part, "dpo", preference=pre, training={"save_every": 3})
    assert run_training(job, progress=False, stop_after_step=3) == {"interrupted_at": 3}
    assert_same_tensors(load_file(str(part / precompute.REFERENCE_FILE)), stored, atol=0)

    def recompute(*args, **kwargs):
        raise AssertionError("the reference log-probs were recomputed on resume")

    monkeypatch.setattr(precompute, "_compute", recompute)
    capsys.readouterr()
    run_training(job, resume=True, progress=False)
    assert f"log-probs read from {part / precompute.REFERENCE_FILE}" in capsys.readouterr().err
    assert [r["step"] for r in step_records(part)] == list(range(1, 7))
    assert [r["loss"] for r in step_records(part)] == pytest.approx(auto_losses, abs=1e-6)
    assert_same_tensors(adapter_weights(part), adapter_weights(dpo_auto))


# -- 5. init_adapter ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, data_dir, tmp_path_factory):
    """An adapter trained by SFT on the chosen completions (the start of an SFT -> DPO pipeline)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    job = job_for(tiny_model_dir, data_dir, out, "sft", data="sft", training={"max_steps": 12})
    run_training(job, progress=False)
    return out / "adapter"


def test_init_adapter_is_the_frozen_reference_and_the_before_model(
    tiny_model_dir, data_dir, sft_adapter, tmp_path
):
    out, before_too = tmp_path / "dpo", {"accuracy_before": True}
    job = job_for(tiny_model_dir, data_dir, out, "dpo", init_adapter=str(sft_adapter), evaluation=before_too)
    session = setup_session(job)
    assert isinstance(session.task.reference, FrozenStart)
    _, batch = first_batch(session)

    def first_loss(reference):  # the loss of step 1's batch against ``reference``, without training
        task = DPOTask(job.preference)
        task.reference = reference
        with torch.no_grad():
            total, pairs = task.loss_sum(session.model, batch)
        return total.item() / pairs

    against_base = first_loss(AdapterOff())
    before = session.results["before"]
    train(session, progress=False)
    assert step_records(out)[0]["loss"] == pytest.approx(LN2, abs=1e-6)  # reference = the starting adapter
    assert abs(against_base - LN2) > 0.02  # with the base as reference the same batch is far from ln 2

    # "before" is the starting adapter's evaluation, not the base model's.
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), task="causal_lm")
    model = peftkit.PeftModel.from_pretrained(model, str(sft_adapter))
    test = session.data.test

    def evaluate(model):
        return DPOTask(job.preference).evaluate(
            model, tokenizer, test, eval_cfg=job.evaluation, autocast_dtype=None
        )

    assert before == pytest.approx(evaluate(model), abs=1e-6)
    with model.disable_adapter():
        of_base = evaluate(model)
    assert of_base["likelihood_accuracy"] != pytest.approx(before["likelihood_accuracy"])


def test_init_adapter_of_another_method_is_refused(tiny_model_dir, data_dir, sft_adapter, tmp_path):
    job = job_for(
        tiny_model_dir, data_dir, tmp_path / "ia3", "dpo", method="ia3", init_adapter=str(sft_adapter)
    )
    with pytest.raises(
        PeftkitError, match=r"init_adapter .* is a .*LORA adapter but the job's method is ia3"
    ):
        run_training(job, progress=False)
    assert not (tmp_path / "ia3" / "metrics.jsonl").exists()


# -- 6. reward model ---------------------------------------------------------------------------


def test_reward_model_trains_a_one_output_head_on_the_bradley_terry_loss(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "reward"
    job = job_for(tiny_model_dir, data_dir, out, "reward")
    assert job.task.value == "SEQ_CLS"
    results = run_training(job, progress=False)
    assert 0.0 <= results["after"]["pairwise_accuracy"] <= 1.0 and results["after"]["n"] == 6
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    heads = {name: w.shape for name, w in adapter_weights(out).items() if "score" in name}
    assert heads and all(shape[0] == 1 for shape in heads.values()), heads
    records = step_records(out)
    assert {"accuracy", "margin", "min_reward", "mean_reward", "max_reward"} <= set(records[0])

    model, tokenizer = load_model_and_tokenizer(
        str(tiny_model_dir), task="seq_cls", **RewardTask().model_kwargs()
    )
    model = peftkit.PeftModel.from_pretrained(model, str(out / "adapter")).eval()
    assert model.get_base_model().config.num_labels == 1
    examples = [
        encode_pair(tokenizer, user(f"word {w} is"), assistant(c), assistant(r), max_seq_len=64)
        for w, c, r in PAIRS
    ]
    task = RewardTask()
    with torch.no_grad():
        total, pairs = task.loss_sum(model, task.collate(examples, tokenizer.pad_token_id))

        def score(ids):  # one unpadded row: the head's output at its last token
            logits = model(input_ids=torch.tensor([ids])).logits
            assert logits.shape == (1, 1)
            return logits[0, 0]

        chosen = torch.stack([score(e.prompt_ids + e.chosen_ids) for e in examples])
        rejected = torch.stack([score(e.prompt_ids + e.rejected_ids) for e in examples])
    assert pairs == 3
    assert (chosen - rejected).abs().min() > 1e-4  # distinct scores: the check below is not trivial
    assert total.item() / pairs == pytest.approx(-F.logsigmoid(chosen - rejected).mean().item(), abs=1e-6)


# -- 7. KTO, ORPO, SimPO -----------------------------------------------------------------------


def test_kto_starts_at_half_its_weights_and_logs_its_kl(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "kto"
    preference = {"desirable_weight": 2.0, "undesirable_weight": 0.5}
    session = setup_session(job_for(tiny_model_dir, data_dir, out, "kto", data="kto", preference=preference))
    examples, _ = first_batch(session)
    weights = [2.0 if e.desirable else 0.5 for e in examples]
    assert len(examples) == 4 and len(set(weights)) == 2  # both kinds in step 1 (seed 7)
    train(session, progress=False)
    records = step_records(out)
    # No-op adapter: reward 0 and KL 0, so each row loses w * (1 - sigmoid(0)) = w / 2.
    assert records[0]["loss"] == pytest.approx(0.5 * sum(weights) / len(weights), abs=1e-6)
    assert records[0]["kl"] == 0.0
    assert all(r["kl"] >= 0.0 for r in records) and any(r["kl"] > 0.0 for r in records)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(
        records[0]
    )


def test_kto_trains_through_a_micro_batch_of_one_row(tiny_model_dir, data_dir, tmp_path):
    """33 training rows in batches of 4 leave one lone row per epoch, placed at step 1 by the
    seeded length grouping here: its KL row is itself (as TRL's rotation gives a batch of one),
    so z0 is its own log-ratio, and the run trains on."""
    out = tmp_path / "kto-lone"
    job = job_for(tiny_model_dir, data_dir, out, "kto", data="kto", training={"max_steps": 2, "seed": 42})
    job.data.val_size = 9  # 48 rows - 6 test - 9 validation = 33
    session = setup_session(job)
    examples, _ = first_batch(session)
    assert len(examples) == 1
    batch = session.task.collate(examples, session.tokenizer.pad_token_id)
    assert torch.equal(batch["kl_input_ids"], batch["input_ids"])
    train(session, progress=False)
    assert all(math.isfinite(r["loss"]) for r in step_records(out))


def test_kto_validation_never_makes_a_chunk_of_one_row():
    """3 validation rows in evaluation batches of 2 used to leave a lone row, which has no KL row:
    ValueError at the end of training. They are chunked so that every chunk has >= 2 rows."""
    tok = make_tiny_tokenizer()
    model = with_lora(make_tiny_llama(vocab_size=len(tok), initializer_range=0.2), "all-linear")
    rows = [("word good is", "positive", True), ("word bad is", "positive", False), ("fox", "neutral", True)]
    examples = [encode_unpaired(tok, user(p), assistant(c), d, max_seq_len=64) for p, c, d in rows]
    task = KTOTask()
    task.reference = AdapterOff()
    options = dict(pad_token_id=tok.pad_token_id, autocast_dtype=None)
    chunked = task.validation(model, examples, batch_size=2, **options)
    assert chunked == task.validation(model, examples, batch_size=3, **options)  # one chunk of 3
    assert chunked["val_kl"] > 0 and math.isfinite(chunked["val_loss"])


@pytest.mark.parametrize(
    "objective,extra", [("orpo", {"log_odds_ratio", "log_odds_chosen", "nll_loss"}), ("simpo", set())]
)
def test_orpo_and_simpo_train_and_log_trl_metrics(objective, extra, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / objective
    results = run_training(job_for(tiny_model_dir, data_dir, out, objective), progress=False)
    records = step_records(out)
    names = PAIR_METRICS | extra
    assert all(names <= set(r) for r in records)
    assert set(records[0]) - names <= LOOP_KEYS  # nothing else: the names TRL's trainers log
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] != records[0]["loss"]
    assert "preference_accuracy" in results["after"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# -- 8. config errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective,top,key",
    [
        ("dpo", {"task": "SEQ_CLS"}, "'task' is SEQ_CLS"),
        ("reward", {"task": "CAUSAL_LM"}, "'task' is CAUSAL_LM"),
        ("sft", {"preference": {"beta": 0.2}}, "section 'preference'"),
        ("kto", {"preference": {"reference": "precompute"}}, "'preference.reference' is precompute"),
        ("dpo", {"training": {"packing": True}}, "'training.packing' is true"),
    ],
)
def test_config_errors_name_the_key(objective, top, key, tiny_model_dir, data_dir, tmp_path):
    data = "kto" if objective == "kto" else "pairs"
    with pytest.raises(ConfigError) as caught:
        job_for(tiny_model_dir, data_dir, tmp_path / "out", objective, data=data, **top)
    assert key in str(caught.value)


def test_an_init_adapter_that_is_not_there_is_refused_before_the_model_loads(
    tiny_model_dir, data_dir, tmp_path, monkeypatch
):
    """A config may name the adapter another run writes (the shipped SFT -> DPO example), so
    the check runs when training starts, before any model loads."""
    import peftkit.models

    job = job_for(tiny_model_dir, data_dir, tmp_path / "out", "dpo", init_adapter=str(tmp_path))
    monkeypatch.setattr(
        peftkit.models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded")
    )
    with pytest.raises(
        PeftkitError, match=f"'init_adapter' is {re.escape(str(tmp_path))}, which has no adapter_config"
    ):
        run_training(job, progress=False)


def test_sft_continues_from_init_adapter(tiny_model_dir, data_dir, sft_adapter, tmp_path):
    """init_adapter for objective sft too: training starts from the saved adapter's weights (its
    first step's loss is that adapter's on the batch, below a new adapter's), and the adapter it
    saves keeps the saved adapter's method options."""
    out, fresh = tmp_path / "more-sft", tmp_path / "fresh-sft"
    job = job_for(tiny_model_dir, data_dir, out, "sft", data="sft", init_adapter=str(sft_adapter))
    session = setup_session(job)
    start = {k: v.detach().clone() for k, v in session.model.named_parameters() if v.requires_grad}
    saved = load_file(str(sft_adapter / "adapter_model.safetensors"))
    assert len(start) == len(saved) and all(
        any(torch.equal(v, w) for w in saved.values()) for v in start.values()
    )
    train(session, progress=False)
    run_training(job_for(tiny_model_dir, data_dir, fresh, "sft", data="sft"), progress=False)
    assert step_records(out)[0]["loss"] < step_records(fresh)[0]["loss"]
    saved_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved_config["r"] == json.loads((sft_adapter / "adapter_config.json").read_text())["r"]
