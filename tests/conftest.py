from pathlib import Path

import pytest
import torch

from gptlib import GPTConfig, GPTModel

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "lfs"


def tiny_config(**overrides) -> GPTConfig:
    values = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    values.update(overrides)
    return GPTConfig(**values)


@pytest.fixture
def tiny_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config()).eval()


@pytest.fixture
def fixture_dir() -> Path:
    if not (FIXTURES / "model_and_optimizer_tiny.pth").exists():
        pytest.skip("shared fixtures not present (../shared/fixtures/lfs)")
    return FIXTURES
