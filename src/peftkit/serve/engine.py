"""The decode loop behind ``peftkit serve``: continuous batching with one adapter per row.

One thread owns the model. Each turn of its loop, at a decode-step boundary::

    run queued commands (load / unload an adapter)
    drop rows whose client went away
    admit waiting sequences into free rows ── prefill them together ── first token ── join the batch
    one decode step for every row (each row its own adapter) ── next token ── finished rows leave

so a request that arrives while others decode joins them at the next step instead of waiting for
the batch to finish, and a finished one frees its row at once.

Adapters: LoRA rows of different adapters (and the base) share one forward pass (PEFT's
``adapter_names``, see ``methods/lora/mixed_batch.py``). Other methods, and DoRA, cannot mix: the
batch then holds one adapter's rows, and a waiting request for another adapter is admitted when
the batch has drained (first come, first served: the requests behind it wait too, so none starves).

The loop calls the model directly with a ``DynamicCache`` instead of ``generate``: the batch
changes between steps, and at batch 1 ``generate``'s per-token bookkeeping costs a measurable
part of a small model's step (benchmarks/serve_throughput.py). Greedy rows take the argmax, as
``generate`` does; sampled rows draw from their own generator (temperature, then top-p), so a
request's sample does not depend on what else is in the batch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.errors import ModelLoadError
from peftkit.serve.batch_cache import BatchCache, check_cache_layers, new_cache
from peftkit.serve.sequence import Sequence

BASE = "__base__"  # no adapter on this row (PEFT's name in adapter_names)


class QueueFull(Exception):
    """More sequences are waiting than ``max_queue`` allows; ``retry_after`` is a guess in seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} sequences are waiting already")
        self.retry_after = retry_after


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    generated_tokens: int = 0
    max_rows: int = 0


