"""The BOFT layer for ``nn.Linear``: rotate the input by a butterfly of orthogonal blocks, scale the output.

    x (..., in) ─► @ M_{m} ─► ... ─► @ M_1 ─► @ M_0 ─► base_layer (no bias) ─► ⊙ s (out) ─► + b ─► y

    M_i = P_i B_i P_iᵀ      B_i: block-diagonal, D blocks R_ij (H × H), D × H = in_features
    R_ij = Cayley(A_ij) = (I - S)(I + S)⁻¹ with S = (A_ij - A_ijᵀ) / 2      (exactly orthogonal)
    P_i:  butterfly permutation of level i (P_0 = I): within chunks of H·2^i features, the
          half-blocks (H/2 features) are reordered evens-then-odds, so level i's blocks mix
          features 2^i half-blocks apart (a butterfly, as in the FFT)

Trained: ``boft_R`` (m+1, D, H, H) and ``boft_s`` (out, 1), in ``nn.ParameterDict``s keyed by adapter
name as in PEFT (``q_proj.boft_R.default`` in the model, ``q_proj.boft_R`` in files).

Applying M_i = P B Pᵀ to a row vector needs no dense matrix: ``(x M_i)[b] = (u B)[perm[b]]`` with
``u = x[inv_perm]`` (a gather, a block-wise matmul, a gather), O(in·H) per token instead of O(in²).
Merging builds the dense product R = M_m ⋯ M_0 and folds it in: ``W' = s ⊙ (W Rᵀ)``.

PEFT computes the butterfly with a CUDA extension; without it (any CPU run) PEFT silently uses ONE
factor whatever ``boft_n_butterfly_factor`` says. peftkit always computes the butterfly as configured
(in plain PyTorch); with one factor (the default) both libraries agree everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.methods.boft.config import BOFTConfig
from peftkit.methods.layers import WrappedLayer, adapter_dtype
from peftkit.methods.merging import require_finite


def block_layout(in_features: int, config: BOFTConfig, axis: str = "in_features") -> tuple[int, int, int]:
    """(factors, block_num, block_size) for a layer of ``in_features``; errors say what to change
    (naming the rotated ``axis``: a conv's is ``in_channels*kernel^2``).

    The rules are PEFT's (with its CUDA extension): the blocks tile ``in_features``, and every
    butterfly level i (1..factors-1) pairs up chunks of ``block_size × 2^i`` features.
    """
    size, num = config.boft_block_size, config.boft_block_num
    factors = config.boft_n_butterfly_factor
    levels = factors - 1  # PEFT's (and the paper's) m: butterfly levels beyond plain OFT
    if size == 0:
        if in_features % num != 0:
            raise ValueError(
                f"boft_block_num={num} does not divide {axis}={in_features}: choose a divisor of "
                f"{in_features}, or set boft_block_size instead"
            )
        if levels and (levels > int(math.log2(num)) or num % 2**levels != 0):
            raise ValueError(
                f"boft_n_butterfly_factor={factors} is too large for boft_block_num={num}: the number of "
                f"blocks must be a multiple of 2^(factors-1) = {2**levels}; lower the factor or use more blocks"
            )
        size = in_features // num
    else:
        if in_features % size != 0:
            raise ValueError(
                f"boft_block_size={size} does not divide {axis}={in_features}: choose a divisor of "
                f"{in_features} (e.g. 4, 8, 16), or set boft_block_num instead"
            )
        span = size * 2**levels
        if levels and (in_features < span or in_features % span != 0):
            raise ValueError(
                f"boft_n_butterfly_factor={factors} is too large for boft_block_size={size} and "
                f"{axis}={in_features}: boft_block_size × 2^(factors-1) = {span} must divide "
                f"{axis}; lower the factor or the block size"
            )
        num = in_features // size
    if levels and (num % 2 != 0 or size % 2 != 0):
        raise ValueError(
            f"with boft_n_butterfly_factor={factors} > 1, the block size ({size}) and the number of blocks "
            f"({num}) must both be even; change boft_block_size / boft_block_num or use factor 1"
        )
    return factors, num, size


def butterfly_perm(n: int, level: int, block_num: int, block_size: int) -> torch.Tensor:
    """Level ``level``'s permutation as indices: ``P[a, perm[a]] = 1``.

    Chunks of ``block_size × 2^level`` features are cut into half-blocks (``block_size / 2``); each
    chunk lists its even half-blocks, then its odd ones. Level 0 (and one factor) is the identity.
    """
    if level == 0:
        return torch.arange(n)
    chunk = n // (block_num // 2**level)  # = block_size * 2**level
    half = block_size // 2
    halves = chunk // half
    order = [*range(0, halves, 2), *range(1, halves, 2)]
    within = torch.cat([torch.arange(pos * half, pos * half + half) for pos in order])  # (chunk,)
    return torch.cat([start + within for start in range(0, n, chunk)])


def cayley(blocks: torch.Tensor) -> torch.Tensor:
    """(..., H, H) free matrices -> orthogonal (I - S)(I + S)⁻¹, S their skew-symmetric part."""
    skew = 0.5 * (blocks - blocks.transpose(-2, -1))
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def block_dropout(rotations: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout: in one random factor, a fraction ``p`` of blocks -> identity."""
    factors, num, size, _ = rotations.shape
    dropped = int(p * num)
    if dropped == 0:
        return rotations
    mask = torch.zeros(factors, num, 1, 1, device=rotations.device, dtype=rotations.dtype)
    level = int(torch.randint(0, factors, (1,)))
    mask[level, torch.randperm(num, device=rotations.device)[:dropped]] = 1.0
    eye = torch.eye(size, device=rotations.device, dtype=rotations.dtype)
    return (1 - mask) * rotations + mask * eye


class BOFTLayer(WrappedLayer):
    """What BOFT's linear and conv layers share: parameters, rotations, merging.

    ``in_features`` is the size of the rotated axis (a conv's flattened filter, in × k × k) and
    ``scale_shape`` the shape of ``boft_s`` (PEFT's: (out, 1) for Linear, (1, out) for Conv2d).
    """

    in_features: int
    out_features: int
    scale_shape: tuple[int, int]
    rotated_axis: str = "in_features"  # for error messages

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self._perms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per level: (perm, inverse)

    def update_layer(self, adapter_name: str, config: BOFTConfig) -> None:
        """Add (or replace) ``adapter_name``: identity rotations and unit scales (PEFT's default) or random."""
        n = self.in_features
        factors, num, size = block_layout(n, config, self.rotated_axis)
        weight = self.base_layer.weight
        kwargs = dict(device=weight.device, dtype=adapter_dtype(weight.dtype))
        rotation = nn.Parameter(torch.zeros(factors, num, size, size, **kwargs))  # (m+1, D, H, H)
        scale = nn.Parameter(torch.ones(*self.scale_shape, **kwargs))
        if not config.init_weights:
            nn.init.normal_(rotation, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name], self.boft_s[adapter_name] = rotation, scale
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = size, num
        self.boft_dropout[adapter_name] = float(config.boft_dropout)
        perms = [butterfly_perm(n, level, num, size) for level in range(factors)]
        self._perms[adapter_name] = [(perm, torch.argsort(perm)) for perm in perms]

    def rotations(self, adapter: str) -> torch.Tensor:
        """The orthogonal blocks of every factor, (m+1, D, H, H), with dropout in training."""
        rotations = cayley(self.boft_R[adapter])
        p = self.boft_dropout[adapter]
        return block_dropout(rotations, p) if self.training and p > 0 else rotations

    def rotate(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """``x @ M_m @ ... @ M_0`` for x (..., in), without forming any (in, in) matrix."""
        rotations = self.rotations(adapter)  # (m+1, D, H, H)
        num, size = self.boft_block_num[adapter], self.boft_block_size[adapter]
        for level in reversed(range(rotations.shape[0])):
            perm, inverse = (t.to(x.device) for t in self._perms[adapter][level])
            u = x if level == 0 else x.index_select(-1, inverse)  # P_0 = I: no gathers
            v = torch.einsum("...dk,dkc->...dc", u.reshape(*x.shape[:-1], num, size), rotations[level])
            x = v.reshape(x.shape) if level == 0 else v.reshape(x.shape).index_select(-1, perm)
        return x

    def rotation_matrix(self, adapter: str) -> torch.Tensor:
        """The dense butterfly rotation R = M_m ⋯ M_0, (in, in)."""
        rotations = self.rotations(adapter)
        total = torch.eye(self.in_features, device=rotations.device, dtype=rotations.dtype)
        for level in range(rotations.shape[0]):
            perm, _ = (t.to(rotations.device) for t in self._perms[adapter][level])
            block = torch.block_diag(*rotations[level])  # (in, in)
            total = block[perm][:, perm] @ total  # P B Pᵀ, then left-multiplied as in PEFT
        return total

    def merged_weight(self, adapter: str) -> torch.Tensor:
        """``s ⊙ (W Rᵀ)`` in the adapter's dtype, (out, in) with W the base weight flattened to (out, in)."""
        scale = self.boft_s[adapter]  # fp32 (fp64 on fp64 models)
        weight = self.base_layer.weight.to(scale.dtype).reshape(self.out_features, self.in_features)
        rotation = self.rotation_matrix(adapter)  # (in, in)
        return (weight @ rotation.T) * scale.reshape(self.out_features, 1)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.boft_R:
            return {}
        return {"boft_R": f"boft_R.{adapter_name}", "boft_s": f"boft_s.{adapter_name}"}

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.boft_R:
            base = self.base_layer
            was_training = self.training
            self.eval()  # no dropout in what gets merged
            with torch.no_grad():
                merged = self.merged_weight(adapter)
            self.train(was_training)
            require_finite(merged, adapter)
            with torch.no_grad():
                base.weight.copy_(merged.reshape(base.weight.shape).to(base.weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        sizes = ", ".join(
            f"{name}: {self.boft_R[name].shape[0]}x{num}x{self.boft_block_size[name]}"
            for name, num in self.boft_block_num.items()
        )
        return f"{self.rotated_axis}={self.in_features}, out_features={self.out_features}, adapters=({sizes})"


class BOFTLinear(BOFTLayer):
    """A frozen ``nn.Linear`` whose input is rotated by a butterfly orthogonal matrix and whose
    output (before the bias) is scaled per feature."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.scale_shape = (base_layer.out_features, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapter
        if adapter is None or adapter not in self.boft_R:
            return self.base_layer(x, *args, **kwargs)
        dtype = x.dtype
        scale = self.boft_s[adapter]
        rotated = self.rotate(x.to(scale.dtype), adapter).to(dtype)
        result = self.base_layer(rotated, *args, **kwargs)
        bias = self.base_layer.bias
        if bias is None:
            return (result * scale.squeeze(-1)).to(dtype)
        return ((result - bias) * scale.squeeze(-1) + bias).to(dtype)  # the scale skips the bias
