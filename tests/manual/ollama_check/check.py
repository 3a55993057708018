"""Check `peftkit export`'s Modelfiles with Ollama's own code (a manual check: Ollama itself is not
installable from the package registries this project's CI reaches; see build.sh).

    tests/manual/ollama_check/build.sh OLLAMA_CHECKOUT /tmp/peftkitcheck
    .venv/bin/python tests/manual/ollama_check/check.py /tmp/peftkitcheck [ADAPTER_DIR ...]

For tiny models with ChatML, ChatML-with-default-system and Llama 3 templates (merged Q8_0 and
--lora-only --with-base exports), and for every ADAPTER_DIR given (merged Q8_0 and --lora-only):
Ollama's Modelfile parser and create request must accept the Modelfile (FROM / ADAPTER files
found, PARAMETERs typed), Ollama's GGUF decoder must read every file as the right kind, and
Ollama's template engine must render transformers' prompts for the probe conversations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/

from _gguf_helpers import lora_config  # noqa: E402
from _serve_helpers import save_random_adapter  # noqa: E402
from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from peftkit.export import export_gguf  # noqa: E402
from peftkit.export.modelfile import _probes  # noqa: E402
from test_export_gguf_llama_cpp import LLAMA3_STYLE, SMOLLM2_STYLE  # noqa: E402


def check(binary: str, out: Path, tokenizer, label: str) -> bool:
    conversations = _probes()
    request = json.dumps({"modelfile": str(out / "Modelfile"), "conversations": conversations})
    result = subprocess.run([binary], input=request, capture_output=True, text=True)
    if result.returncode:
        print(f"FAIL {label}: {result.stderr[-1500:]}")
        return False
    got = json.loads(result.stdout)
    expected = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations
    ]
    same = sum(a == b for a, b in zip(got.get("prompts") or [], expected))
    kinds = {Path(name).name: info["type"] for name, info in got["decoded"].items()}
    ok = same == len(expected) and set(kinds.values()) <= {"model", "adapter"} and bool(got["files"])
    ok = ok and ("adapter" in kinds.values()) == bool(got["adapters"])
    print(
        f"{'ok  ' if ok else 'FAIL'} {label}: prompts {same}/{len(expected)}, files {kinds}, "
        f"parameters {got['parameters']}, system {got['system'][:40]!r}"
    )
    return ok


def main(binary: str, adapters: list[str]) -> int:
    from transformers import AutoTokenizer

    from peftkit.loading import read_adapter_config
    from peftkit.models import resolve_model_dir

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, template in [
            ("chatml", None),
            ("chatml-default-system", SMOLLM2_STYLE),
            ("llama3", LLAMA3_STYLE),
        ]:
            tok = make_tiny_tokenizer()
            if template:
                tok.chat_template = template
            make_tiny_llama(vocab_size=len(tok), eos_token_id=tok.eos_token_id).save_pretrained(
                root / name / "model"
            )
            tok.save_pretrained(root / name / "model")
            adapter = save_random_adapter(
                root / name / "model", root / name / "adapter", lora_config(), seed=1
            )
            export_gguf(adapter, root / name / "merged", outtype="q8_0")
            results.append(check(binary, root / name / "merged", tok, f"tiny {name}, merged Q8_0"))
            export_gguf(adapter, root / name / "lora", outtype="f16", lora_only=True, with_base=True)
            results.append(check(binary, root / name / "lora", tok, f"tiny {name}, --lora-only --with-base"))
        for i, adapter in enumerate(adapters):
            base = read_adapter_config(Path(adapter)).get("base_model_name_or_path")
            tok = AutoTokenizer.from_pretrained(resolve_model_dir(base))
            export_gguf(adapter, root / f"a{i}-merged", outtype="q8_0")
            results.append(check(binary, root / f"a{i}-merged", tok, f"{adapter}, merged Q8_0"))
            export_gguf(adapter, root / f"a{i}-lora", outtype="f16", lora_only=True)
            results.append(check(binary, root / f"a{i}-lora", tok, f"{adapter}, --lora-only"))
    print(f"{sum(results)}/{len(results)} exports pass Ollama's checks")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
