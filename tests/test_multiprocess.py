"""Two training processes (DDP over gloo on the CPU), launched the way `accelerate launch`/torchrun launch them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftkit import rundir
from ftkit.diffusion.loss import diffusion_loss


def _torchrun() -> str:
    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def test_two_process_training_shares_one_run_dir(tmp_path):
    out = tmp_path / "ddp"
    cmd = [_torchrun(), "--nproc_per_node", "2", "-m", "ftkit", "train", "recipes/tiny/sudoku.yaml",
           f"train.output_dir={out}", "train.max_steps=4", "task.train_size=32", "train.batch_size=4",
           "train.logging_steps=1", "train.save_steps=2", "model.tiny.hidden=48", "model.tiny.head_dim=24",
           "model.tiny.global_head_dim=24",
           # the real recipes' memory settings: lean loss path, both stacks checkpointed
           "diffusion.loss_chunk=32", "train.gradient_checkpointing=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # logged once (main process), not twice
    # Each optimizer step consumed 2 processes x 4 examples of the 32: an epoch is 4 steps, not 8.
    assert rows[0]["epoch"] == 0.25
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "base" / "config.json").is_file()


@pytest.mark.parametrize("loss_chunk", [0, 50])
def test_ddp_gradients_are_the_mean_over_processes(tmp_path, loss_chunk):
    """Both loss paths under DDP: every rank ends the step with the same LoRA gradients, equal to the mean of the two
    ranks' gradients computed without DDP. The lean path (loss_chunk > 0) calls the encoder/decoder/head directly,
    so this holds only because it runs as the DDP wrapper's forward."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
    import ddp_grads

    root = Path(__file__).resolve().parents[1]
    cmd = [_torchrun(), "--nproc_per_node", "2", str(root / "tests" / "helpers" / "ddp_grads.py"), str(tmp_path),
           str(loss_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model, batches = ddp_grads.setup(2)
    for rank, batch in enumerate(batches):
        diffusion_loss(model, batch, ddp_grads.config(loss_chunk), ddp_grads.generator(rank)).loss.backward()
    expected = {n: p.grad / 2 for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert len(expected) > 0 and all(g.abs().sum() > 0 for g in expected.values())
    for got in ranks:
        assert got.keys() == expected.keys()
        for name, g in expected.items():
            assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-7), name
