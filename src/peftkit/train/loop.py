"""The training loop, top to bottom.

``setup`` builds everything in dependency order (process group and device -> output dir, which
rank 0 prepares -> seeds -> task, whose label set sizes a classifier head -> model and tokenizer
-> data, which needs the tokenizer -> adapter, which needs the model -> the loss module, wrapped
in DDP or sharded by FSDP under torchrun -> optimizer, which needs the (sharded) trainable
parameters -> scheduler -> resume state, which needs all of them).
``train`` is one explicit loop: this rank's share of each micro-batch, accumulation normalised
by what the loss averages over on all ranks, clipping, optimizer and scheduler steps, logging,
evaluation and checkpoints (rank 0 writes; see ``train/distributed.py`` and ``train/fsdp.py``).
What depends on the task type (head, data encoding, batching, loss, metrics) is a hook of the
job's :class:`peftkit.tasks.Task`; this module never asks which task it is.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from peftkit.data.splits import count_rows
from peftkit.errors import PeftkitError
from peftkit.io import atomic_file, write_json
from peftkit.precision import describe, resolve_autocast
from peftkit.seeding import seed_everything
from peftkit.tasks import Task, get_task
from peftkit.threads import StepTimeWatch, choose_threads
from peftkit.train.adapter_start import attach_adapter, check_init_adapter
from peftkit.train.batching import MicroBatchStream
from peftkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from peftkit.train.compile import CompiledLayers
from peftkit.train.config import TrainJobConfig
from peftkit.train.distributed import World, choose_strategy, data_parallel, no_sync
from peftkit.train.finish import finish, run_on_model, validation_loss
from peftkit.train.fsdp import full
from peftkit.train.held_out import evaluate_test, general_text
from peftkit.train.metrics import MetricsLog
from peftkit.train.output import (
    CONFIG_FILE,
    RESULTS_FILE,
    claim_output_dir,
    prepare_output_dir,
    read_results,
    recorded_base,
    replace_previous_run,
)
from peftkit.train.packing import check_isolation
from peftkit.train.precision import split_precision, store_in_dtype
from peftkit.train.reporting import check_reporters
from peftkit.train.schedule import build_scheduler, total_optimizer_steps
from peftkit.train.shared_prefix import shared_prefix_for
from peftkit.train.tokens import add_tokens, check_tokens_for_method, with_new_tokens

_quiet = False  # set on every rank but 0 of a distributed run: one copy of each message


def say(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


@dataclass
class TrainSession:
    """Everything ``setup`` built; ``train`` only reads these."""

    job: TrainJobConfig
    output_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    model: Any
    tokenizer: Any
    data: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: MicroBatchStream
    total_steps: int
    task: Task = field(default_factory=lambda: get_task(None))
    world: World = field(default_factory=World)
    loss_module: Any = None  # the task's loss as a module (DDP-wrapped or FSDP-sharded), set by setup
    strategy: str = "none"  # none (one process), ddp or fsdp
    compiled: Any = field(default_factory=nullcontext)  # CompiledLayers under training.compile
    start_step: int = 0
    tokens_seen: int = 0
    results: dict[str, Any] = field(default_factory=dict)


def autocast(session: TrainSession):
    if session.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(session.device.type, dtype=session.autocast_dtype)


def setup(job: TrainJobConfig, *, resume: bool = False, overwrite: bool = False) -> TrainSession:
    from peftkit.data import build_datasets, check_sources
    from peftkit.models import default_attention, load_model_and_tokenizer, resolve_device

    t = job.training
    setup_started = time.time()
    task = get_task(job.task, job.objective, job.preference, job)
    check_tokens_for_method(job.tokens, job.method, job.method_config)
    check_sources(job.data, ("train",), task=task)  # before any model loads
    check_init_adapter(job)
    check_reporters(job.logging, job.output_dir)  # e.g. tensorboard not installed
    recorded_config = job.to_yaml_dict()  # what train_config.yaml holds; --resume compares with it
    world = World.from_environment()  # torchrun's processes, or rank 0 of 1
    if t.compile and world.distributed:
        raise PeftkitError(
            "training.compile runs in one process only for now: set training.compile to false under torchrun"
        )
    global _quiet
    _quiet = not world.is_main
    choose_threads(t.num_threads, key="training.num_threads", note=say)
    device = world.start(resolve_device(t.device), t.collective_timeout_minutes)
    output_dir = Path(job.output_dir)
    if world.is_main:
        checkpoint = prepare_output_dir(
            output_dir, resume=resume, overwrite=overwrite, config=recorded_config
        )
    world.barrier()  # the other ranks read the directory only once rank 0 has prepared it
    if not world.is_main:
        checkpoint = latest_checkpoint(output_dir) if resume else None
    seed_everything(t.seed)  # the same on every rank: identical adapter initialisation
    autocast_dtype = resolve_autocast(t.precision, device, note=say)
    say(f"precision: {describe(autocast_dtype)}")
    task.prepare(job.data)  # e.g. the label set, which sizes the classification head

    attention = t.attention if t.attention != "auto" else default_attention(device)
    quantized = job.quantization is not None
    load_options: dict[str, Any] = {}
    if quantized:
        # bitsandbytes quantizes while loading, on the device the weights go to; `compute_dtype:
        # auto` follows the training precision.
        load_options["quantization"] = job.quantization.to_bnb_config(autocast_dtype)
        load_options["device_map"] = {"": str(device)}
    model, tokenizer = load_model_and_tokenizer(
        job.base_model,
        trust_remote_code=job.trust_remote_code,
        attn_implementation=attention,
        task=task.loader_task,
        **task.model_kwargs(),
        **load_options,
    )
    new_token_ids = add_tokens(job.tokens, model, tokenizer)  # before tokenizing the data
    data = build_datasets(job.data, tokenizer, seed=t.seed, task=task)
    say(data.summary())
    # With bf16 autocast the frozen weights are stored in bf16 from the start (see precision.py);
    # adapters are created in fp32 whatever the base dtype.
    # A quantized model is already on its device and refuses .to(dtype): only its floating-point
    # weights (norms, embeddings, LM head) are stored in bf16, the packed 4/8-bit ones stay as they are.
    if not quantized:
        model.to(device)
    if autocast_dtype is not None:
        store_in_dtype(model, autocast_dtype)

    previous = read_results(output_dir) if checkpoint is not None else {}
    results: dict[str, Any] = {"before": previous.get("before")} if previous.get("before") else {}
    if job.init_adapter is None:  # else "before" is the starting adapter's, measured once it is loaded
        evaluate_before(
            job, task, model, tokenizer, data, autocast_dtype, previous, results, world, output_dir
        )

    torch.manual_seed(t.seed)  # adapter init does not depend on what evaluation consumed
    # The adapter records the name the job used (a built-in alias stays portable, unlike its
    # cache path), and what it was trained for, so AutoPeftModel-style loaders can rebuild it.
    method_config = dataclasses.replace(
        job.method_config,
        base_model_name_or_path=job.method_config.base_model_name_or_path or recorded_base(job.base_model),
        task_type=job.task,  # build_job_config checked the method section agrees
    )
    method_config = with_new_tokens(job.tokens, method_config, model, new_token_ids)
    model = attach_adapter(job, model, method_config)
    if autocast_dtype is not None:
        split_precision(model, autocast_dtype)
    if not quantized:
        model.to(device)
    if job.init_adapter is not None:
        say(f"Starting from the adapter in {job.init_adapter}")
        evaluate_before(
            job, task, model, tokenizer, data, autocast_dtype, previous, results, world, output_dir
        )
    reference = task.start_reference(
        model,
        init_adapter=job.init_adapter,
        data=data,
        run_dir=output_dir,
        world=world,
        autocast_dtype=autocast_dtype,
        batch_size=job.evaluation.batch_size,
        pad_token_id=tokenizer.pad_token_id,
        resume=checkpoint is not None,
        tokenizer=tokenizer,
        seed=t.seed,
    )
    if reference:
        say(f"reference model: {reference}")
    if t.packing:
        check_isolation(model, device)  # an architecture that ignores position_ids would mix examples
    model.train()
    strategy = choose_strategy(job.distributed, world, model, quantized=quantized)
    if strategy == "fsdp" and not task.supports_fsdp:
        raise PeftkitError(
            f"objective {job.objective} is not supported with sharded parameters (FSDP, which "
            "distributed: auto picks for full fine-tuning) yet: set distributed: ddp"
        )
    if world.distributed:
        say(f"Training in {world.size} processes with {strategy.upper()}")
    compiled = CompiledLayers(model) if t.compile else nullcontext()
    task.use_shared_prefix(shared_prefix_for(t, strategy, model, say))
    # FSDP replaces the parameters with sharded ones: the optimizer must be built on those.
    loss_module = data_parallel(model, task, world, device, strategy)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PeftkitError(f"method '{job.method}' left no trainable parameters: check its target modules")
    optimizer = torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        # One kernel for all tensors instead of ~10 ops per tensor: 40 -> 8.5 ms per step for
        # LoRA on SmolLM2-135M's 420 adapter tensors (2-core CPU, measured); same update rule.
        fused=device.type in ("cpu", "cuda"),
    )
    # Global micro-batches of batch_size examples per rank, in the single-process order (see
    # train/distributed.py): each rank trains on its share.
    stream = MicroBatchStream(
        data.train, t.batch_size * world.size, seed=t.seed, group_by_length=t.group_by_length
    )
    total_steps = total_optimizer_steps(job, stream.batches_per_epoch)
    model.base_model.on_train_start(total_steps)  # e.g. AdaLoRA's rank-budget schedule
    scheduler = build_scheduler(optimizer, t, total_steps)

    session = TrainSession(
        job,
        output_dir,
        device,
        autocast_dtype,
        model,
        tokenizer,
        data,
        optimizer,
        scheduler,
        stream,
        total_steps,
        task,
        world=world,
        loss_module=loss_module,
        strategy=strategy,
        compiled=compiled,
        results=results,
    )
    if checkpoint is not None:
        state = load_checkpoint(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, rank=world.rank
        )
        session.start_step, session.tokens_seen = state.step, state.tokens_seen
        if not t.num_threads and state.num_threads and state.num_threads != torch.get_num_threads():
            torch.set_num_threads(state.num_threads)  # exact resume: the threads the run started with
        say(f"Resumed from {checkpoint} (step {state.step} of {total_steps})")
    if world.is_main:
        if overwrite:  # only now: a run that fails to start keeps the old one
            replace_previous_run(output_dir, keep=written_by_setup(output_dir, setup_started))
        with atomic_file(output_dir / CONFIG_FILE, "w") as handle:
            yaml.safe_dump(recorded_config, handle, sort_keys=False)
    return session


def written_by_setup(output_dir: Path, since: float) -> set[str]:
    """Names of the files in ``output_dir`` this run's setup wrote (modified since ``since``)."""
    return {p.name for p in output_dir.iterdir() if p.is_file() and p.stat().st_mtime >= since}


