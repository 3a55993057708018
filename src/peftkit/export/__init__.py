"""Export an adapter for other runtimes: GGUF files for llama.cpp and Ollama (``peftkit export``).

``export_gguf`` writes the adapter merged into its base model as one GGUF file (weights,
architecture metadata, tokenizer, chat template), or with ``lora_only`` the LoRA adapter alone as
a GGUF LoRA adapter, plus an Ollama ``Modelfile``. See docs/export.md.

    gguf_model.py   architecture metadata, tensor names and layouts (q/k permutation), quantization
    gguf_vocab.py   tokenizer keys built from the transformers tokenizer; the pre-tokenizer's name
    gguf_source.py  tokenizer keys copied from the GGUF a base model was converted from
    gguf_lora.py    LoRA factors as lora_a / lora_b, scalings folded, what cannot be expressed
    modelfile.py    Ollama Modelfile: chat template family -> Go template, stop tokens
    export.py       export_gguf: checks, loading, atomic output, the summary
"""

from __future__ import annotations

from peftkit.export.export import ExportSummary, export_gguf
from peftkit.export.gguf_model import ARCHITECTURES, OUTTYPES

__all__ = ["ARCHITECTURES", "OUTTYPES", "ExportSummary", "export_gguf"]
