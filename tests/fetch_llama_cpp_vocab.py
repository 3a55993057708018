"""Copy llama.cpp's Llama 2 vocabulary test files out of the llama-cpp-python source distribution.

llama.cpp tests its tokenizers with ``models/ggml-vocab-llama-spm.gguf`` (Llama 2's SentencePiece
vocabulary, 32,000 tokens) and ``.inp`` / ``.out`` files: test strings and the token ids
SentencePiece gives them. The installed llama-cpp-python wheel does not contain them, its sdist
does. ``make install`` runs this once (usage: ``python tests/fetch_llama_cpp_vocab.py DEST_DIR``);
tests/test_export_gguf_llama_cpp.py checks peftkit's export of a SentencePiece-style vocabulary
against them, and skips where they are absent.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NAME = "ggml-vocab-llama-spm.gguf"
FILES = (NAME, NAME + ".inp", NAME + ".out")


def main(dest: Path) -> None:
    if all((dest / name).is_file() for name in FILES):
        return
    version = importlib.metadata.version("llama_cpp_python")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + [f"llama-cpp-python=={version}", "-d", tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.name.endswith(FILES)}
            dest.mkdir(parents=True, exist_ok=True)
            for name in FILES:
                data = tar.extractfile(members[name]).read()
                partial = dest / (name + ".partial")
                partial.write_bytes(data)
                partial.replace(dest / name)
    print(f"llama.cpp's Llama 2 vocabulary test files (llama-cpp-python {version}) -> {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
