"""Shared fixtures: tiny models built from presets, never downloaded."""

import pytest
import torch

from nanoseek import Transformer, preset


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    with torch.no_grad():  # a non-zero balancing bias, so tests see it take effect
        for layer in model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.normal_(0, 0.05)
    return model
