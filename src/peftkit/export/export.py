"""``export_gguf``: an adapter and its base model as llama.cpp / Ollama files, written atomically.

    ADAPTER_DIR ──(base model it records)──> PeftModel (fp32), tokenizer
      default:     merge_and_unload(safe_merge) ──> OUT_DIR/NAME-F16.gguf  (weights, metadata,
                                                    tokenizer, chat template: one file)
      --lora-only: LoRA factors ──> OUT_DIR/NAME-LoRA-F16.gguf   (+ --with-base: BASE-F16.gguf)
      both:        OUT_DIR/Modelfile (Ollama), OUT_DIR/peftkit_export.json (what was written, how)

Everything that can be refused is refused before the model loads (architecture, adapter kind,
output directory); the files appear together or not at all (``atomic_dir``).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftkit.configuration import ConfigError
from peftkit.errors import ModelLoadError, PeftkitError
from peftkit.export.gguf_model import OUTTYPES
from peftkit.io import check_out_dir

SUMMARY_FILE = "peftkit_export.json"
MODELFILE = "Modelfile"


@dataclass
class ExportSummary:
    """What ``export_gguf`` wrote (file names are relative to ``out_dir``)."""

    out_dir: str
    outtype: str
    architecture: str
    gguf_architecture: str
    files: dict[str, str]
    tokenizer: str = ""
    chat_template: str = ""
    lora: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """Human-readable lines, as ``peftkit export`` prints them."""
        out = [f"{role}: {Path(self.out_dir) / name}" for role, name in self.files.items()]
        out.append(f"tokenizer: {self.tokenizer}")
        out.append(f"chat template: {self.chat_template}")
        if self.lora:
            folded = self.lora["folded_layers"]
            out.append(
                f"LoRA: {self.lora['layers']} layers, alpha {self.lora['alpha']:g}"
                + (f", scaling folded into lora_b in {folded} layers" if folded else "")
            )
        out.extend(f"note: {note}" for note in self.notes)
        return out


def export_gguf(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    outtype: str = "f16",
    lora_only: bool = False,
    overwrite: bool = False,
    base_model: str | None = None,
    with_base: bool = False,
    safe_merge: bool = True,
) -> ExportSummary:
    """Write ``adapter_dir``'s adapter (merged into its base, or alone with ``lora_only``) as GGUF."""
    from peftkit.loading import read_adapter_config
    from peftkit.models import resolve_model_dir
    from peftkit.preflight import writable_dir_problem
    from peftkit.serialization import check_finite_adapter, load_adapter_weights, resolve_adapter_dir

    start = time.perf_counter()
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}", "export")
    if with_base and not lora_only:
        raise ConfigError(
            "--with-base goes with --lora-only (the merged model already is complete)", "export"
        )
    directory = resolve_adapter_dir(adapter_dir)
    config = read_adapter_config(directory)
    task_type = str(config.get("task_type") or "CAUSAL_LM").upper()
    if task_type != "CAUSAL_LM":
        raise PeftkitError(
            f"{directory} is a {task_type} adapter; GGUF export is for causal language models (CAUSAL_LM)"
        )
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{directory}/adapter_config.json does not record base_model_name_or_path")
    out = Path(out_dir).expanduser()
    check_out_dir(out, [directory], overwrite=overwrite, what="input directory")
    if problem := writable_dir_problem(out, "OUT_DIR"):
        raise ConfigError(problem, "export")
    check_finite_adapter(directory, "export")
    model_dir = resolve_model_dir(base)
    check_out_dir(out, [directory, model_dir], overwrite=True, what="input directory")
    from peftkit.export.gguf_model import arch_spec

    hf_config = _read_config(model_dir)
    spec, notes = arch_spec(hf_config)
    if lora_only:
        from peftkit.export.gguf_lora import MERGED_HINT, base_layer_changes, lora_only_problems

        saved = load_adapter_weights(directory)
        problems = lora_only_problems(config, saved)
        if not problems and (changed := base_layer_changes(saved, model_dir)):
            problems.append(f"it carries base weights that differ from the base model's, e.g. {changed[0]}")
        if problems:
            raise PeftkitError(
                f"cannot export {directory} as a GGUF LoRA adapter: {'; '.join(problems)}. {MERGED_HINT}"
            )
    if not lora_only or with_base:  # a tokenizer llama.cpp cannot reproduce: refused before the model loads
        if differences := _check_tokenizer(directory, model_dir):
            notes.append(differences)

    from peftkit.auto import load_adapter_with_base
    from peftkit.io import atomic_dir

    peft_model, tokenizer = load_adapter_with_base(
        directory, base_model=base_model, task="causal_lm", dtype="float32", trust_remote_code=False
    )
    if tokenizer is None:
        raise PeftkitError(f"no tokenizer was found for {base}; a GGUF needs one")
    name = export_name(directory)
    suffix = outtype.upper()
    summary = ExportSummary(str(out), outtype, spec.hf_name, spec.gguf_arch, {}, notes=notes)
    with atomic_dir(out, overwrite=True) as tmp:
        if lora_only:
            model_ref = _write_lora(
                tmp,
                peft_model,
                tokenizer,
                hf_config,
                spec,
                outtype,
                name,
                model_dir,
                base,
                with_base,
                summary,
            )
            adapter_ref = f"./{summary.files['adapter']}"
        else:
            try:
                merged = peft_model.merge_and_unload(safe_merge=safe_merge)
            except ValueError as err:  # e.g. merged weights that overflow (safe_merge); nothing written
                raise PeftkitError(f"cannot merge {directory}: {err}") from err
            summary.files["model"] = f"{name}-{suffix}.gguf"
            summary.tokenizer = write_model_gguf(
                tmp / summary.files["model"], merged, tokenizer, spec, outtype, name, model_dir
            )
            model_ref, adapter_ref = f"./{summary.files['model']}", None
        _write_modelfile(tmp, tokenizer, model_ref, adapter_ref, directory, base, summary)
        summary.seconds = round(time.perf_counter() - start, 1)
        from peftkit.io import write_json

        write_json(
            tmp / SUMMARY_FILE, {**asdict(summary), "adapter_dir": str(directory), "base_model": str(base)}
        )
    return summary


