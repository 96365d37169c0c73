"""Fine-tuning and post-training: LoRA / QLoRA, weight-only quantisation, distillation into hybrids,
DPO, GRPO, best-of-n / majority-vote sampling.

The modules wrap a model from outside and never change its class. ``lora`` and ``quantize`` need the
``post`` extra (peft, torchao), imported when they are first used; the others need only torch.
"""

from seqblocks.post.distill import DistillConfig, distill, init_student_from_teacher, student_config
from seqblocks.post.dpo import DPOConfig, dpo_loss, load_preferences, train_dpo
from seqblocks.post.grpo import CopyPrompts, GRPOConfig, copy_reward, group_advantages, grpo_loss, train_grpo
from seqblocks.post.runner import LoopConfig, LoopResult, run_loop
from seqblocks.post.sampling import best_of_n, majority, majority_vote, sample_n

__all__ = ["DistillConfig", "distill", "init_student_from_teacher", "student_config", "DPOConfig", "dpo_loss",
           "load_preferences", "train_dpo", "CopyPrompts", "GRPOConfig", "copy_reward", "group_advantages",
           "grpo_loss", "train_grpo", "LoopConfig", "LoopResult", "run_loop", "best_of_n", "majority",
           "majority_vote", "sample_n"]
