"""`peftkit train` under torchrun with rank 1 made to fail at its third step (tests/test_distributed.py).

python -m torch.distributed.run --nproc_per_node 2 tests/_failing_rank.py raise|kill CONFIG.yaml
"""

import os
import signal
import sys

from peftkit.cli.main import main
from peftkit.train.distributed import World

how, config = sys.argv[1], sys.argv[2]
if os.environ.get("RANK") == "1":
    shard, calls = World.shard, []

    def failing_shard(self, examples):
        calls.append(1)
        if len(calls) == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1")
        return shard(self, examples)

    World.shard = failing_shard
sys.exit(main(["train", config, "--no-progress", "--overwrite"]))