class Engine:
    """Owns ``model`` on a thread of its own; :meth:`submit` queues sequences for it."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int,
        max_queue: int,
        autocast_dtype: torch.dtype | None,
        on_error: Callable[[str], None] | None = None,
    ):
        from peftkit.evaluation import _eos_ids, _pad_id
        from peftkit.methods.tuner_base import acts_per_position

        if not acts_per_position(model):
            raise ModelLoadError(
                f"peftkit serve decodes with a KV cache shared across requests, which methods with virtual "
                f"tokens or past key/values of their own ({type(model.base_model).__name__}) do not fit; "
                "use `peftkit generate` / `chat` for this adapter"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        check_cache_layers(self.inner.config)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        self.eos_ids = set(_eos_ids(model, tokenizer, None))
        self.pad_id = _pad_id(tokenizer, None)
        self.on_error = on_error or (lambda message: None)
        self.stats = EngineStats()
        self._cache_keyword = _cache_keyword(self.inner)
        self._waiting: deque[Sequence] = deque()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._rows: list[Sequence] = []
        self._batch: BatchCache | None = None
        self._active: str | None = None  # the adapter (or BASE) set on the model; None: not known
        self._row_layers: list[Any] | None = None  # LoRA layers that split a batch by row
        self._mixable: dict[frozenset[str], bool] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="peftkit-serve-engine", daemon=True)

    # ---- called from other threads -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue a request's sequences (all or none); ``QueueFull`` if the queue has no room."""
        with self._wake:
            if self._stopping:
                raise QueueFull(len(self._waiting), retry_after=5)
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(len(self._waiting), retry_after=max(1, round(len(self._waiting) / 8)))
            self._waiting.extend(sequences)
            self._wake.notify()

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``function`` on the engine thread between two decode steps; its result as a future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._commands.append((function, future))
            self._wake.notify()
        return future

    def in_use(self, adapter: str) -> bool:
        """Whether a running or waiting sequence uses ``adapter`` (read from another thread: a hint)."""
        return any(s.adapter == adapter for s in [*list(self._rows), *list(self._waiting)])

    def load(self) -> dict[str, int]:
        """Rows decoding and sequences waiting now; the most rows one step has decoded so far."""
        return {
            "running": len(self._rows),
            "waiting": len(self._waiting),
            "peak_running": self.stats.max_rows,
        }

    def set_model(self, model: Any) -> None:
        """After loading or deleting an adapter (engine thread): the model to call from now on."""
        self.model = model
        self._active = None
        self._row_layers = None
        self._mixable = {}

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        from peftkit.evaluation import _contiguous_head_input, _inference

        with _inference(self.model, self.device, self.autocast_dtype), _contiguous_head_input(self.model):
            while True:
                with self._wake:
                    while not (self._rows or self._waiting or self._commands or self._stopping):
                        self._wake.wait()
                    if self._stopping and not (self._rows or self._waiting or self._commands):
                        return
                    commands = list(self._commands)
                    self._commands.clear()
                for function, future in commands:
                    _run_command(function, future)
                try:
                    self._drop_finished()
                    self._admit()
                    self._drop_finished()  # e.g. a first token that was already the end
                    if self._rows:
                        self._decode_step()
                        self._drop_finished()
                except Exception as err:  # noqa: BLE001 - a failed step fails its rows, not the server
                    self._fail_all(f"generation failed: {type(err).__name__}: {err}")

    def _admit(self) -> None:
        joining: list[Sequence] = []
        with self._wake:
            while self._waiting and len(self._rows) + len(joining) < self.max_batch_size:
                candidate = self._waiting[0]
                if candidate.cancelled.is_set():
                    self._waiting.popleft()
                    continue
                if not self._can_share([*self._rows, *joining], candidate.adapter):
                    break  # first come, first served: it waits for the batch to drain
                joining.append(self._waiting.popleft())
        if not joining:
            return
        input_ids, mask = _left_padded([s.prompt_ids for s in joining], self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = new_cache(self.inner.config)
        logits = self._forward(joining, input_ids, mask, positions, cache)
        self.stats.prefills += 1
        self._push(joining, logits)
        joined = BatchCache(cache, mask)
        if self._batch is None:
            self._batch = joined
        else:
            self._batch.join(joined)
        self._rows.extend(joining)
        # Rows of one adapter kept next to each other: each LoRA layer then takes them as a slice
        # (a view) instead of gathering and scattering them at every step.
        order = sorted(range(len(self._rows)), key=lambda i: self._rows[i].adapter)
        if order != list(range(len(self._rows))):
            self._rows = [self._rows[i] for i in order]
            self._batch.keep(order)
        self.stats.max_rows = max(self.stats.max_rows, len(self._rows))

    def _decode_step(self) -> None:
        assert self._batch is not None
        last = torch.tensor([[s.output_ids[-1]] for s in self._rows], device=self.device)
        positions = self._batch.positions()
        mask = self._batch.step_mask()
        logits = self._forward(self._rows, last, mask, positions, self._batch.cache)
        self.stats.steps += 1
        self._push(self._rows, logits)

    def _forward(
        self,
        rows: list[Sequence],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache,
    ) -> torch.Tensor:
        """The next-token logits ``(rows, vocab)`` in fp32, each row through its own adapter."""
        with self._route([s.adapter for s in rows]):
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_keyword: cache},
            )
        return out.logits[:, -1].float()

    def _route(self, names: list[str]) -> contextlib.AbstractContextManager:
        """Send each row to its adapter. Rows of one adapter (or all base rows): that adapter is set
        on the model and stays set while the next steps need it (switching walks every adapter
        layer: ~25 ms on SmolLM2, more than a step's arithmetic at batch 1). Rows of several LoRA
        adapters: each layer splits the batch by row (``methods/lora/mixed_batch.py``) for the
        call, with the list of those layers kept between steps (finding them is another walk)."""
        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        distinct = set(names)
        if len(distinct) > 1:
            from peftkit.methods.lora.mixed_batch import mixed_batch, row_adapter_layers

            inner = self.model.base_model.model
            if self._row_layers is None:
                self._row_layers = row_adapter_layers(inner)
            return mixed_batch(inner, names, expandable=False, layers=self._row_layers)
        (name,) = distinct
        if self._active != name:
            # The tuner's set_adapter only routes (PeftModel's would also make the weights trainable).
            self.model.base_model.set_adapter(None if name == BASE else name)
            self._active = name
        return contextlib.nullcontext()

    def _can_share(self, rows: list[Sequence], adapter: str) -> bool:
        """Whether ``adapter``'s rows may join ``rows`` in one batch (the method's verdict, kept per
        set of adapters until the model changes)."""
        names = frozenset({s.adapter for s in rows} | {adapter})
        if len(names) == 1:
            return True
        if names not in self._mixable:
            tuner = getattr(self.model, "base_model", None)
            self._mixable[names] = hasattr(tuner, "can_mix_in_one_batch") and tuner.can_mix_in_one_batch(
                sorted(names)
            )
        return self._mixable[names]

    def _push(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        tokens = _next_tokens(rows, logits)
        self.stats.generated_tokens += len(rows)
        for sequence, token in zip(rows, tokens):
            if not sequence.finished:
                sequence.push(token, self.tokenizer, self.eos_ids)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._rows) if not s.finished and not s.cancelled.is_set()]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.keep(keep)

    def _fail_all(self, message: str) -> None:
        self.on_error(message)
        for sequence in self._rows:
            if not sequence.finished:
                sequence.fail(message)
        self._rows = []
        self._batch = None


def _next_tokens(rows: list[Sequence], logits: torch.Tensor) -> list[int]:
    """Greedy rows: the argmax (the first of equal maxima, as ``generate``); sampled rows: a draw
    from the row's generator after temperature and top-p."""
    tokens = logits.argmax(-1).tolist()
    for i, sequence in enumerate(rows):
        params = sequence.params
        if params.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # the smallest set reaching top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[i] = int(torch.multinomial(probs, 1, generator=sequence.generator))
    return tokens


def _left_padded(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _cache_keyword(inner: Any) -> str:
    from peftkit.transformers_compat import CACHE_KEYWORDS, cache_keyword

    return cache_keyword(inner) or CACHE_KEYWORDS[-1]


def _run_command(function: Callable[[], Any], future: concurrent.futures.Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(function())
    except BaseException as err:  # noqa: BLE001 - handed to the caller
        future.set_exception(err)
