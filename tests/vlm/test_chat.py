"""``vlm generate`` and ``vlm chat`` on tiny checkpoints of both bridges, and on their LLaVA export."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tiny_vlm import perturb_trainable, random_images, vlm_config
from vlm.cli import main
from vlm.model.chat import ChatSession, Decoding
from vlm.model.export import export_llava
from vlm.model.vision_language_model import VisionLanguageModel

QUESTIONS = ["Is there a red circle in the image?", "Describe the image briefly.", "How many objects? 2"]


@pytest.fixture(scope="module", params=["projector", "flamingo"])
def ckpt(request, tmp_path_factory, tiny_tower_dir, tiny_llm_dir):
    """A saved tiny checkpoint (random bridge and LoRA, as after training) and two images."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir, request.param))
    perturb_trainable(model, seed=2)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out / "ckpt")
    for k, arr in enumerate(random_images(2, seed=4, size=40)):
        Image.fromarray(arr).save(out / f"{k}.png")
    return out


def answers_of(stdout: str) -> list[str]:
    """The streamed answers of a chat transcript: what follows each "> " prompt, one line each."""
    return [part.split("\n")[0].strip() for part in stdout.split("> ")[1:] if part.strip()]


def expected_chat(model, images, script):
    """What ``ChatSession`` answers to ``script`` (questions, or ("image", k) to switch), greedily."""
    session, out = ChatSession(model, images[0], Decoding(max_new_tokens=12)), []
    for step in script:
        if isinstance(step, tuple):
            session.set_image(images[step[1]])
        else:
            out.append(session.ask(step))
    return out, session


def test_generate_streams_the_greedy_answer(ckpt, capsys):
    model = VisionLanguageModel.from_pretrained(ckpt / "ckpt")
    image = Image.open(ckpt / "0.png").convert("RGB")
    want = model.generate(model.image_transform(image).unsqueeze(0), [QUESTIONS[0]], max_new_tokens=12)[0]
    capsys.readouterr()
    rc = main(["generate", "--ckpt", str(ckpt / "ckpt"), "--image", str(ckpt / "0.png"), "--prompt", QUESTIONS[0],
               "--max-new-tokens", "12"])
    assert rc == 0 and want and capsys.readouterr().out.strip() == want


def test_generate_sampling_is_seeded(ckpt, capsys):
    args = ["generate", "--ckpt", str(ckpt / "ckpt"), "--image", str(ckpt / "0.png"), "--prompt", QUESTIONS[1],
            "--max-new-tokens", "12", "--sample", "--temperature", "1.5", "--no-stream"]
    outs = []
    for seed in ("1", "1", "2"):
        capsys.readouterr()
        assert main([*args, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out.strip())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_chat_multi_turn_and_image_switch(ckpt, capsys, monkeypatch):
    """The terminal session answers each turn from the whole conversation so far; /image starts a
    new conversation with the other image. The transcript equals ChatSession's answers; a first
    turn is exactly ``model.generate`` on the question."""
    model = VisionLanguageModel.from_pretrained(ckpt / "ckpt")
    images = [Image.open(ckpt / f"{k}.png").convert("RGB") for k in (0, 1)]
    script = [QUESTIONS[0], QUESTIONS[1], ("image", 1), QUESTIONS[1], QUESTIONS[2]]
    want, session = expected_chat(model, images, script)
    assert len(session.turns) == 4 and session.turns[0] == ("human", QUESTIONS[1])
    lines = [q if isinstance(q, str) else f"/image {ckpt / '1.png'}" for q in script] + ["/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    capsys.readouterr()
    assert main(["chat", "--ckpt", str(ckpt / "ckpt"), "--image", str(ckpt / "0.png"), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "now looking at" in out
    got = [a for a in answers_of(out) if not a.startswith("(")]
    assert got == want
    fresh = ChatSession(model, images[0], Decoding(max_new_tokens=12)).ask(QUESTIONS[1])
    assert model.generate(model.image_transform(images[0]).unsqueeze(0), [QUESTIONS[1]], max_new_tokens=12)[0] == fresh


def test_chat_with_hf_model_equals_ckpt(tmp_path, tiny_tower_dir, tiny_llm_dir, capsys, monkeypatch):
    """``vlm chat --hf-model`` on the LLaVA export answers as ``--ckpt`` does, turn by turn."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir))
    perturb_trainable(model, seed=2)
    model.eval().save_pretrained(tmp_path / "ckpt")
    export_llava(model, tmp_path / "llava")
    Image.fromarray(random_images(1, seed=9, size=40)[0]).save(tmp_path / "0.png")
    transcripts = []
    for flag, path in (("--ckpt", "ckpt"), ("--hf-model", "llava")):
        monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(QUESTIONS) + "\n"))
        capsys.readouterr()
        assert main(["chat", flag, str(tmp_path / path), "--image", str(tmp_path / "0.png"),
                     "--max-new-tokens", "12"]) == 0
        transcripts.append(answers_of(capsys.readouterr().out))
    assert transcripts[0] == transcripts[1] and len(transcripts[0]) == 3
