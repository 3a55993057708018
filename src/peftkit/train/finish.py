"""The end of a run and evaluation during it: save the adapter, held-out metrics, results, plot.

``run_on_model`` says where evaluation runs (every rank under FSDP, rank 0 otherwise), so the
loop and ``finish`` never ask which strategy trains.
"""

from __future__ import annotations

from typing import Any

from peftkit.data.splits import count_rows
from peftkit.io import write_json
from peftkit.precision import describe
from peftkit.tasks import save_task
from peftkit.train.fsdp import FullStateDict
from peftkit.train.held_out import evaluate_test, general_text
from peftkit.train.metrics import MetricsLog
from peftkit.train.output import ADAPTER_DIR, RESULTS_FILE, report


def say(message: str) -> None:
    from peftkit.train import loop  # its _quiet flag: one copy of each message under torchrun

    loop.say(message)


def run_on_model(session: Any, evaluate: Any) -> Any:
    """``evaluate(model)`` where evaluation runs: under FSDP on every rank, inside the sharded root
    module's forward (every rank takes part in gathering each layer, in lockstep: same inputs,
    same outputs); otherwise on rank 0 alone (``None`` elsewhere)."""
    if session.strategy == "fsdp":
        result = session.loss_module(run=evaluate)
        # FSDP keeps the root group gathered after a forward until the backward that never comes;
        # gathered, its parameters are plain tensors whose storage the next reshard frees.
        session.loss_module.reshard()
        return result
    return evaluate(session.model) if session.world.is_main else None


def finish(session: Any, metrics: MetricsLog) -> dict[str, Any]:
    """Save the adapter, evaluate on held-out data, and write the results and the plot (rank 0)."""
    job, world, model = session.job, session.world, session.model
    adapter_dir = session.output_dir / ADAPTER_DIR
    # Every rank reads the adapter's tensors whole (gathered under FSDP, so never partial); rank 0 writes.
    model.save_pretrained(
        adapter_dir, state_dict=FullStateDict(model.state_dict()), is_main_process=world.is_main
    )
    if world.is_main:
        session.tokenizer.save_pretrained(adapter_dir)
        save_task(session.task, adapter_dir)  # the task type and label names, for peftkit eval
    results = dict(session.results)
    results["adapter_dir"] = str(adapter_dir)
    results["steps"] = session.total_steps
    results["precision"] = describe(session.autocast_dtype)  # as `peftkit eval` reports it
    if session.data.validation:
        val = run_on_model(session, lambda _: validation_loss(session))
        if world.is_main:
            metrics.log({"step": session.total_steps, **val})
        results["validation"] = val
    if job.evaluation.accuracy_after and session.data.test:
        say(f"Evaluating the fine-tuned model on {count_rows(session.data.test)} held-out examples ...")
        results["after"] = run_on_model(
            session,
            lambda model: evaluate_test(
                job,
                session.task,
                model,
                session.tokenizer,
                session.data.test,
                session.autocast_dtype,
                "after",
                say=say,
                output_dir=session.output_dir if world.is_main else None,
            ),
        )
    if job.evaluation.general:
        general = run_on_model(
            session, lambda model: general_text(job, model, session.tokenizer, session.autocast_dtype)
        )
        if world.is_main:
            results["general"] = {**results.get("general", {}), "after": general}
    if not world.is_main:
        world.barrier()  # until rank 0 has written everything
        return {}
    write_json(session.output_dir / RESULTS_FILE, results)
    plot = metrics.plot()
    report(session.task, results, plot)
    world.barrier()
    return results


def validation_loss(session: Any) -> dict[str, float]:
    return session.task.validation(
        session.model,
        session.data.validation,
        batch_size=session.job.evaluation.batch_size,
        pad_token_id=session.tokenizer.pad_token_id,
        autocast_dtype=session.autocast_dtype,
    )
