"""Inference: the continuous-batching engine (engine.py) over the paged latent KV cache (cache.py), with MLA's
absorbed decode step (decode.py), sampling and speculative verification (sampling.py), and streamed text and
reasoning (stream.py, reasoning.py). docs/engine.md has the design."""
