"""R1-style reinforcement learning: rule rewards (rewards.py), GRPO's advantages and loss (grpo.py)."""
