"""MAM adapter's configuration (``method: mam``; PEFT has no such method).

One flat config for both parts: the prefix fields are prefix tuning's (inherited from
:class:`PrefixTuningConfig`, same names and meaning), the adapter fields are a parallel bottleneck
adapter's (same names as :class:`BottleneckConfig`). Defaults are the paper's MAM setting
(He et al., 2022, section 4.6): a prefix of l=30 positions, reparameterized by an MLP of width 800
while training, and a parallel adapter of bottleneck 512 with scaling s=4 beside every feed-forward
block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.methods.adapters.config import INITS, NON_LINEARITIES
from peftkit.methods.prefix_tuning.config import PrefixTuningConfig


def bottleneck_problems(config: object) -> list[str]:
    """Checks shared by the composite methods' adapter fields (``bottleneck_size`` .. ``mlp_modules``)."""
    problems = []
    size = config.bottleneck_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        problems.append(f"bottleneck_size must be a positive integer (e.g. 512), got {size!r}")
    if config.non_linearity not in NON_LINEARITIES:
        problems.append(
            f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {config.non_linearity!r}"
        )
    if config.adapter_init not in INITS:
        problems.append(f"adapter_init must be one of {', '.join(INITS)}, got {config.adapter_init!r}")
    if isinstance(config.mlp_modules, list) and not config.mlp_modules:
        problems.append("mlp_modules is an empty list: name at least one module, or use null for the default")
    return problems


@dataclass(kw_only=True)
class MAMConfig(PrefixTuningConfig):
    """Mix-And-Match adapter (He et al., 2022): prefix tuning at every attention layer plus a scaled
    parallel adapter beside every feed-forward block, ``ffn(x) + s * up(relu(down(x)))``."""

    NAME_LIST_FIELDS = PrefixTuningConfig.NAME_LIST_FIELDS + ("mlp_modules",)

    peft_type: str | None = field(
        default="MAM", metadata={"help": "Which PEFT method this config belongs to (always MAM)."}
    )
    num_virtual_tokens: int | None = field(
        default=30,
        metadata={"help": "Prefix length l: key/value positions added to every attention layer (paper: 30)."},
    )
    prefix_projection: bool = field(
        default=True,
        metadata={
            "help": "Compute the prefix with a 2-layer tanh MLP from l embeddings while training (Li & Liang's "
            "reparameterization, used by He et al.); false trains the key/values directly."
        },
    )
    encoder_hidden_size: int | None = field(
        default=800,
        metadata={"help": "Width of the prefix MLP (prefix_projection); paper: 800; null uses token_dim."},
    )
    bottleneck_size: int = field(
        default=512,
        metadata={"help": "Width of the parallel adapter's bottleneck (paper: 512)."},
    )
    scaling: float = field(
        default=4.0,
        metadata={"help": "s in ffn(x) + s * up(f(down(x))) (paper: 4)."},
    )
    non_linearity: str = field(
        default="relu",
        metadata={"help": f"Activation between the projections: {', '.join(NON_LINEARITIES)}."},
    )
    adapter_init: str = field(
        default="zero",
        metadata={
            "help": "zero: the adapter's up-projection starts at zero (at first only the prefix changes the "
            "model); random: nn.Linear's default init for both projections (for tests)."
        },
    )
    mlp_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Feed-forward blocks the adapter runs beside (their input and output must have the hidden "
            "size, e.g. [mlp]); a list matches names equal to or ending with '.' + entry, a string is a regex "
            "for the full name; null uses the bottleneck adapters' parallel default for the architecture."
        },
    )

    def validate(self) -> list[str]:
        problems = super().validate() + bottleneck_problems(self)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            problems.append(f"scaling must be a number (paper: 4), got {self.scaling!r}")
        return problems
