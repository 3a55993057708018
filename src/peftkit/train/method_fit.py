"""Whether a job's method can run with its run settings: packing and FSDP need capabilities only
some methods' model classes declare (``TunerBase`` flags); each problem names the methods that can."""

from __future__ import annotations

from typing import Any


def methods_with(capability: str, methods: list[str]) -> list[str]:
    """The methods whose model class declares ``capability`` (a ``TunerBase`` class flag)."""
    from peftkit.methods import get_method

    return [n for n in methods if getattr(get_method(n).model_cls, capability, False)]


def packing_problems(job: Any, method: str, spec: Any, methods: list[str]) -> list[str]:
    from peftkit.tasks import get_task

    problems = []
    if not get_task(job.task).supports_packing:
        problems.append(
            f"'training.packing' is true but task {job.task.value} has no packed form (packing joins "
            "causal-LM examples): set training.packing: false"
        )
    if spec is not None and not getattr(spec.model_cls, "supports_packing", False):
        able = methods_with("supports_packing", methods)
        problems.append(
            f"'training.packing' is true but method {method!r} adds virtual tokens or past key/values to "
            f"each row, which packed examples would share: set training.packing: false, or use one of "
            f"{', '.join(able)}"
        )
    return problems


def fsdp_problems(job: Any, method: str, spec: Any, methods: list[str]) -> list[str]:
    problems = []
    if job.quantization is not None:
        problems.append(
            "'distributed' is fsdp but 'quantization' is set: FSDP cannot shard bitsandbytes' packed "
            "weights; set distributed: ddp (QLoRA trains data-parallel with a whole copy per process)"
        )
    if spec is not None and not getattr(spec.model_cls, "supports_fsdp", False):
        able = methods_with("supports_fsdp", methods)
        problems.append(
            f"'distributed' is fsdp but method {method!r} is not supported with sharded parameters "
            f"(its training hooks need whole tensors or virtual tokens): set distributed: ddp, or use one "
            f"of {', '.join(able)}"
        )
    return problems
