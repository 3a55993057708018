"""One seed for every random number generator a run or a sampling command uses.

Not ``transformers.set_seed``: importing it imports ``transformers.trainer_utils``, which imports
PEFT where it is installed, and PEFT imports bitsandbytes, whose import on CPUs with AVX512-BF16
tries to fetch a kernel from the Hugging Face Hub and prints a warning that suggests
``trust_remote_code=True``: a plain ``peftkit generate`` must do none of that.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
