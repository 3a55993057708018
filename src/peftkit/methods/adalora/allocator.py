"""AdaLoRA's rank allocator: decide, from smoothed sensitivities, which ranks keep their budget.

Per adapter parameter w (every entry of A, E and B) after each optimizer step::

    I      = |w * grad|                                   sensitivity
    Ī      = beta1 * Ī + (1 - beta1) * I                   smoothed sensitivity   (exp_avg_ipt)
    U      = beta2 * U + (1 - beta2) * |I - Ī|             its uncertainty         (exp_avg_unc)
    s(w)   = Ī * U

and the score of rank i of a module (the triplet A[i, :], E[i], B[:, i])::

    S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)

The budget (total kept ranks over all modules) follows PEFT's cubic schedule from
init_r x modules down to target_r x modules; every deltaT steps the ranks whose score is at or
below the (init - budget)-th smallest get E_i = 0. Names, formulas and operation order follow
PEFT's ``RankAllocator`` so that both produce the same masks from the same gradients.
"""

from __future__ import annotations

import torch

from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import AdaLoraLinear

KINDS = ("lora_A", "lora_B", "lora_E")
STATE_PARTS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class RankAllocator:
    """Keeps the sensitivity averages of one adapter's parameters and masks its ranks to a budget.

    ``modules`` are ``(name, layer)`` pairs, names relative to the user's model as in PEFT
    (``model.layers.0.self_attn.q_proj``); tensors are keyed ``<name>.<kind>.<adapter>``.
    """

    def __init__(self, config: AdaLoraConfig, adapter_name: str, modules: list[tuple[str, AdaLoraLinear]]):
        self.config = config
        self.adapter_name = adapter_name
        self.modules = modules
        self.init_bgt = config.init_r * len(modules)  # PEFT counts the ranks at creation: init_r each
        self.target_bgt = config.target_r * len(modules)
        self.rank_pattern: dict[str, list[bool]] | None = None  # the latest masks, "<name>.lora_E" keys
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _params(self) -> list[tuple[str, str, torch.nn.Parameter]]:
        """``(module name, kind, parameter)`` for A, B, E of every module (PEFT's parameter order)."""
        return [
            (name, kind, getattr(layer, kind)[self.adapter_name])
            for name, layer in self.modules
            for kind in KINDS
        ]

    def _key(self, name: str, kind: str) -> str:
        return f"{name}.{kind}.{self.adapter_name}"

    def total_step(self) -> int:
        if self.config.total_step is None:
            raise ValueError(
                "AdaLoRA needs the schedule's length: set total_step in the AdaLoraConfig (the number of "
                "optimizer steps you will train for); `peftkit train` fills it in from the run"
            )
        return self.config.total_step

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to mask at this step)``: full warm-up, cubic decrease, then target."""
        tinit, tfinal, total = self.config.tinit, self.config.tfinal, self.total_step()
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.config.deltaT == 0

    def update_ipt(self) -> None:
        """Fold this step's |w * grad| into the averages (needs the gradients of the step)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, kind, param in self._params():
            if param.grad is None:
                raise ValueError(
                    f"{name}.{kind} has no gradient: call AdaLoRA's update_and_allocate after backward() and "
                    "optimizer.step(), before zero_grad()"
                )
            key = self._key(name, kind)
            if key not in self.ipt:
                self.ipt[key] = torch.zeros_like(param)
                self.exp_avg_ipt[key] = torch.zeros_like(param)
                self.exp_avg_unc[key] = torch.zeros_like(param)
            with torch.no_grad():
                self.ipt[key] = (param * param.grad).abs().detach()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
                self.exp_avg_unc[key] = (
                    beta2 * self.exp_avg_unc[key]
                    + (1 - beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()
                )

    def _score(self, name: str, kind: str) -> torch.Tensor:
        key = self._key(name, kind)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E of the lowest-scoring ranks so that about ``budget`` ranks remain; return the masks."""
        scores = {}
        for name, _ in self.modules:
            score_a = torch.mean(self._score(name, "lora_A"), dim=1, keepdim=True)  # (r, 1)
            score_b = torch.mean(self._score(name, "lora_B"), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            summed = self._score(name, "lora_E").view(-1) + torch.cat([score_a, score_b], dim=1).sum(
                dim=1
            ).view(-1)
            scores[name] = summed.view(-1, 1)
        everything = torch.cat([s.view(-1) for s in scores.values()])
        k = min(self.init_bgt - budget, everything.numel())
        # k <= 0 (target_r == init_r) would make PEFT's kthvalue fail: nothing to prune then.
        threshold = torch.kthvalue(everything, k=k)[0].item() if k > 0 else float("-inf")
        pattern = {}
        with torch.no_grad():
            for name, layer in self.modules:
                pruned = scores[name] <= threshold  # (r, 1)
                layer.lora_E[self.adapter_name].masked_fill_(pruned, 0.0)
                pattern[f"{name}.lora_E"] = (~pruned).view(-1).tolist()
        return pattern

    def update_and_allocate(
        self, step: int, force_mask: bool = False
    ) -> tuple[int, dict[str, list[bool]] | None]:
        if step < self.total_step() - self.config.tfinal:
            self.update_ipt()
        budget, mask_now = self.budget_schedule(step)
        return budget, (self.mask_to_budget(budget) if mask_now or force_mask else None)

    def mask_using_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Re-apply fixed masks (the final phase: optimizer steps may have moved pruned E entries)."""
        with torch.no_grad():
            for name, layer in self.modules:
                param = layer.lora_E[self.adapter_name]
                keep = torch.tensor(pattern[f"{name}.lora_E"], dtype=torch.bool, device=param.device)
                param.masked_fill_(~keep.unsqueeze(-1), 0.0)

    # -- checkpoints -------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """The averages and the latest masks, as flat tensors for a checkpoint."""
        out = {}
        for part in STATE_PARTS:
            out.update({f"{part}/{key}": value for key, value in getattr(self, part).items()})
        for key, keep in (self.rank_pattern or {}).items():
            out[f"rank_pattern/{key}"] = torch.tensor(keep, dtype=torch.bool)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.reset_ipt()
        pattern = {}
        for full_key, value in state.items():
            part, _, key = full_key.partition("/")
            if part in STATE_PARTS:
                device = self.modules[0][1].lora_A[self.adapter_name].device if self.modules else "cpu"
                getattr(self, part)[key] = value.to(device)
            elif part == "rank_pattern":
                pattern[key] = value.tolist()
            else:
                raise ValueError(f"AdaLoRA training state has an unknown entry {full_key!r}")
        self.rank_pattern = pattern or None
