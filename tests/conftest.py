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


def assert_weights_close(expected: dict, actual: dict, rtol: float) -> None:
    """Each tensor of ``actual`` within ``rtol`` of ``expected``, measured as ||actual - expected|| / ||expected||.

    Norm-wise rather than element by element: two runs that add the same numbers in another order (other batch
    splits) differ by float rounding, which AdamW's first steps (about lr times the gradient's sign) turn into
    whole-step differences on the few weights whose gradient is almost exactly zero."""
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        a, b = tensor.double(), actual[name].double()
        error = float((a - b).norm() / a.norm().clamp_min(1e-12))
        assert error <= rtol, f"{name}: relative difference {error:.2e} > {rtol:.0e}"
