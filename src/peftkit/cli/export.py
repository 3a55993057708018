"""``peftkit export``: an adapter as GGUF for llama.cpp and Ollama (``peftkit.export``).

    peftkit export ADAPTER_DIR OUT_DIR --format gguf [--outtype f16] [--lora-only [--with-base]]

Default: the adapter merged into its base model, one .gguf file with the weights, architecture
metadata, tokenizer and chat template; ``--lora-only``: the LoRA adapter alone, to apply on the
base model's GGUF at run time. Both with an Ollama Modelfile. OUT_DIR appears atomically.
"""

from __future__ import annotations

import argparse

HELP = "Export an adapter (merged into its base, or LoRA alone) as GGUF for llama.cpp and Ollama."

FORMATS = ("gguf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peftkit.export import ARCHITECTURES, OUTTYPES

    parser.add_argument(
        "adapter_dir", metavar="ADAPTER_DIR", help="adapter directory saved by `peftkit train` (or PEFT)"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the GGUF file(s) and Modelfile")
    parser.add_argument(
        "--format", choices=FORMATS, default="gguf", help="output format (default: gguf, llama.cpp's)"
    )
    parser.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="f16",
        help="weight type of the matrices (default: f16); norms and vectors stay f32. q8_0 is about half "
        "the size of f16 at a small loss",
    )
    parser.add_argument(
        "--lora-only",
        action="store_true",
        help="write the LoRA adapter alone as a GGUF LoRA adapter (llama.cpp --lora, Ollama ADAPTER) "
        "instead of the merged model",
    )
    parser.add_argument(
        "--with-base",
        action="store_true",
        help="with --lora-only: also write the base model's GGUF, which the Modelfile then uses",
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME_OR_DIR",
        help="base model (alias, local directory or hub id); default: the one ADAPTER_DIR records",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty OUT_DIR (never one that is, holds or is inside an input directory)",
    )
    parser.epilog = (
        f"Architectures: {', '.join(ARCHITECTURES)}. Tokenizers: byte-level BPE (Llama 3, SmolLM, Qwen2, "
        "Mistral Nemo). See docs/export.md."
    )


def run(args: argparse.Namespace) -> int:
    from peftkit.export import export_gguf

    summary = export_gguf(
        args.adapter_dir,
        args.out_dir,
        outtype=args.outtype,
        lora_only=args.lora_only,
        overwrite=args.overwrite,
        base_model=args.base_model,
        with_base=args.with_base,
    )
    what = "GGUF LoRA adapter" if args.lora_only else "merged model"
    print(f"{what} exported to {summary.out_dir} in {summary.seconds:.1f} s")
    for line in summary.lines():
        print(f"  {line}")
    print(f"  Ollama: ollama create NAME -f {summary.out_dir}/Modelfile")
    return 0
