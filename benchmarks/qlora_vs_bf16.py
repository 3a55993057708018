"""Weight memory and step time: LoRA on a bf16 base vs on an NF4 / int8 base (QLoRA), SmolLM2-135M.

Steps of the variants are interleaved, so load from other processes hits all of them alike.

    python benchmarks/qlora_vs_bf16.py bf16,nf4 20 8 64     # variants, steps, batch, sequence length

Results are recorded in docs/methods/qlora.md.
"""

import sys
import time
import warnings

import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.models import load_model_and_tokenizer
from peftkit.quantization import QuantizationConfig, weight_bytes
from peftkit.train.precision import split_precision, store_in_dtype

warnings.filterwarnings("ignore")  # bitsandbytes int8 warns on every call


def build(quant):
    model, tok = load_model_and_tokenizer(
        "smollm2-135m-instruct", quantization=quant, attn_implementation="eager"
    )
    store_in_dtype(model, torch.bfloat16)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    split_precision(pm, torch.bfloat16)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    return pm, opt


names = sys.argv[1].split(",")
quants = {"bf16": None, "nf4": QuantizationConfig(bits=4), "int8": QuantizationConfig(bits=8)}
models = {}
for n in names:
    models[n] = build(quants[n])
    linear = [m for name, m in models[n][0].named_modules() if name.endswith("base_layer")]
    print(
        n,
        "adapted-linear weight MB",
        round(sum(weight_bytes(m) for m in linear) / 2**20, 1),
        "all weights MB",
        round(weight_bytes(models[n][0]) / 2**20, 1),
        flush=True,
    )
ids = torch.randint(
    10, 40000, (int(sys.argv[3]), int(sys.argv[4])), generator=torch.Generator().manual_seed(0)
)
times = {n: [] for n in names}
for step in range(int(sys.argv[2])):
    for n in names:
        pm, opt = models[n]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times[n].append(time.perf_counter() - t)
        print(n, step, round(loss.item(), 3), round(times[n][-1], 2), flush=True)
for n in names:
    print(n, "median step s (8x64 tokens):", sorted(times[n])[len(times[n]) // 2])
