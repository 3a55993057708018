"""benchmarks/loss_parity.py on a tiny random Llama: peftkit, transformers Trainer + PEFT and TRL
SFTTrainer, fed the same batches from the same initial adapter with matched settings, must train
step for step alike (the real parity check), and the check must notice a setting that differs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "loss_parity.py"


def run(tmp_path: Path, name: str, *extra: str) -> dict:
    bench = load_benchmark(SCRIPT)
    out = tmp_path / f"{name}.json"
    threads = torch.get_num_threads()
    try:
        bench.main(
            ["--tiny", "--steps", "3", "--seeds", "0", "--precision", "fp32", "--out", str(out), *extra]
        )
    finally:
        torch.set_num_threads(threads)  # peftkit's setup may pick fewer threads under load
    return json.loads(out.read_text())


def test_identical_batches_give_identical_training(tmp_path, capsys):
    results = run(tmp_path, "matched")
    runs = {r["framework"]: r for r in results["runs"]}
    assert set(runs) == {"peftkit", "trainer", "sft"}
    pk = runs["peftkit"]
    assert len(pk["step_hashes"]) == 3 and len(set(pk["step_hashes"])) == 3
    for name, r in runs.items():
        assert r["batches_match"], name
        assert r["step_hashes"] == pk["step_hashes"], name  # the very batches, in the same order
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["lrs"] == pk["lrs"], name  # peftkit's schedule, to the last bit
        if name != "peftkit":
            # same init, batches, optimizer, schedule and clipping: the same training to float noise
            assert max(abs(a - b) for a, b in zip(r["losses"], pk["losses"])) < 1e-4, name
            assert (
                max(abs(a - b) for a, b in zip(r["grad_norms"], pk["grad_norms"]))
                < 1e-3 * pk["grad_norms"][0]
            )
            assert abs(r["heldout_loss"] - pk["heldout_loss"]) < 1e-4, name
    # the shared scoring function and peftkit's own validation loss measure the same thing
    assert abs(pk["heldout_loss"] - pk["own_val_loss"]) < 1e-4
    assert pk["losses"][-1] < pk["losses"][0]  # it learns at all
    table = capsys.readouterr().out
    assert "| fp32 | 3 | trainer |" in table and "held-out loss" in table


def test_a_different_setting_is_caught(tmp_path):
    """The Trainer's own warm-up (ceil(0.05 * 3) = 1 step at lr 0) vs peftkit's (none): step 1 is
    the same forward from the same weights, the later steps are not."""
    results = run(tmp_path, "own", "--frameworks", "peftkit", "trainer", "--schedule", "own", "--no-accuracy")
    runs = {r["framework"]: r for r in results["runs"]}
    pk, tr = runs["peftkit"], runs["trainer"]
    assert tr["step_hashes"] == pk["step_hashes"]
    assert tr["lrs"][0] == 0.0 and pk["lrs"][0] == 1e-3
    assert abs(tr["losses"][0] - pk["losses"][0]) < 1e-4
    assert tr["max_step_loss_diff"] > 1e-3


def test_an_interrupted_benchmark_resumes(tmp_path):
    """Results are written after every cell; --resume keeps the finished cells and runs the rest,
    and refuses a file made with other settings (its cells would not be comparable)."""
    fast = ("--frameworks", "peftkit", "trainer", "--no-accuracy")
    first = run(tmp_path, "resume", *fast)
    assert first["complete"] and {r["seed"] for r in first["runs"]} == {0}
    bench = load_benchmark(SCRIPT)
    out = tmp_path / "resume.json"
    threads = torch.get_num_threads()
    try:
        both = bench.main(
            [
                "--tiny",
                "--steps",
                "3",
                "--seeds",
                "0",
                "1",
                "--precision",
                "fp32",
                "--out",
                str(out),
                "--resume",
                *fast,
            ]
        )
        kept = [r for r in both["runs"] if r["seed"] == 0]
        assert kept == first["runs"]  # not rerun
        assert {r["seed"] for r in both["runs"]} == {0, 1} and len(both["table"]) == 2
        with pytest.raises(SystemExit, match="schedule"):
            bench.main(
                [
                    "--tiny",
                    "--steps",
                    "3",
                    "--seeds",
                    "0",
                    "--precision",
                    "fp32",
                    "--out",
                    str(out),
                    "--resume",
                    "--schedule",
                    "own",
                    *fast,
                ]
            )
    finally:
        torch.set_num_threads(threads)


def test_standalone_init_is_peftkits(tmp_path):
    """Without peftkit in the run (--frameworks trainer), the Trainers start from the adapter
    peftkit's setup would have built: same seed, config and model."""
    from peftkit.train.loop import setup

    bench = load_benchmark(SCRIPT)
    args = bench.parse_args(["--tiny"])
    args.tiny_sets = bench.make_tiny(tmp_path)
    job = bench.build_job(args, seed=3, steps=2, precision="fp32", output_dir=str(tmp_path / "run"))
    threads = torch.get_num_threads()
    try:
        session = setup(job, overwrite=True)
    finally:
        torch.set_num_threads(threads)
    expected = bench.lora_state(session.model)
    got = bench.peftkit_init(job)
    assert set(got) == set(expected) and len(got) == 2 * 2 * 7  # A and B of 7 linear layers x 2 layers
    assert all(torch.equal(got[k], expected[k]) for k in got)
