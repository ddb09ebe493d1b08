"""DDP under torchrun (2 CPU processes, gloo): same final parameters as one process with the full batch."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import distributed
from training.loop import train
from vlm.config import OptimConfig, RunConfig

ROOT = Path(__file__).resolve().parents[2]

TOY = textwrap.dedent("""
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from training.data import ResumableBatches

    class Reg(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        def forward(self, batch):
            return {"loss": ((self.net(batch["x"]) - batch["y"]) ** 2).mean()}

    def data(batch_size, rank, world_size):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=g)
        y = x[:, :1] * x[:, 1:2]
        return ResumableBatches(len(x), batch_size, lambda ids: {"x": x[ids], "y": y[ids]}, seed=2,
                                rank=rank, world_size=world_size)

    def export(model, d):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    Reg.save_pretrained = export

    OPTIM = dict(lr=0.02, warmup_steps=2, max_steps=8, grad_accum=2, grad_clip=0.5, weight_decay=0.1)
""")

SCRIPT = TOY + textwrap.dedent("""
    import sys
    from training import distributed
    from training.loop import train
    from vlm.config import OptimConfig, RunConfig
    info = distributed.setup("cpu")
    assert info.world_size == 2 and torch.distributed.is_initialized()
    run = RunConfig(out_dir=sys.argv[1], ckpt_every=4, log_every=2, progress=False, tensorboard=False, device="cpu")
    train(Reg(), data(6, info.rank, info.world_size), OptimConfig(**OPTIM), run)
    torch.distributed.destroy_process_group()
""")


def test_ddp_two_processes_match_single_process_full_batch(tmp_path):
    script = tmp_path / "ddp_toy.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "ddp")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    toy: dict = {}
    exec(compile(TOY, "toy", "exec"), toy)
    model = toy["Reg"]()
    run = RunConfig(out_dir=str(tmp_path / "single"), ckpt_every=100, progress=False, tensorboard=False, device="cpu")
    train(model, toy["data"](12, 0, 1), OptimConfig(**toy["OPTIM"]), run)  # 2 ranks x 6 = 12 per micro-step

    ddp = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(ddp["net.0.weight"], toy["Reg"]().state_dict()["net.0.weight"])  # it trained

    ck = tmp_path / "ddp" / "checkpoints" / "step_00000008"
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file()
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["micro_batches"] == 16
    rows = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and all(r["samples_per_s"] > 0 for r in rows)


def test_setup_without_torchrun_is_single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = distributed.setup("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and distributed.is_main() and not torch.distributed.is_initialized()
    distributed.barrier()
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert distributed.resolve_device("auto") == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            distributed.resolve_device("cuda")
