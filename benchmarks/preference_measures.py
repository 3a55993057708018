"""What benchmarks/preference_throughput.py builds and measures: the preference pairs, the per-step
token counts and timing, peak memory, and the ONE held-out scoring function both frameworks'
saved adapters go through. Shared by its workers."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import resource
import statistics
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = "Sentiment: positive, negative or neutral?"  # the SFT built-in's system prompt
LABELS = ("positive", "negative", "neutral")
FRAMEWORKS = {
    "trl": "TRL DPOTrainer + PEFT LoRA",
    "peftkit": "peftkit train, objective: dpo",
}
BAR = {"tokens_per_s": 2.0, "peak_rss_mb": 0.7}  # peftkit / TRL: at least 2x, at most 0.7x


# -- data --------------------------------------------------------------------------------------------


def pair(text: str, label: str, index: int) -> dict[str, Any]:
    """One preference row: the tweet under the built-in's system prompt, its label as the chosen
    answer, and one of the two wrong labels (which one alternates with ``index``) as the rejected."""
    wrong = [x for x in LABELS if x != label]
    return {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
        "chosen": label,
        "rejected": wrong[index % 2],
    }


def tweet_pairs(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out pairs from the built-in labelled tweets (peftkit's CSV), disjoint:
    a seeded shuffle, training rows first, then held-out rows whose text no training row has."""
    from peftkit.data.builtin import get_builtin

    path = get_builtin("builtin:tweet-sentiment").locate()
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        rows = [(r["text"].strip(), r["sentiment"].strip()) for r in csv.DictReader(handle)]
    rows = [(text, label) for text, label in rows if text and label in LABELS]
    random.Random(seed).shuffle(rows)
    train = rows[:n_train]
    seen = {text for text, _ in train}
    heldout = [(text, label) for text, label in rows[n_train:] if text not in seen][:n_heldout]
    return (
        [pair(text, label, i) for i, (text, label) in enumerate(train)],
        [pair(text, label, i) for i, (text, label) in enumerate(heldout)],
    )


