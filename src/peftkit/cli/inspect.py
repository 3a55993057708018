"""peftkit inspect: what a method could target in a model, and the parameter counts a config gives.

The model is built from its config on the ``meta`` device: no weights are read or allocated,
so a 70B configuration is inspected as fast as a 135M one.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from peftkit.errors import ModelLoadError

HELP = "Show a model's targetable modules and the trainable / total parameters a config would give."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from peftkit.cli.train import add_config_arguments

    add_config_arguments(parser, required=False)
    parser.add_argument(
        "--base-model", metavar="NAME_OR_DIR", help="Model to inspect (default: the config's)."
    )
    parser.add_argument("--method", help="Method to inspect (default: the config's, else lora).")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="Allow the model repository's own code."
    )


def build_meta_model(name_or_path: str, *, trust_remote_code: bool):
    """The model's architecture with every tensor on the ``meta`` device (no memory, no weights)."""
    import torch
    import transformers

    from peftkit.models import hub_offline, resolve_model_dir

    model_dir = resolve_model_dir(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, local_files_only=hub_offline()
        )
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # config.json unreadable, unknown or remote-code architecture
        if "trust_remote_code" in str(err):
            raise ModelLoadError(
                f"{name_or_path} contains custom model code; if you trust it, pass --trust-remote-code"
            ) from err
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"cannot build {name_or_path} from {model_dir}/config.json: {first_line}"
        ) from err


def describe_targets(model, names: list[str]) -> list[str]:
    """One line per module suffix: how many modules carry it, and their type and shape."""
    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[name.rsplit(".", 1)[-1]].append(name)
    lines = []
    for suffix, members in groups.items():
        module = modules[members[0]]
        kinds = Counter(type(modules[m]).__name__ for m in members)
        shape = ""
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2:
            shape = f" {weight.shape[1]} -> {weight.shape[0]}"
        kind = ", ".join(kinds)
        lines.append(f"  {suffix:<20} {len(members):>4} x {kind}{shape}   e.g. {members[0]}")
    return lines


def run(args: argparse.Namespace) -> int:
    from peftkit import get_peft_model
    from peftkit.methods import get_method
    from peftkit.train.config import apply_overrides, build_job_config, read_yaml

    raw = read_yaml(args.config) if args.config else {}
    raw = apply_overrides(raw, args.overrides)
    if args.method:
        raw["method"] = args.method
    if args.base_model:
        raw["base_model"] = args.base_model
    job = build_job_config(raw, source=args.config)
    spec = get_method(job.method)

    model = build_meta_model(
        job.base_model, trust_remote_code=job.trust_remote_code or args.trust_remote_code
    )
    total = sum(p.numel() for p in model.parameters())
    print(f"model: {job.base_model} ({type(model).__name__}, {total:,} parameters)")
    candidates = spec.targetable_modules(model)
    print(
        f"modules that method '{job.method}' can target ({len(candidates)}), by name to use in target_modules:"
    )
    print("\n".join(describe_targets(model, candidates)))

    peft_model = get_peft_model(model, job.method_config)
    trainable, all_params = peft_model.get_nb_trainable_parameters()
    print(
        f"with this config: trainable params: {trainable:,} || all params: {all_params:,} "
        f"|| trainable%: {100 * trainable / all_params:.4f}"
    )
    return 0
