"""One DDP training step of the diffusion loss, for tests/test_multiprocess.py.

usage: torchrun --nproc_per_node 2 tests/helpers/ddp_grads.py OUT_DIR LOSS_CHUNK [4bit] [shared]
Each rank builds the same tiny LoRA model (with `4bit`: its experts quantized by ftkit.model.quant, fp32 compute; with
`shared`: one adapter for both stacks, lora.shared_stacks), takes its own batch, runs the same forward/backward
twice through a DistributedDataParallel wrapper over gloo and saves its LoRA gradients to OUT_DIR/rank{R}.pt and the
names of the buffers DDP syncs before each forward to OUT_DIR/rank{R}-synced-buffers.txt.
`setup` is shared with the test, which computes the same step without DDP.
"""

import sys
from pathlib import Path

import torch

from ftkit.diffusion.loss import diffusion_loss
from ftkit.diffusion.token_layout import collate, layout_example
from ftkit.model.char_tokenizer import build_char_tokenizer
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.recipe import DiffusionSection, LoraSection, PresetSpec, QuantSection
from ftkit.tasks.sudoku import SudokuTask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_train import TINY  # noqa: E402  (the tests' tiny model, shared)

CANVAS = TINY["canvas_length"]


def setup(world: int, quantized: bool = False, shared: bool = False):
    """The model and one batch per rank (disjoint examples)."""
    tok = build_char_tokenizer()
    spec = PresetSpec(**TINY)
    base = build_tiny(spec, tok)
    if quantized:
        from ftkit.model.quant import quantize_experts

        quantize_experts(base, QuantSection(mode="4bit", compute_dtype="float32", blocksize=64))
    torch.manual_seed(0)  # PEFT draws lora_A from the global RNG
    model = attach_lora(base, LoraSection(r=4, alpha=8, shared_stacks=shared))
    # lora_B starts at zero, which would leave lora_A's gradient zero: perturb every LoRA tensor so all are checked.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    examples = SudokuTask().build_dataset("test", 3 * world, 0)
    batches = [
        collate(
            [layout_example(tok, SudokuTask().to_prompt_canvas(e), CANVAS, 256) for e in examples[3 * r : 3 * r + 3]],
            tok.pad_token_id,
        )
        for r in range(world)
    ]
    return model, batches


def config(loss_chunk: int) -> DiffusionSection:
    return DiffusionSection(loss_chunk=loss_chunk, self_conditioning_p=0.5)


def generator(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 + rank)


def main(out: Path, loss_chunk: int, quantized: bool, shared: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = setup(world, quantized, shared)
    # As the Trainer wraps it: broadcast_buffers stays at its default (True).
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    for _ in range(2):  # the same step twice: the second forward re-syncs the buffers first
        model.zero_grad(set_to_none=True)
        diffusion_loss(ddp, batches[rank], config(loss_chunk), generator(rank)).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    torch.save(grads, out / f"rank{rank}.pt")
    (out / f"rank{rank}-synced-buffers.txt").write_text("\n".join(ddp.named_module_buffers))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), "4bit" in sys.argv[3:], "shared" in sys.argv[3:])
