"""``bench.gpu --dry-run``: the GPU benchmark's code runs end to end on tiny shapes on the CPU, so
it cannot rot between the days a GPU is available; and its MFU arithmetic."""
import torch

from bench import gpu


def test_dry_run_prints_every_row():
    report = gpu.run(dry_run=True)
    print(report)
    for row in ("sparc, sdpa, batch 2", "clip, sdpa, batch 2", "projector + LoRA", "flamingo + LoRA",
                "projector + QLoRA 4-bit"):
        assert row in report
    assert "SPARC / CLIP step time (sdpa)" in report and "failed" not in report
    assert "skipped: QLoRA needs CUDA" in report and "n/a" in report  # no peak FLOP/s for a CPU


def test_mfu_against_the_peak_table():
    result = gpu.Result("stage two", "x", seconds=0.5, items=1000, unit="tokens/s", flops=int(247.25e12))
    assert "50.0%" in gpu.table([result], 989e12) and "2,000 tokens/s" in gpu.table([result], None)
    assert dict(gpu.PEAK_BF16)["H200"] == 989e12 and dict(gpu.PEAK_BF16)["A100"] == 312e12
    assert gpu.peak_flops(torch.device("cpu")) is None
