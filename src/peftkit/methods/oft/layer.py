"""The OFT layer for ``nn.Linear``: rotate the input block by block, then apply the frozen layer.

    x (..., in) ──► split into r blocks (..., r, b) ──► each block @ R_i (b, b) ──► base_layer ──► y

    R_i = Cayley(Q_i) = (I - Q_i)(I + Q_i)⁻¹      Q_i skew-symmetric, from b(b-1)/2 parameters
        ≈ I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)  (PEFT's Neumann form, n = num_cayley_neumann_terms)

Orthogonal R keeps the angles between the layer's input features ("hyperspherical energy").
Merging folds the rotation into the weight: ``W' = W Rᵀ`` with R the (in, in) block-diagonal
matrix, since ``y = W (x R)ᵀ``. Parameters live in ``oft_R`` (an ``nn.ModuleDict`` of
:class:`OFTRotation` keyed by adapter name, as in PEFT), so state-dict keys match:
``q_proj.oft_R.default.weight`` in the model, ``q_proj.oft_R.weight`` in files.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftkit.methods.layers import WrappedLayer, adapter_dtype
from peftkit.methods.merging import require_finite
from peftkit.methods.oft.config import OFTConfig


def nearest_divisor(n: int, value: int) -> int:
    """PEFT's fallback for a block size (or r) that does not divide ``n``: the closest divisor."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


class OFTRotation(nn.Module):
    """One adapter's rotation blocks: ``weight`` (blocks, b(b-1)/2) holds the upper triangles of Q_i.

    ``blocks`` is 1 with ``block_share`` (one rotation repeated ``n_blocks`` times), else ``n_blocks``.
    """

    def __init__(self, n_blocks: int, block_size: int, config: OFTConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.n_blocks, self.block_size = n_blocks, block_size
        self.block_share = config.block_share
        self.coft, self.eps = config.coft, config.eps
        self.use_cayley_neumann = config.use_cayley_neumann
        self.num_cayley_neumann_terms = config.num_cayley_neumann_terms
        n_elements = block_size * (block_size - 1) // 2
        stored = 1 if config.block_share else n_blocks
        self.weight = nn.Parameter(torch.zeros(stored, n_elements, device=device, dtype=dtype))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows.to(device), persistent=False)
        self.register_buffer("cols", cols.to(device), persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        """(blocks, b(b-1)/2) -> skew-symmetric (blocks, b, b)."""
        b = self.block_size
        upper = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
        upper[:, self.rows, self.cols] = vec
        return upper - upper.transpose(-2, -1)

    def project(self) -> None:
        """COFT: pull each Q_i back into a Frobenius ball of radius eps / sqrt(blocks) (in place)."""
        with torch.no_grad():
            q = self.skew(self.weight)  # (blocks, b, b)
            eps = self.eps / torch.sqrt(torch.tensor(q.shape[0]))
            norm = torch.norm(q, dim=(1, 2), keepdim=True)
            q = torch.where(norm <= eps, q, eps * (q / norm))
            self.weight.copy_(q[:, self.rows, self.cols])

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks R_i, (blocks, b, b), in the weight's dtype."""
        if self.coft:
            self.project()
        q = self.skew(self.weight)
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
        if not self.use_cayley_neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)  # (I - Q)(I + Q)⁻¹
        terms = self.num_cayley_neumann_terms
        rotation = eye.clone()
        if terms > 1:
            rotation = rotation + 2.0 * q
        if terms > 2:  # same order of operations as PEFT, for bit-level agreement
            power = torch.bmm(q, q)
            rotation = rotation + 2.0 * power
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                rotation = rotation + 2.0 * power
            rotation = rotation + torch.bmm(power, q)
        return rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the last axis of ``x`` (..., in) block by block."""
        dtype = x.dtype
        x = x.to(self.weight.dtype)
        rotation = self.rotations()  # (blocks, b, b)
        if self.block_share:
            rotation = rotation.repeat(self.n_blocks, 1, 1)
        blocks = x.reshape(*x.shape[:-1], self.n_blocks, self.block_size)  # (..., r, b)
        rotated = torch.einsum("...rk,rkc->...rc", blocks, rotation)
        return rotated.reshape(x.shape).to(dtype)

    def matrix(self) -> torch.Tensor:
        """The full block-diagonal rotation, (in, in)."""
        rotation = self.rotations()
        blocks = [rotation[0 if self.block_share else i] for i in range(self.n_blocks)]
        return torch.block_diag(*blocks)

    def extra_repr(self) -> str:
        return f"blocks={self.n_blocks}, block_size={self.block_size}, block_share={self.block_share}"


class OFTLinear(WrappedLayer):
    """A frozen ``nn.Linear`` whose input is rotated by a learned block-diagonal orthogonal matrix."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.oft_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: OFTConfig) -> None:
        """Add (or replace) ``adapter_name``: identity rotations (PEFT's default) or random ones."""
        r, size = config.r, config.oft_block_size
        n = self.in_features
        if r == 0:  # PEFT's rule: a size that does not divide in_features becomes the nearest divisor
            if n % size != 0 or size > n:
                adjusted = nearest_divisor(n, size)
                warnings.warn(
                    f"oft_block_size={size} does not divide in_features={n}; using {adjusted}", stacklevel=2
                )
                size = adjusted
            r = n // size
        else:
            if n % r != 0 or r > n:
                adjusted = nearest_divisor(n, r)
                warnings.warn(f"r={r} does not divide in_features={n}; using {adjusted}", stacklevel=2)
                r = adjusted
            size = n // r
        weight = self.base_layer.weight
        rotation = OFTRotation(r, size, config, device=weight.device, dtype=adapter_dtype(weight.dtype))
        if not config.init_weights:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        self.oft_R[adapter_name] = rotation
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = size

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.active_adapter
        if adapter is None or adapter not in self.oft_R:
            return self.base_layer(x, *args, **kwargs)
        dtype = x.dtype
        x = self.oft_R[adapter](x)
        return self.base_layer(x.to(dtype), *args, **kwargs).to(dtype)

    def adapter_params(self, adapter_name: str) -> dict[str, str]:
        return {"oft_R.weight": f"oft_R.{adapter_name}.weight"} if adapter_name in self.oft_R else {}

    def unwrap(self, merge: bool) -> nn.Module:
        adapter = self.active_adapter
        if merge and adapter is not None and adapter in self.oft_R:
            base = self.base_layer
            with torch.no_grad():
                rotation = self.oft_R[adapter].matrix().float()  # (in, in)
                merged = base.weight.float() @ rotation.T  # (out, in): W' = W Rᵀ
            require_finite(merged, adapter)
            with torch.no_grad():
                base.weight.copy_(merged.to(base.weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{name}: r={r}x{self.oft_block_size[name]}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({sizes})"
