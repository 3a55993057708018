"""Training-step time with torch's default threads vs fewer, on an idle and on a loaded machine.

Why ``peftkit.threads`` lowers the thread count when the load average is high: with one OpenMP
thread per core and other processes keeping cores busy, every parallel region waits for the
thread that lost its core. The load is ``--busy`` processes spinning in pure Python (another
training run, a compiler, a browser would do the same). Configurations take turns, one step each,
in one process (``torch.set_num_threads`` switches between them), so drift hits them alike::

    python benchmarks/threads_under_load.py                  # SmolLM2-135M + LoRA, 4 x 128 tokens
    python benchmarks/threads_under_load.py --busy 1 --steps 8 --json /tmp/threads.json

Prints the median step time per (load, threads) and the ratio to the default threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPIN = "while True: sum(range(10_000))"  # a process that keeps one core busy until killed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes for the loaded case")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration and load")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    import torch

    from peftkit import LoraConfig, get_peft_model
    from peftkit.models import load_model_and_tokenizer
    from peftkit.threads import machine_cpus

    default = torch.get_num_threads()
    counts = sorted({default, *range(1, default)}, reverse=True)
    model, _ = load_model_and_tokenizer(args.model)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )

    def step() -> float:
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    results = {"cpus": machine_cpus(), "default_threads": default, "busy": args.busy, "runs": []}
    for load in (0, args.busy):
        hogs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(load)]
        times = {n: [] for n in counts}
        try:
            for n in counts:  # warm-up, one step each
                torch.set_num_threads(n)
                step()
            for _ in range(args.steps):
                for n in counts:
                    torch.set_num_threads(n)
                    times[n].append(step())
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        base = statistics.median(times[default])
        for n in counts:
            median = statistics.median(times[n])
            results["runs"].append(
                {"busy": load, "threads": n, "median_step_s": median, "vs_default": median / base}
            )
            print(
                f"busy processes {load}  threads {n}:  median step {median:.2f} s  ({median / base:.2f}x the default's)"
            )
    torch.set_num_threads(default)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
