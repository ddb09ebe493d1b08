"""Each shipped tiny stage-one recipe builds exactly the model it built before the per-objective
config layout (same modules in the same order, same init for the same seed).

The expectations were measured on the commit before the re-layout (55f0ef3) with the same
tokenizer: number of state-dict entries and parameters, and two float64 checksums of the values.
"""
from pathlib import Path

import pytest
import torch

from encoders.config import Stage1Config
from encoders.dual_encoder import DualEncoder
from encoders.stage1_model import Stage1Model
from vlm.config import load_config
from vlm.data.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["a small red circle left of a large blue square.", "two green triangles.",
          "a yellow star above a purple circle.", "the large square is below the small star."] * 20

# recipe: (state-dict entries, parameters, sum |v|, sum over tensors of <v[:1000], arange>)
EXPECTED = {
    "clip": (142, 1699329, 63444.89743250001, 164173.3187657564),
    "siglip": (152, 1897090, 91738.75767694422, 148795.22484946376),
    "sparc": (144, 1715841, 64173.589765959485, 163988.0233010442),  # shared heads (paper), no local heads
    "flair": (153, 1766146, 67234.1044435188, 192288.76107654005),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, add_eos=True)


def fingerprint(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(sum of |values|, sum of each tensor's first 1000 values weighted by their index), float64."""
    total = sum(float(v.double().abs().sum()) for v in state.values())
    weighted = sum(float((v.double().flatten()[:1000] * torch.arange(min(1000, v.numel()), dtype=torch.float64)).sum())
                   for v in state.values())
    return total, weighted


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_recipe_builds_the_same_model(name, tokenizer):
    cfg = load_config(Stage1Config, ROOT / "configs" / "stage1" / f"{name}_tiny.yaml")
    torch.manual_seed(cfg.run.seed)  # as training.stage1.build_model
    model = Stage1Model.build(DualEncoder(cfg.model, tokenizer), cfg.objective)
    state = model.state_dict()
    entries, params, total, weighted = EXPECTED[name]
    assert len(tokenizer) == 300
    assert (len(state), sum(p.numel() for p in model.parameters())) == (entries, params)
    assert fingerprint(state) == pytest.approx((total, weighted), rel=1e-9)