def toy_pairs(n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """--tiny: short toy prompts whose label follows from one word."""
    words = [("good", "positive"), ("bad", "negative"), ("fine", "neutral")]
    rows = [
        (f"word {w} {'x' * (i % 5)} {i}", label) for i in range(n_train + n_heldout) for w, label in words
    ]
    rows = rows[: n_train + n_heldout]
    return (
        [pair(text, label, i) for i, (text, label) in enumerate(rows[:n_train])],
        [pair(text, label, i) for i, (text, label) in enumerate(rows[n_train:])],
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encode_pairs(tokenizer: Any, rows: list[dict], max_seq_len: int) -> list[Any]:
    """Rows -> peftkit's tokenized pairs (chat template, boundary check, truncation)."""
    from peftkit.data.preference_encode import encode_pair

    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return [
        encode_pair(
            tokenizer, r["prompt"], answer(r["chosen"]), answer(r["rejected"]), max_seq_len=max_seq_len
        )
        for r in rows
    ]


# -- steps: tokens, timing, memory -------------------------------------------------------------------


def batch_record(input_ids: Any, attention_mask: Any) -> tuple[str, int]:
    """(hash of a collated 2B-row batch, its real tokens: non-pad tokens of chosen + rejected rows)."""
    h = hashlib.sha256()
    for tensor in (input_ids, attention_mask):
        t = tensor.detach().cpu().long().contiguous()
        h.update(f"{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16], int(attention_mask.sum())


def timing_summary(stamps: list[float], step_tokens: list[int]) -> dict[str, Any]:
    """Steps 2..N: the window from the end of step 1 (warm-up) to the end of step N."""
    assert len(stamps) == len(step_tokens), f"{len(stamps)} steps timed, {len(step_tokens)} batches"
    seconds = stamps[-1] - stamps[0]
    tokens = sum(step_tokens[1:])
    return {
        "steps": len(stamps),
        "timed_steps": len(stamps) - 1,
        "timed_s": seconds,
        "step_time_s": seconds / (len(stamps) - 1),
        "step_times_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens_per_step": step_tokens,
        "tokens_timed": tokens,
        "tokens_per_s": tokens / seconds,
    }


class PeakMemory:
    """Peak resident memory of this process: over its whole life (what ``ru_maxrss`` reports) and
    since :meth:`start` (Linux: VmHWM after resetting it through /proc/self/clear_refs)."""

    def __init__(self) -> None:
        self.before_mb = 0.0
        self.resettable = False

    def start(self) -> None:
        self.before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and with it ru_maxrss)
            self.resettable = True
        except OSError:
            pass

    def result(self) -> dict[str, Any]:
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        since = _vm_hwm_mb() if self.resettable else None
        return {
            "peak_rss_mb": max(self.before_mb, since or now),
            "train_peak_rss_mb": since,
            "setup_peak_rss_mb": self.before_mb,
            "rss_after_train_mb": _status_mb("VmRSS"),
        }


def _status_mb(key: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def _vm_hwm_mb() -> float | None:
    return _status_mb("VmHWM")


def step_records(records: list[tuple[str, int]], steps: int) -> dict[str, Any]:
    """One hash of all trained batches, and each step's tokens, from the ``batch_record`` of every
    batch collated. A dataloader may fetch a batch ahead of the last step: only the trained count."""
    records = records[:steps]
    joined = "|".join(h for h, _ in records).encode()
    return {"batches_digest": hashlib.sha256(joined).hexdigest()[:16], "step_tokens": [n for _, n in records]}


# -- held-out scoring: one function for both frameworks ----------------------------------------------


def completion_logps(model: Any, examples: list[Any], pad_id: int, batch_size: int = 16) -> Any:
    """(pairs, 2) summed fp32 log-probabilities of each pair's chosen and rejected completion.

    ``model`` is a plain transformers causal LM (adapters merged in, or the base); the output layer
    runs only at completion positions, no autocast."""
    import torch

    from peftkit.data.preference_collate import collate_pairs

    model.float().eval()
    body, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate_pairs(chunk, pad_id)
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logits = head(hidden[:, :-1][mask]).float()
            picked = logits.log_softmax(-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
            sums = torch.zeros(labels.shape[0]).index_add(0, mask.nonzero()[:, 0], picked)
            out.append(torch.stack([sums[: len(chunk)], sums[len(chunk) :]], dim=1))
    return torch.cat(out)


def preference_scores(policy: Any, reference: Any, beta: float) -> dict[str, Any]:
    """Held-out preference accuracy: the share of pairs whose implicit reward margin
    beta * [(policy - ref)(chosen) - (policy - ref)(rejected)] is > 0; the mean margin; and the
    share where the policy itself gives the chosen completion the higher log-probability."""
    margins = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return {
        "preference_accuracy": float((margins > 0).float().mean()),
        "mean_margin": float(margins.mean()),
        "chosen_more_likely": float((policy[:, 0] > policy[:, 1]).float().mean()),
    }


def score_adapters(
    base_model: str, heldout_rows: list[dict], adapters: dict[str, Path], *, beta: float, max_seq_len: int
) -> dict[str, Any]:
    """Every saved adapter scored the same way: loaded by peftkit onto the same fp32 base, merged,
    compared on the held-out pairs with the base (the adapter-disabled model) as reference."""
    import copy

    from peftkit import PeftModel
    from peftkit.models import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(base_model, dtype="float32", attn_implementation="eager")
    examples = encode_pairs(tok, heldout_rows, max_seq_len)
    reference = completion_logps(base, examples, tok.pad_token_id)
    out: dict[str, Any] = {
        "heldout_pairs": len(examples),
        "base": {"chosen_more_likely": float((reference[:, 0] > reference[:, 1]).float().mean())},
    }
    for name, directory in adapters.items():
        merged = PeftModel.from_pretrained(copy.deepcopy(base), directory).merge_and_unload()
        out[name] = preference_scores(completion_logps(merged, examples, tok.pad_token_id), reference, beta)
    return out


# -- report ----------------------------------------------------------------------------------------------

RATIO_KEYS = ("tokens_per_s", "peak_rss_mb", "train_peak_rss_mb", "step_time_s")


def round_ratios(r: dict[str, Any]) -> dict[str, float]:
    """peftkit / TRL in one round, as the round's ``ratio_<key>`` entries."""
    out = {}
    for key in RATIO_KEYS:
        if r["trl"].get(key) and r["peftkit"].get(key) is not None:
            out[f"ratio_{key}"] = r["peftkit"][key] / r["trl"][key]
    return out


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(rounds: list[dict[str, Any]], score: dict[str, Any]) -> dict[str, Any]:
    keys = ("tokens_per_s", "step_time_s", "peak_rss_mb", "train_peak_rss_mb", "final_train_loss")
    summary: dict[str, Any] = {}
    for name in FRAMEWORKS:
        summary[name] = {k: median([r[name].get(k) for r in rounds]) for k in keys}
        summary[name].update(score[name])
    ratios = {}
    for key in ("tokens_per_s", "step_time_s", "peak_rss_mb", "train_peak_rss_mb"):
        per_round = [r[f"ratio_{key}"] for r in rounds if f"ratio_{key}" in r]
        ratios[key] = {"median": median(per_round), "min": min(per_round), "max": max(per_round)}
    for key in ("preference_accuracy", "mean_margin"):
        ratios[key] = {"peftkit": score["peftkit"][key], "trl": score["trl"][key]}
    accuracy = {name: score[name]["preference_accuracy"] for name in FRAMEWORKS}
    bar = {
        "tokens_per_s_at_least_2x": ratios["tokens_per_s"]["median"] >= BAR["tokens_per_s"],
        "peak_rss_at_most_0.7x": ratios["peak_rss_mb"]["median"] <= BAR["peak_rss_mb"],
        "accuracy_equal_or_better": accuracy["peftkit"] >= accuracy["trl"],
    }
    bar["met"] = all(bar.values())
    return {"frameworks": summary, "ratios_peftkit_over_trl": ratios, "bar": bar}


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, Any]) -> str:
    s, r = results["summary"]["frameworks"], results["summary"]["ratios_peftkit_over_trl"]
    rows = [
        ("tokens/s (chosen + rejected, non-pad)", "tokens_per_s", ".1f"),
        ("step time s", "step_time_s", ".2f"),
        ("peak RSS MB (process life)", "peak_rss_mb", ".0f"),
        ("peak RSS MB (training only)", "train_peak_rss_mb", ".0f"),
        ("held-out preference accuracy", "preference_accuracy", ".3f"),
        ("held-out mean reward margin", "mean_margin", ".4f"),
        ("held-out chosen more likely", "chosen_more_likely", ".3f"),
        ("final train loss", "final_train_loss", ".4f"),
    ]
    lines = ["| metric | TRL | peftkit | peftkit / TRL (median, min-max over rounds) |", "|---|---|---|---|"]
    for label, key, spec in rows:
        ratio = ""
        if key in r and "median" in r[key]:
            ratio = f"{r[key]['median']:.2f} ({r[key]['min']:.2f}-{r[key]['max']:.2f})"
        elif s["trl"].get(key):
            ratio = f"{s['peftkit'][key] / s['trl'][key]:.2f}"
        trl, pk = fmt(s["trl"].get(key), spec), fmt(s["peftkit"].get(key), spec)
        lines.append(f"| {label} | {trl} | {pk} | {ratio} |")
    st = results["settings"]
    own = (
        f"batch {st['batch_size']} pairs, {st['precision']}, {st['threads']} thread(s) each, "
        f"lr {st['learning_rate']}, beta {st['beta']}, max_seq_len {st['max_seq_len']}, "
        f"{st['heldout_pairs']} held-out pairs"
    )
    rule = f">= {BAR['tokens_per_s']}x tokens/s, <= {BAR['peak_rss_mb']}x peak RSS, accuracy >= TRL's"
    return "\n".join([*lines, *footer_lines(results, own, rule)])


def footer_lines(results: dict[str, Any], own_settings: str, rule: str, more: str = "") -> list[str]:
    """Under a side-by-side table: a blank line; the rounds and steps, ``own_settings`` (the
    benchmark's own, as text), each framework's attention kernel (then ``more``) and the load
    average at start and end; last, what the bar asks (``rule``), whether it is met, and each check."""
    st, first, bar = results["settings"], results["rounds"][0], results["summary"]["bar"]
    checks = ", ".join(f"{k}: {v}" for k, v in bar.items() if k != "met")
    return [
        "",
        f"{st['rounds']} round(s) x {st['steps']} steps (step 1 untimed), {own_settings}; attention TRL "
        f"{first['trl']['attention']} / peftkit {first['peftkit']['attention']}{more}; load average "
        f"{st['loadavg_start'][0]:.2f} at start, {st['loadavg_end'][0]:.2f} at end",
        f"bar ({rule}): " + ("met" if bar["met"] else "NOT met") + f" ({checks})",
    ]