def _check_tokenizer(directory: Path, model_dir: Path) -> str | None:
    """Refuse a tokenizer GGUF export cannot write (the one saved with the adapter, else the base's);
    return the texts llama.cpp will tokenize differently, if any."""
    from transformers import AutoTokenizer

    from peftkit.export.gguf_vocab import check_tokenizer

    source = directory if (directory / "tokenizer.json").is_file() else model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {err}") from err
    return check_tokenizer(tokenizer)


def _read_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the base model's config.json in {model_dir}: {err}") from err


def _write_lora(
    tmp: Path,
    peft_model: Any,
    tokenizer: Any,
    hf_config: Any,
    spec: Any,
    outtype: str,
    name: str,
    model_dir: Path,
    base: str,
    with_base: bool,
    summary: ExportSummary,
) -> str:
    """Write the adapter GGUF (and with ``with_base`` the base model's); return the Modelfile's FROM."""
    from peftkit.export.gguf_lora import lora_tensors, write_lora_gguf
    from peftkit.export.gguf_source import source_gguf

    rows = peft_model.get_base_model().get_input_embeddings().weight.shape[0]
    if rows != hf_config.vocab_size:
        raise PeftkitError(
            f"the adapter's tokenizer grew the vocabulary to {rows} tokens (the base model has "
            f"{hf_config.vocab_size}), so it does not fit the base model's GGUF; export the merged model"
        )
    export = lora_tensors(peft_model, hf_config, spec)
    suffix = outtype.upper()
    summary.files["adapter"] = f"{name}-LoRA-{suffix}.gguf"
    write_lora_gguf(tmp / summary.files["adapter"], export, spec, outtype, name)
    summary.lora = {"alpha": export.alpha, "layers": export.layers, "folded_layers": len(export.folded)}
    if with_base:
        summary.files["base"] = f"{export_name(Path(str(base)))}-{suffix}.gguf"
        summary.tokenizer = write_model_gguf(
            tmp / summary.files["base"], peft_model.unload(), tokenizer, spec, outtype, name, model_dir
        )
        return f"./{summary.files['base']}"
    summary.tokenizer = "not written (a LoRA adapter uses the base model's GGUF tokenizer)"
    source = source_gguf(model_dir)
    if source is not None:
        summary.notes.append(f"the Modelfile's FROM is {source}, the GGUF the base model was converted from")
        return str(source)
    summary.notes.append(
        f"edit FROM in the Modelfile: it must name {base} in GGUF form (an Ollama model name or a GGUF "
        "file), or export with --with-base"
    )
    return "./BASE-MODEL.gguf"


