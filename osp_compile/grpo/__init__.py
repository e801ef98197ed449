"""Mix-GRPO reinforcement learning on the transformed video DiT (OSP-Next's RL stage).

Public API:
  MixGRPOConfig, MixGRPOTrainer          the trainer (trainer.py, config.py)
  lora_adapters, adapters_disabled, save_adapters, load_adapters, merge_adapters
                                         LoRA adapters added by `passes.lora.lora_pass` (lora.py)
  LatentColour, BUILTIN_REWARDS          offline rewards (rewards.py)
  cli.run_train_grpo, cli.add_train_grpo_arguments   ``osp-compile train-grpo``
The SDE step, log-probability and KL are pure functions in `sde.py`; advantages and the PPO-clip
loss in `advantages.py`; data parallelism in `distributed.py`.
"""
from .config import MixGRPOConfig
from .lora import adapters_disabled, find_adapters, load_adapters, lora_adapters, merge_adapters, save_adapters
from .rewards import BUILTIN_REWARDS, LatentColour
from .trainer import GroupRollout, MixGRPOTrainer

__all__ = [
    "MixGRPOConfig",
    "MixGRPOTrainer",
    "GroupRollout",
    "lora_adapters",
    "find_adapters",
    "adapters_disabled",
    "save_adapters",
    "load_adapters",
    "merge_adapters",
    "LatentColour",
    "BUILTIN_REWARDS",
]