def evaluate_before(
    job: TrainJobConfig,
    task: Task,
    model: Any,
    tokenizer: Any,
    data: Any,
    autocast_dtype: torch.dtype | None,
    previous: dict[str, Any],
    results: dict[str, Any],
    world: World,
    output_dir: Path,
) -> None:
    """The held-out metrics (and general-text perplexity) of the model training starts from: the
    base, or init_adapter's; kept from the first start of a resumed run."""
    if job.evaluation.accuracy_before and not results.get("before") and data.test and world.is_main:
        say(f"Evaluating the starting model on {count_rows(data.test)} held-out examples ...")
        results["before"] = evaluate_test(
            job, task, model, tokenizer, data.test, autocast_dtype, "before", say=say, output_dir=output_dir
        )
    if job.evaluation.general and world.is_main:  # forgetting: the starting model's general-text perplexity
        results["general"] = previous.get("general") or {
            "before": general_text(job, model, tokenizer, autocast_dtype)
        }
    world.barrier()


def train(
    session: TrainSession, *, stop_after_step: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the optimisation; ``stop_after_step`` simulates an interruption (for tests). The metrics
    log's reporters (``logging.report_to``) are closed however it ends."""
    with MetricsLog(
        session.output_dir,
        resume_step=session.start_step,
        enabled=session.world.is_main,  # rank 0 writes
        reporting=session.job.logging,
    ) as metrics:
        return _run_steps(session, metrics, stop_after_step=stop_after_step, progress=progress)


def _run_steps(
    session: TrainSession, metrics: MetricsLog, *, stop_after_step: int | None, progress: bool
) -> dict[str, Any]:
    t = session.job.training
    task, world = session.task, session.world
    model, optimizer, scheduler = session.model, session.optimizer, session.scheduler
    loss_module = session.loss_module or data_parallel(model, task, world, session.device, session.strategy)
    pad_id = session.tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    accum = t.gradient_accumulation_steps
    collate = task.collate
    if t.packing:  # several examples per row, up to max_seq_len tokens (train/packing.py)
        collate = functools.partial(task.pack, capacity=session.job.data.max_seq_len)

    bar = tqdm(
        total=session.total_steps,
        initial=session.start_step,
        disable=not progress or not world.is_main,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    model.train()
    watch = StepTimeWatch(note=say)
    for step in range(session.start_step + 1, session.total_steps + 1):
        started = time.perf_counter()
        # This rank's share of each global micro-batch (all of it in a single process).
        shards = [world.shard(session.stream.get((step - 1) * accum + i)) for i in range(accum)]
        # The objective's sampling phase, if it has one (online_dpo, grpo: prompts -> judged answers).
        shards = task.sample_step(
            model, shards, step=step, world=world, global_batch_size=session.stream.batch_size
        )
        batches = [collate(examples, pad_id) for examples, _ in shards]
        weights = [1.0 if real else 0.0 for _, real in shards]
        # Normalise by what the loss averages over (label tokens, or examples for classifiers) in
        # the whole optimizer step on all ranks, not per micro-batch, so every unit weighs the
        # same whatever the batch boundaries; DDP averages gradients over ranks, hence x size.
        local_count = sum(task.count(b) for b, w in zip(batches, weights) if w)
        step_label_tokens = max(1, int(world.sum([local_count], session.device)[0]))
        step_loss = 0.0
        step_tokens = 0
        for i, batch in enumerate(batches):
            batch = {k: v.to(session.device) for k, v in batch.items()}
            with no_sync(loss_module, last=i == len(batches) - 1):  # one all-reduce per step
                with autocast(session), session.compiled:  # the backward runs what the forward compiled
                    loss_sum, _ = loss_module(batch)
                (loss_sum * (weights[i] * world.size) / step_label_tokens).backward()
            step_loss += weights[i] * loss_sum.item()
            step_tokens += int(weights[i]) * int(batch["attention_mask"].sum())
        step_loss, step_tokens = world.sum([step_loss, step_tokens], session.device)
        step_tokens = int(step_tokens)
        regularization = model.base_model.regularization_loss()  # e.g. AdaLoRA's orthogonality term
        if regularization is not None:
            regularization.backward()
        grad_norm = None
        if t.max_grad_norm is not None:
            grad_norm = float(full(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        model.base_model.on_optimizer_step(step)  # e.g. AdaLoRA's rank allocation, which reads the grads
        optimizer.zero_grad(set_to_none=True)
        objective_metrics = task.step_metrics(world, session.device)  # e.g. DPO's rewards/margins

        elapsed = time.perf_counter() - started
        watch.observe(step, elapsed)
        session.tokens_seen += step_tokens
        loss = step_loss / step_label_tokens
        if not math.isfinite(loss):
            raise PeftkitError(
                f"loss became {loss} at step {step}: lower training.learning_rate or check the data"
            )
        shown = {
            k.split("/")[-1]: f"{objective_metrics[k]:.3f}"
            for k in task.progress_metrics
            if k in objective_metrics
        }
        bar.set_postfix(
            loss=f"{loss:.4f}", **shown, lr=f"{lr:.2e}", tok_s=f"{step_tokens / elapsed:.0f}", refresh=False
        )
        bar.update(1)
        if step % t.log_every == 0 or step == session.total_steps:
            epoch, _ = session.stream.position(step * accum - 1)
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "tokens_per_s": step_tokens / elapsed,
                "tokens_seen": session.tokens_seen,
                "step_time_s": elapsed,
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            metrics.log({**record, **objective_metrics})
        if (
            t.eval_every
            and step % t.eval_every == 0
            and step != session.total_steps
            and session.data.validation
        ):
            val = run_on_model(session, lambda _: validation_loss(session))
            if world.is_main:
                metrics.log({"step": step, **val})
            model.train()
            world.barrier()
        if t.save_every and step % t.save_every == 0 and step != session.total_steps:
            # Every rank: under FSDP the tensors are gathered from all of them. Rank 0 writes.
            save_checkpoint(
                session.output_dir,
                step=step,
                tokens_seen=session.tokens_seen,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                keep=t.keep_checkpoints,
                world=world,
            )
            if world.is_main:
                metrics.plot(force=False)
            world.barrier()
        if stop_after_step is not None and step >= stop_after_step:
            bar.close()
            return {"interrupted_at": step}
    bar.close()
    return finish(session, metrics)


def run_training(
    job: TrainJobConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    # Rank 0 holds output_dir from before anything loads until the run ends (train/run_lock.py).
    with claim_output_dir(Path(job.output_dir), World.from_environment()):
        session = setup(job, resume=resume, overwrite=overwrite)
        try:
            before_only = session.results.get("before") and not (session.output_dir / RESULTS_FILE).exists()
            if before_only and session.world.is_main:
                write_json(session.output_dir / RESULTS_FILE, session.results)
            results = train(session, stop_after_step=stop_after_step, progress=progress)
        except BaseException:
            leave_process_group(session, failed=True)
            raise
        leave_process_group(session)
    return results


def leave_process_group(session: TrainSession, *, failed: bool = False) -> None:
    """Drop the DDP wrapper, then leave the process group. DDP's C++ reducer holds the group. Were
    it the last holder, the group's destructor would run under the GIL and wait for gloo's
    threads, which may still need the GIL to free a finished collective: a hang at exit
    (pytorch#56297; one rank hung in about 1 of 70 two-process runs here). Python's own reference
    to the group releases the GIL before destroying it."""
    session.loss_module = None
    if session.world.distributed:
        gc.collect()  # in case the wrapper is in a reference cycle
    session.world.stop(failed=failed)