def write_model_gguf(
    path: Path, model: Any, tokenizer: Any, spec: Any, outtype: str, name: str, model_dir: Path | None
) -> str:
    """Write a plain causal LM as one GGUF file; return how its tokenizer was written."""
    import gguf

    from peftkit.export.gguf_model import add_tensor, file_type, model_tensors, write_hparams
    from peftkit.export.gguf_vocab import tokenizer_to_gguf

    config = model.config
    n_vocab = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(path, spec.gguf_arch)
    writer.add_type("model")
    writer.add_name(name)
    write_hparams(writer, config, spec, n_vocab)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    how = tokenizer_to_gguf(writer, tokenizer, n_vocab, model_dir)
    for tensor_name, tensor in model_tensors(model, config, spec):
        add_tensor(writer, tensor_name, tensor, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return how


def _write_modelfile(
    tmp: Path,
    tokenizer: Any,
    model_ref: str,
    adapter_ref: str | None,
    directory: Path,
    base: str,
    summary: ExportSummary,
) -> None:
    from peftkit import __version__
    from peftkit.export.gguf_vocab import adds_special_tokens
    from peftkit.export.modelfile import modelfile_text, recognise, stop_tokens

    template = recognise(tokenizer, adds_special_tokens(tokenizer)[0])
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template is not None:
        summary.chat_template = f"{template.family.name}: Go template written to the Modelfile"
    elif has_template:
        summary.chat_template = "in the GGUF; not translated to a Go template (not ChatML or Llama 3)"
        summary.notes.append(
            "the Modelfile has no TEMPLATE: Ollama picks one from the GGUF's chat template; check it with "
            "`ollama show NAME --template`"
        )
    else:
        summary.chat_template = "none (the tokenizer has no chat template)"
    what = f"the LoRA adapter {directory} for {base}" if adapter_ref else f"{directory} merged into {base}"
    header = [
        f"Ollama model file written by peftkit export (peftkit {__version__}): {what}.",
        f"Create the model with: ollama create NAME -f {Path(summary.out_dir) / MODELFILE}",
        "",
    ]
    text = modelfile_text(
        model_file=model_ref,
        adapter_file=adapter_ref,
        template=template,
        has_chat_template=has_template,
        stops=stop_tokens(template, tokenizer),
        header=header,
    )
    (tmp / MODELFILE).write_text(text, encoding="utf-8")
    summary.files["modelfile"] = MODELFILE


def export_name(directory: Path) -> str:
    """A file name for the export: the adapter directory's (for OUTPUT_DIR/adapter, OUTPUT_DIR's)."""
    path = Path(directory).expanduser().resolve() if Path(directory).exists() else Path(directory)
    if path.name == "adapter" and path.parent.name:  # peftkit train's OUTPUT_DIR/adapter
        path = path.parent
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.name).strip(".") or "model"
