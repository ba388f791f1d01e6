"""Inference: the paged latent KV cache (cache.py); the engine itself is being built (see the open issue)."""
