"""What benchmarks/grpo_throughput.py builds and measures: the arithmetic prompts, the ONE reward
function both frameworks are given, the per-step record of each phase (generation, scoring,
reference pass) and the timing window. Shared by its workers."""

from __future__ import annotations

import hashlib
import random
import re
import time
from typing import Any

# Helpers next to this script (benchmarks/ is on sys.path when it runs).
from preference_measures import fmt, footer_lines, median

FRAMEWORKS = {
    "trl": "TRL GRPOTrainer + PEFT LoRA",
    "peftkit": "peftkit train, objective: grpo",
}
BAR = 2.0  # TRL's step time / peftkit's: at least 2x
OPERATIONS = (("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b))


# -- data and reward ----------------------------------------------------------------------------------


def arithmetic_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` seeded arithmetic problems: a chat prompt (one user message) and the expected number
    (a column, which both frameworks pass to the reward function as ``answer``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        symbol, op = OPERATIONS[rng.randrange(len(OPERATIONS))]
        a, b = (
            (rng.randint(2, 12), rng.randint(2, 12))
            if symbol == "*"
            else (rng.randint(10, 99), rng.randint(10, 99))
        )
        question = f"What is {a} {symbol} {b}? Answer with the number only."
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(op(a, b))})
    return rows


_NUMBER = re.compile(r"-?\d+")


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or a list of messages (chat prompts) whose last one is the answer."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def arithmetic_reward(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the answer's first integer is the expected number, plus 0.1 when the answer
    contains any digit (so that most groups have some spread); deterministic, the same for both
    frameworks (TRL's and peftkit's reward-function signature)."""
    out = []
    for completion, expected in zip(completions, answer):
        text = completion_text(completion)
        found = _NUMBER.search(text)
        score = 1.0 if found is not None and found.group() == str(expected) else 0.0
        out.append(score + (0.1 if found is not None else 0.0))
    return out


# -- per-step records -----------------------------------------------------------------------------------


class StepLog:
    """What each optimizer step did, phase by phase. Wrappers add to the open step (``add``,
    ``timed``); the step clock closes it (``close``) after each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.open: dict[str, Any] = {}
        self.generating = False

    def add(self, key: str, value: float) -> None:
        self.open[key] = self.open.get(key, 0) + value

    def note(self, key: str, value: Any) -> None:
        self.open.setdefault(key, value)

    def timed(self, key: str, fn: Any, *, generation: bool = False) -> Any:
        """``fn`` wrapped: its seconds added to ``key`` of the open step."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            self.generating = generation or self.generating
            try:
                return fn(*args, **kwargs)
            finally:
                if generation:
                    self.generating = False
                self.add(key, time.perf_counter() - started)

        return wrapper

    def close(self) -> None:
        self.steps.append(self.open)
        self.open = {}

    def watch_logits(self, head: Any) -> None:
        """Record the output layer's output dtype during generation (does it run in bf16?)."""

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if self.generating:
                self.note("generation_logits_dtype", str(output.dtype).removeprefix("torch."))

        head.register_forward_hook(hook)


def prompts_digest(prompt_ids: list[list[int]]) -> str:
    h = hashlib.sha256()
    for ids in prompt_ids:
        h.update((",".join(map(str, ids)) + ";").encode())
    return h.hexdigest()[:16]


PHASES = ("generate_s", "score_s", "reference_s")


def timing_summary(stamps: list[float], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps 2..N: the window from the end of step 1 (warm-up) to the end of step N; each phase's
    seconds and each count summed over the same steps."""
    assert len(stamps) == len(steps), f"{len(stamps)} steps timed, {len(steps)} recorded"
    seconds = stamps[-1] - stamps[0]
    timed = steps[1:]
    total = {k: sum(s.get(k, 0) for s in timed) for k in (*PHASES, "generate_only_s")}
    counts = {
        k: sum(s.get(k, 0) for s in timed) for k in ("completions", "completion_tokens", "trained_tokens")
    }
    n = len(timed)
    out: dict[str, Any] = {
        "steps": len(stamps),
        "timed_steps": n,
        "timed_s": seconds,
        "step_time_s": seconds / n,
        "step_times_s": [b - a for a, b in zip(stamps, stamps[1:])],
        **{f"{k.removesuffix('_s')}_s_per_step": v / n for k, v in total.items()},
        "train_s_per_step": (seconds - sum(total[k] for k in PHASES)) / n,
        "generation_share": total["generate_s"] / seconds,
        "completions_timed": counts["completions"],
        "completion_tokens_timed": counts["completion_tokens"],
        "trained_tokens_timed": counts["trained_tokens"],
        "mean_completion_length": counts["completion_tokens"] / max(1, counts["completions"]),
        "completion_tokens_per_s": counts["completion_tokens"] / seconds,
        "trained_tokens_per_s": counts["trained_tokens"] / seconds,
        "generate_ms_per_completion_token": 1000 * total["generate_s"] / max(1, counts["completion_tokens"]),
        "step_ms_per_completion_token": 1000 * seconds / max(1, counts["completion_tokens"]),
        # the rest of a step (training forward + backward + optimizer) per trained (prompt + answer) token
        "train_ms_per_trained_token": 1000
        * (seconds - sum(total[k] for k in PHASES))
        / max(1, counts["trained_tokens"]),
        "per_step": steps,
    }
    return out


# -- report ------------------------------------------------------------------------------------------------

RATIOS = {  # name: (key, True where TRL / peftkit is the speedup, False where peftkit / TRL is)
    "step_time_speedup": ("step_time_s", True),
    "generate_speedup": ("generate_s_per_step", True),
    "reference_speedup": ("reference_s_per_step", True),
    "train_speedup": ("train_s_per_step", True),
    "completion_tokens_per_s": ("completion_tokens_per_s", False),
    "generate_ms_per_token_speedup": ("generate_ms_per_completion_token", True),
    "step_ms_per_token_speedup": ("step_ms_per_completion_token", True),
    "train_ms_per_trained_token_speedup": ("train_ms_per_trained_token", True),
    "peak_rss": ("peak_rss_mb", False),
}


def round_ratios(r: dict[str, Any]) -> dict[str, float]:
    """peftkit against TRL in one round: every ratio > 1 favours peftkit except peak RSS."""
    out = {}
    for name, (key, trl_over_peftkit) in RATIOS.items():
        t, p = r["trl"].get(key), r["peftkit"].get(key)
        if t and p:
            out[name] = t / p if trl_over_peftkit else p / t
    return out


SUMMARY_KEYS = (
    "step_time_s",
    "generate_s_per_step",
    "generate_only_s_per_step",
    "score_s_per_step",
    "reference_s_per_step",
    "train_s_per_step",
    "generation_share",
    "mean_completion_length",
    "completion_tokens_per_s",
    "trained_tokens_per_s",
    "generate_ms_per_completion_token",
    "step_ms_per_completion_token",
    "train_ms_per_trained_token",
    "peak_rss_mb",
    "mean_reward",
)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    frameworks = {
        name: {k: median([r[name].get(k) for r in rounds]) for k in SUMMARY_KEYS} for name in FRAMEWORKS
    }
    ratios = {}
    for name in RATIOS:
        per_round = [r["ratios"][name] for r in rounds if name in r["ratios"]]
        if per_round:
            ratios[name] = {"median": median(per_round), "min": min(per_round), "max": max(per_round)}
    speedup = ratios.get("step_time_speedup", {}).get("median")
    per_token = ratios.get("step_ms_per_token_speedup", {}).get("median")
    bar = {
        "step_time_at_least_2x": speedup is not None and speedup >= BAR,
        "step_time_per_completion_token_at_least_2x": per_token is not None and per_token >= BAR,
    }
    bar["met"] = all(bar.values())
    return {"frameworks": frameworks, "ratios_trl_over_peftkit": ratios, "bar": bar}


def table(results: dict[str, Any]) -> str:
    s, r = results["summary"]["frameworks"], results["summary"]["ratios_trl_over_peftkit"]

    def ratio(name: str) -> str:
        x = r.get(name)
        return "" if x is None else f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})"

    lines = [
        "| framework | s/step | generation s/step (share) | reference s/step | train s/step "
        "| mean completion tokens | completion tokens/s | generation ms/token | step ms/completion token "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in FRAMEWORKS:
        x = s[name]
        lines.append(
            f"| {FRAMEWORKS[name]} | {fmt(x['step_time_s'], '.2f')} | {fmt(x['generate_s_per_step'], '.2f')} "
            f"({fmt(x['generation_share'] and 100 * x['generation_share'], '.0f')}%) | "
            f"{fmt(x['reference_s_per_step'], '.2f')} | {fmt(x['train_s_per_step'], '.2f')} | {fmt(x['mean_completion_length'], '.1f')} | "
            f"{fmt(x['completion_tokens_per_s'], '.2f')} | {fmt(x['generate_ms_per_completion_token'], '.1f')} | "
            f"{fmt(x['step_ms_per_completion_token'], '.1f')} | {fmt(x['peak_rss_mb'], '.0f')} |"
        )
    lines.append(
        f"| ratio TRL / peftkit (median, min-max over rounds) | {ratio('step_time_speedup')} | "
        f"{ratio('generate_speedup')} | {ratio('reference_speedup')} | {ratio('train_speedup')} | | "
        f"{ratio('completion_tokens_per_s')} (peftkit / TRL) | {ratio('generate_ms_per_token_speedup')} | "
        f"{ratio('step_ms_per_token_speedup')} | {ratio('peak_rss')} (peftkit / TRL) |"
    )
    st, first = results["settings"], results["rounds"][0]
    own = (
        f"{st['batch_size']} prompts x {st['num_generations']} answers per step, max "
        f"{st['max_completion_length']} answer tokens, temperature {st['temperature']}, beta {st['beta']}, "
        f"{st['precision']}, {st['threads']} thread(s) each, lr {st['learning_rate']}"
    )
    logits = (
        f"; generation logits TRL {first['trl'].get('generation_logits_dtype')} / peftkit "
        f"{first['peftkit'].get('generation_logits_dtype')}"
    )
    rule = f"TRL's step time >= {BAR}x peftkit's, also per completion token"
    return "\n".join([*lines, *footer_lines(results, own, rule, logits)])
