"""Training: the shared loop pieces (common.py), torchrun data parallel (dist.py), pretraining and SFT."""
