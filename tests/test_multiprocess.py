"""Two training processes (DDP over gloo on the CPU), launched the way `accelerate launch`/torchrun launch them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftkit.diffusion.loss import diffusion_loss
from ftkit.recipe import load_recipe
from ftkit.run import rundir


def _torchrun() -> str:
    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def test_two_process_training_shares_one_run_dir(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        _torchrun(),
        "--nproc_per_node",
        "2",
        "-m",
        "ftkit",
        "train",
        "recipes/tiny/sudoku.yaml",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "task.train_size=32",
        "train.batch_size=4",
        "train.logging_steps=1",
        "train.save_steps=2",
        "model.tiny.hidden=48",
        "model.tiny.head_dim=24",
        "model.tiny.global_head_dim=24",
        # the real recipes' memory settings: lean loss path, both stacks checkpointed
        "diffusion.loss_chunk=32",
        "train.gradient_checkpointing=true",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).resolve().parents[1])
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # logged once (main process), not twice
    # The Trainer logs `loss` averaged over both processes; the parts must be averaged alike (rank 0's own parts
    # would miss the total by half the ranks' difference): loss = diffusion + weight * encoder, step by step.
    weight = load_recipe(out / "recipe.yaml").diffusion.encoder_loss_weight
    for r in rows:
        assert r["loss"] == pytest.approx(r["diffusion_loss"] + weight * r["encoder_loss"], abs=2e-5), r
    # Each optimizer step consumed 2 processes x 4 examples of the 32: an epoch is 4 steps, not 8.
    assert rows[0]["epoch"] == 0.25
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "base" / "config.json").is_file()


@pytest.mark.parametrize("loss_chunk,quant", [(0, ""), (50, ""), (50, "4bit"), (50, "4bit shared")])
def test_ddp_gradients_are_the_mean_over_processes(tmp_path, loss_chunk, quant):
    """Both loss paths under DDP: every rank ends the step with the same LoRA gradients, equal to the mean of the two
    ranks' gradients computed without DDP. The lean path (loss_chunk > 0) calls the encoder/decoder/head directly,
    so this holds only because it runs as the DDP wrapper's forward. With 4-bit experts DDP must leave their
    stride-0 placeholders and NF4 buffers alone (its broadcast into a placeholder crashed at wrap time) while the
    expert LoRA gradients are still all-reduced. With one adapter for both stacks (lora.shared_stacks), each shared
    tensor is one DDP parameter whose gradient sums both stacks' uses before it is all-reduced."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
    import ddp_grads

    root = Path(__file__).resolve().parents[1]
    cmd = [
        _torchrun(),
        "--nproc_per_node",
        "2",
        str(root / "tests" / "helpers" / "ddp_grads.py"),
        str(tmp_path),
        str(loss_chunk),
        *quant.split(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model, batches = ddp_grads.setup(2, quantized="4bit" in quant, shared="shared" in quant)
    if "shared" in quant:
        from ftkit.model.shared_stacks import stacks_share_adapters

        assert stacks_share_adapters(model) and not any(".decoder." in n for n in ranks[0])  # one tensor, once
    if quant:
        from ftkit.model.quant import QuantizedExperts

        assert any(isinstance(m, QuantizedExperts) for m in model.modules())
        assert any(".experts." in n for n in ranks[0])  # the expert LoRA is among the all-reduced gradients
        synced = (tmp_path / "rank0-synced-buffers.txt").read_text().split()
        assert synced and not [n for n in synced if "_nf4." in n]  # NF4 codes are not re-sent every forward
    for rank, batch in enumerate(batches):
        diffusion_loss(model, batch, ddp_grads.config(loss_chunk), ddp_grads.generator(rank)).loss.backward()
    expected = {n: p.grad / 2 for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert len(expected) > 0 and all(g.abs().sum() > 0 for g in expected.values())
    for got in ranks:
        assert got.keys() == expected.keys()
        for name, g in expected.items():
            assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-7), name


def test_processes_of_a_node_load_the_base_one_at_a_time(tmp_path):
    """A 4-bit load holds the dense experts in host RAM until they are quantized: with N ranks on a node loading at
    once, N copies (~46 GB each at full depth). `ftkit train` loads through load_in_turns: the main process first
    (it may write the tiny base the others read), then one rank after another. Three processes, because the old
    main-process-first scheme already serialized two."""
    import json

    root = Path(__file__).resolve().parents[1]
    cmd = [_torchrun(), "--nproc_per_node", "3", str(root / "tests" / "helpers" / "load_turns.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spans = sorted((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)), key=lambda s: s["start"])
    assert [s["rank"] for s in spans] == [0, 1, 2]
    for before, after in zip(spans, spans[1:]):
        assert before["end"] <= after["start"], spans  # never two loads at once
    assert all(s["returned"] == f"model of rank {s['rank']}" for s in spans)  # each process gets its own load
