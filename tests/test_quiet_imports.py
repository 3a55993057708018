"""What plain commands must not import or print: bitsandbytes (and its hub-kernel warning, which
suggests trust_remote_code) unless quantization is used.

Each case runs in a fresh interpreter: in this test process another test may already have
imported bitsandbytes. PEFT is installed here (a test oracle), as it is for users who migrate
from it: transformers' ``set_seed`` imports it, and it imports bitsandbytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import save_tiny_model_dir


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("quiet")
    base = save_tiny_model_dir(root / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_plain_adapter_commands_never_import_bitsandbytes(lora_adapter, command):
    base, adapter = lora_adapter
    prompt = "'--prompt', 'hi', " if command == "generate" else ""
    done = _python(
        f"""
        import io, sys
        sys.stdin = io.StringIO("hello\\n")
        from peftkit.cli.main import main
        code = main(['{command}', '--base-model', {str(base)!r}, '--adapter', {str(adapter)!r}, {prompt}
                     '--max-new-tokens', '2'])
        print('exit', code, 'bitsandbytes' in sys.modules)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "exit 0 False", done.stdout + done.stderr
    assert "trust_remote_code" not in done.stderr and "kernels-community" not in done.stderr


def test_quantization_imports_bitsandbytes_without_suggesting_remote_code():
    pytest.importorskip("bitsandbytes")
    done = _python(
        """
        import sys
        from peftkit.quantization import QuantizationConfig
        QuantizationConfig(bits=4).to_bnb_config()
        print('bitsandbytes' in sys.modules)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "trust_remote_code" not in done.stderr and "kernels-community" not in done.stderr, done.stderr
