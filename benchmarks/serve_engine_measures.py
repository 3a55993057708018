"""The in-process side of benchmarks/serve_throughput.py: the model loaded as `peftkit serve` loads
it, generate against the serve Engine at batch 1, and where a decode step's time goes (forward hooks
timing whole steps, torch.profiler's ops in buckets)."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
from serve_clients import ADAPTERS, MODELS, PROMPTS, percentiles, say

PROFILE_WARMUP = 3  # decode steps before the timed windows (allocator, thread pool)


# -- in process: generate vs the Engine, and the profile --------------------------------------------


def load_like_server(args: argparse.Namespace, adapter_dirs: dict[str, str]):
    """The model with every adapter, as ``peftkit serve`` loads it (its own CLI loader); returns
    (model, tokenizer, autocast dtype)."""
    from peftkit.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    argv = ["--base-model", args.model, "--precision", args.dtype, "--threads", str(args.threads)]
    for name, directory in adapter_dirs.items():
        argv += ["--adapter", f"{name}={directory}"]
    ns = parser.parse_args(argv)
    ns.command = "serve"
    model, tokenizer, _ = serve_cli.load_model_with_adapters(ns)
    return model, tokenizer, ns.autocast_dtype


def chat_ids(tokenizer: Any, prompt: int) -> list[int]:
    from peftkit.serve.app import _chat_ids  # the server's own encoding of a chat request

    return _chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[prompt]}])


def run_generate(
    model: Any, tokenizer: Any, ids: list[int], adapter: str, max_tokens: int, autocast, **kwargs: Any
) -> tuple:
    """One greedy generate call at batch 1: (seconds, new token ids up to and including eos).
    ``kwargs`` go to ``generate``."""
    from peftkit.evaluation import generate_token_ids
    from peftkit.serve.engine import BASE

    if adapter != BASE:
        model.set_adapter(adapter)
    scope = model.disable_adapter() if adapter == BASE else contextlib.nullcontext()
    with scope:
        start = time.perf_counter()
        (tokens,) = generate_token_ids(
            model,
            tokenizer,
            [ids],
            max_new_tokens=max_tokens,
            batch_size=1,
            autocast_dtype=autocast,
            progress=False,
            **kwargs,
        )
        return time.perf_counter() - start, tokens


def run_engine(engine: Any, ids: list[int], adapter: str, max_tokens: int) -> tuple:
    """One Sequence through a running Engine: (seconds, token ids, TTFT, per-token intervals)."""
    from peftkit.serve.sequence import SamplingParams, Sequence

    finished = threading.Event()
    arrivals: list[float] = []

    def sink(event: Any) -> None:  # called on the engine thread
        arrivals.append(time.perf_counter())
        if event.kind in ("done", "error"):
            finished.set()

    sequence = Sequence(
        prompt_ids=ids, adapter=adapter, params=SamplingParams(max_tokens=max_tokens), sink=sink
    )
    start = time.perf_counter()
    engine.submit([sequence])
    finished.wait()
    seconds = time.perf_counter() - start
    if sequence.finish_reason == "error":
        raise RuntimeError("the Engine failed a sequence (see its on_error output)")
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return seconds, list(sequence.output_ids), arrivals[0] - start, intervals


def new_engine(model: Any, tokenizer: Any, autocast: Any, rows: int) -> Any:
    from peftkit.serve.engine import Engine

    return Engine(model, tokenizer, max_batch_size=rows, max_queue=max(rows, 64), autocast_dtype=autocast)


def single_stream(args: argparse.Namespace, model: Any, tokenizer: Any, autocast: Any) -> dict[str, Any]:
    """generate vs the Engine at batch 1, in turns (the first mover alternating by rep)."""
    from peftkit.serve.engine import BASE

    paths = ["engine"] if args.skip_generate else ["generate", "engine"]
    configs = {"base": BASE, "lora": ADAPTERS[0]}
    prompts = {p: chat_ids(tokenizer, p) for p in range(args.single_prompts)}
    engine = new_engine(model, tokenizer, autocast, 1) if "engine" in paths else None
    if engine is not None:
        engine.start()
    seconds = {(p, c): [] for p in paths for c in configs}
    tokens = {(p, c): [] for p in paths for c in configs}
    latency: dict[str, list[float]] = {c: [] for c in configs}
    ttft: dict[str, list[float]] = {c: [] for c in configs}
    outputs: dict[tuple[str, str, int], list[int]] = {}
    try:
        for path in paths:  # warm-up, untimed
            for adapter in configs.values():
                if path == "generate":
                    run_generate(model, tokenizer, prompts[0], adapter, 4, autocast)
                else:
                    run_engine(engine, prompts[0], adapter, 4)
        for rep in range(args.repeats):
            order = paths[rep % len(paths) :] + paths[: rep % len(paths)]
            for config, adapter in configs.items():
                for p, ids in prompts.items():
                    for path in order:
                        if path == "generate":
                            s, out = run_generate(model, tokenizer, ids, adapter, args.max_tokens, autocast)
                        else:
                            # generate may have switched the model's adapter behind the Engine's back
                            # (the server never does): make it set its own (one walk, before the clock).
                            engine.set_model(model)
                            s, out, first, intervals = run_engine(engine, ids, adapter, args.max_tokens)
                            ttft[config].append(first)
                            latency[config].extend(intervals)
                        seconds[path, config].append(s)
                        tokens[path, config].append(len(out))
                        outputs[path, config, p] = out
            say(f"single stream rep {rep + 1}/{args.repeats} done")
    finally:
        if engine is not None:
            engine.stop()
    result: dict[str, Any] = {"prompts": len(prompts), "reps": args.repeats}
    for path in paths:
        every_s = sum(sum(seconds[path, c]) for c in configs)
        result[path] = {"all": {"tokens_per_s": sum(sum(tokens[path, c]) for c in configs) / every_s}}
        for config in configs:
            s, t = seconds[path, config], tokens[path, config]
            entry = {"tokens": sum(t), "seconds": sum(s), "tokens_per_s": sum(t) / sum(s)}
            # Paired by turn: the request just before or after it on the other path.
            if path == "engine" and "generate" in paths:
                ratios = [
                    (te / se) / (tg / sg)
                    for te, se, tg, sg in zip(t, s, tokens["generate", config], seconds["generate", config])
                ]
                entry["median_paired_ratio_to_generate"] = statistics.median(ratios)
                same = [outputs["engine", config, p] == outputs["generate", config, p] for p in prompts]
                entry["same_tokens_as_generate"] = sum(same) / len(same)
            if path == "engine":
                entry["ttft_s"] = percentiles(ttft[config])
                entry["token_latency_s"] = percentiles(latency[config])
            result[path][config] = entry
    if "generate" in paths:
        same = [outputs["generate", "base", p] == outputs["generate", "lora", p] for p in prompts]
        result["adapter_changes_answers"] = 1 - sum(same) / len(same)
    return result


class StepWindows:
    """Forward hooks counting the model's calls (call 1: the prefill, then one per decode step).
    After ``PROFILE_WARMUP`` decode steps it times ``steps`` steps (wall, the transformers model's
    forward, and ``outer``'s: the PEFT wrapper around it, which routes rows to adapters), then runs
    ``steps`` more under torch.profiler. Started and stopped inside the hook, so the windows are
    whole steps on whichever thread decodes."""

    def __init__(self, inner: Any, steps: int, outer: Any = None):
        self.steps = steps
        self.calls = 0
        self.marks: dict[str, float] = {}
        self.spent = {"inner": 0.0, "outer": 0.0}
        self.profiler = _profiler()
        self._started = {"inner": 0.0, "outer": 0.0}
        self._handles = [
            inner.register_forward_pre_hook(self._pre),
            inner.register_forward_hook(self._timer("inner", end=True)),
        ]
        if outer is not None and outer is not inner:
            self._handles += [
                outer.register_forward_pre_hook(self._timer("outer", end=False)),
                outer.register_forward_hook(self._timer("outer", end=True)),
            ]

    def _in_timed_window(self) -> bool:
        return "timed" in self.marks and "timed_end" not in self.marks

    def _pre(self, _module: Any, _args: Any) -> None:
        self.calls += 1
        first = 2 + PROFILE_WARMUP  # the first timed decode step
        if self.calls == first:
            self.marks["timed"] = time.perf_counter()
        elif self.calls == first + self.steps:
            self.marks["timed_end"] = time.perf_counter()
            self.profiler.start()
            self.marks["profiled"] = time.perf_counter()
        elif self.calls == first + 2 * self.steps:
            self.finish()
        self._started["inner"] = time.perf_counter()

    def _timer(self, which: str, *, end: bool):
        def hook(*_: Any) -> None:
            now = time.perf_counter()
            if not end:
                self._started[which] = now
            elif self._in_timed_window():  # a call whose end lies in the window: `steps` of them
                self.spent[which] += now - self._started[which]

        return hook

    def finish(self) -> None:
        if "profiled" in self.marks and "profiled_end" not in self.marks:
            self.marks["profiled_end"] = time.perf_counter()
            self.profiler.stop()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def result(self, rank: int) -> dict[str, Any]:
        if "profiled_end" not in self.marks:
            raise RuntimeError(f"the profiled run ended after {self.calls} forward calls, before its windows")
        step = (self.marks["timed_end"] - self.marks["timed"]) / self.steps
        inner, outer = self.spent["inner"] / self.steps, self.spent["outer"] / self.steps
        wrapper = max(0.0, outer - inner) if outer else 0.0
        profiled = self.marks["profiled_end"] - self.marks["profiled"]
        return {
            "ms_per_step": 1000 * step,
            "forward_ms_per_step": 1000 * inner,
            "wrapper_ms_per_step": 1000 * wrapper,
            "loop_ms_per_step": 1000 * (step - inner - wrapper),
            "profiled_ms_per_step": 1000 * profiled / self.steps,
            **op_shares(self.profiler, rank, profiled),
        }


def _profiler() -> Any:
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=True)


MM_OPS = ("aten::mm", "aten::addmm")
ATTENTION = "serve_throughput::attention"


def op_shares(prof: Any, rank: int, wall_s: float) -> dict[str, Any]:
    """Each event's self time in one bucket, by what it is and whether it runs inside attention."""
    buckets = {"weights_mm": 0.0, "lora_mm": 0.0, "attention": 0.0, "other_ops": 0.0}
    per_op: dict[str, float] = {}
    for event in prof.events():
        own = event.self_cpu_time_total / 1e6
        per_op[event.name] = per_op.get(event.name, 0.0) + own
        parent, inside = event, False
        while parent is not None:
            if parent.name == ATTENTION or "scaled_dot_product" in parent.name:
                inside = True
                break
            parent = parent.cpu_parent
        if inside:
            buckets["attention"] += own
        elif event.name in MM_OPS:
            shapes = event.input_shapes or []
            weight = shapes[-1] if shapes else []  # x @ W^T: the second operand (addmm: the last)
            buckets["lora_mm" if rank in (weight or []) else "weights_mm"] += own
        else:
            buckets["other_ops"] += own
    in_ops = sum(buckets.values())
    out = {f"{k}_pct": 100 * v / wall_s for k, v in buckets.items()}
    out["mm_pct"] = out["weights_mm_pct"] + out["lora_mm_pct"]
    out["outside_ops_pct"] = 100 * max(0.0, wall_s - in_ops) / wall_s
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    out["top_ops_ms_per_window"] = {name: round(1000 * s, 3) for name, s in top}
    return out


@contextlib.contextmanager
def attention_marked(inner: Any):
    """The model's eager attention function wrapped in a profiler label (its module's global,
    which the attention layers look up per call)."""
    import torch

    module = sys.modules.get(type(inner).__module__)
    original = getattr(module, "eager_attention_forward", None)
    if original is None:
        yield
        return

    def marked(*a: Any, **kw: Any) -> Any:
        with torch.profiler.record_function(ATTENTION):
            return original(*a, **kw)

    module.eager_attention_forward = marked
    try:
        yield
    finally:
        module.eager_attention_forward = original


def _release_when_done(finished: threading.Semaphore):
    def sink(event: Any) -> None:  # the engine thread
        if event.kind in ("done", "error"):
            finished.release()

    return sink


def profile_steps(args: argparse.Namespace, model: Any, tokenizer: Any, autocast: Any) -> dict[str, Any]:
    """The Engine's decode steps at each --profile-batches size, and generate's at batch 1."""
    from peftkit.serve.engine import BASE
    from peftkit.serve.sequence import SamplingParams, Sequence

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokens = 2 + PROFILE_WARMUP + 2 * args.profile_steps  # every window's steps, and one to spare
    out: dict[str, Any] = {}
    runs = []  # (name, each row's adapter): batch 1 with a1 and with the base; wider: mixed rows
    for batch in args.profile_batch_list:
        if batch == 1:
            runs += [("engine_b1_a1", [ADAPTERS[0]]), ("engine_b1_base", [BASE])]
        else:
            runs.append(
                (f"engine_b{batch}_mixed", [(BASE, *ADAPTERS)[i % len(MODELS)] for i in range(batch)])
            )
    with attention_marked(inner):
        for name, adapters in runs:
            engine = new_engine(model, tokenizer, autocast, len(adapters))
            engine.eos_ids = set()  # no row may end inside the windows: the batch keeps its size
            finished = threading.Semaphore(0)
            sink = _release_when_done(finished)
            params = SamplingParams(max_tokens=tokens)
            engine.submit(
                [
                    Sequence(prompt_ids=chat_ids(tokenizer, i), adapter=a, params=params, sink=sink)
                    for i, a in enumerate(adapters)
                ]
            )
            windows = StepWindows(inner, args.profile_steps, outer=model)
            # The Engine's own loop, run on this thread rather than its own: torch.profiler records
            # other threads only experimentally (profile_all_threads), and measured their small ops
            # several times slower than the same steps profiled here (same unprofiled ms/step).
            # Stopping before it runs makes the loop return once the queued rows are done.
            engine._stopping = True
            try:
                engine._run()
            finally:
                windows.remove()
            assert all(finished.acquire(blocking=False) for _ in adapters), "a profiled row did not finish"
            out[name] = {"batch": len(adapters), "adapters": adapters, **windows.result(args.r)}
            say(f"profiled {name}")
        if not args.skip_generate:
            for name, adapter in (("generate_b1_a1", ADAPTERS[0]), ("generate_b1_base", BASE)):
                windows = StepWindows(inner, args.profile_steps)
                try:
                    # eos masked (one small logits op per step), as the Engine's rows ignore it
                    run_generate(
                        model,
                        tokenizer,
                        chat_ids(tokenizer, 0),
                        adapter,
                        tokens,
                        autocast,
                        min_new_tokens=tokens,
                    )
                finally:
                    windows.finish()
                    windows.remove()
                out[name] = {"batch": 1, "adapters": [adapter], **windows.result(args.r)}
                say(f"profiled {name}")
    return out
