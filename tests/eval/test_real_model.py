"""The harness and the drift eval on a real (tiny, untrained) VisionLanguageModel checkpoint: the
contracts between eval and vlm.model.vision_language_model (from_pretrained, image_transform, generate, score) hold."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vlm"))
tiny_vlm = pytest.importorskip("tiny_vlm")

from eval.harness import run_vlm_eval  # noqa: E402
from eval.lm_eval_adapter import run_language_drift  # noqa: E402
from vlm.config import WorldConfig  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vlm.model.vision_language_model import VisionLanguageModel

    root = tmp_path_factory.mktemp("real")
    llm = tiny_vlm.save_tiny_llm(root / "llm")
    tower = tiny_vlm.save_tiny_tower(root / "tower")
    model = VisionLanguageModel.build(tiny_vlm.vlm_config(tower, llm))
    tiny_vlm.perturb_trainable(model)
    model.save_pretrained(root / "ckpt")
    return root / "ckpt"


def test_harness_on_real_checkpoint(ckpt, tmp_path):
    world = tmp_path / "world"
    s = run_vlm_eval(str(ckpt), ["pope", "vsr", "refcoco", "chair"], tmp_path / "out", world_dir=world,
                     world_cfg=WorldConfig(n_train=4, n_eval=3), limit=2, batch_size=2, progress=False)
    assert (world / "world.json").is_file()  # exported on first use
    for split in ("random", "popular", "adversarial"):
        assert s["pope"][split]["n"] == 2 and 0.0 <= s["pope"][split]["accuracy"] <= 1.0
    assert s["vsr"]["n"] == 2 and s["refcoco"]["n"] == 2 and s["chair"]["n_captions"] == 2
    assert s["checkpoint"] == str(ckpt)
    assert (tmp_path / "out" / "summary.md").is_file()


def test_language_drift_on_real_checkpoint(ckpt, tmp_path):
    texts = [t for t in tiny_vlm.corpus() if len(t) > 10][:6]
    res = run_language_drift(ckpt, tmp_path / "drift", texts=texts)
    assert all(math.isfinite(v) for side in ("before", "after") for v in res[side].values())
    assert res["after"]["bits_per_byte"] != res["before"]["bits_per_byte"]  # the perturbed LoRA is active


def test_blank_image_reaches_the_model(ckpt, tmp_path):
    """--blank-image: the tower sees uniform pixels of the processor's mean colour, in every task."""
    from vlm.model.vision_language_model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(ckpt)
    seen = []
    model.tower.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().cpu()))
    mean = (model.image_transform.mean, model.image_transform.std)
    expected = [(round(255 * m) / 255 - m) / s for m, s in zip(*mean)]
    s = run_vlm_eval(model, ["pope", "vsr", "refcoco"], tmp_path / "out", world_dir=tmp_path / "world",
                     world_cfg=WorldConfig(n_train=4, n_eval=3), limit=2, batch_size=2, progress=False,
                     blank_image=True)
    assert s["blank_image"] is True and len(seen) >= 5  # 3 POPE splits, VSR, RefCOCO
    for pixels in seen:
        assert pixels.shape[1:] == (3, 32, 32)
        flat = pixels.flatten(2)
        assert torch.equal(flat.amax(-1), flat.amin(-1))  # constant per channel
        assert torch.allclose(flat[:, :, 0], torch.tensor(expected).expand(len(pixels), 3), atol=1e-5)
