"""Judges of sampled answers, for learning from AI feedback (``objective: online_dpo | grpo`` and
``peftkit label-pairs``): Python reward functions, reward models and classifiers, and an LLM judge.

::

    judges = build_judges(job.reward, base_dir=config_dir, device="cuda", autocast_dtype=torch.bfloat16)
    scores = judges.score_groups(prompts, groups, columns)   # groups: the answers of each prompt
    scores.total          # [[0.8, None, ...], ...]: weighted sum over the judges that scored
    scores.per_judge      # {"exact_answer": [[1.0, 0.0, ...], ...], "judge": [...]}
    scores.unparseable    # {"judge": 2, ...}: verdicts the LLM judge wrote that could not be read

Each kind lives in its module: :mod:`.functions`, :mod:`.reward_model`, :mod:`.llm_judge`; the
weighted sum and its handling of missing scores in :mod:`.base`.
"""

from __future__ import annotations

from peftkit.judges.base import Completion, GroupScores, Judge, Judges, Prompt
from peftkit.judges.build import build_judges
from peftkit.judges.functions import FunctionJudge, load_reward_function

__all__ = [
    "Completion",
    "FunctionJudge",
    "GroupScores",
    "Judge",
    "Judges",
    "Prompt",
    "build_judges",
    "load_reward_function",
]
