"""Peak memory of one denoising call at Gemma's real vocabulary (262,144), measured with ftkit.profiling.

The model is a random-init DiffusionGemma with a small hidden size, so it runs on a CPU: what is measured is the
sampler's vocabulary-wide work (head, temperature, masks, softmax, entropy, draw, self-conditioning), which does not
depend on the hidden size. On a GPU the same table also gives torch.cuda.max_memory_allocated above the model.

    python bench/sampler_memory.py                          # CPU: batch 2 and 4 x canvas 64, default chunk
    python bench/sampler_memory.py --batch 16 --canvas 256  # the real eval shape (slow on a CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

VOCAB = 262_144


def measure(batch: int, canvas: int, chunk: int | None, steps: int, device: str) -> dict:
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.diffusion.sample import default_chunk, denoise, row_generators
    from ftkit.model.load import tiny_config
    from ftkit.profiling import PeakLiveBytes
    from ftkit.recipe import PresetSpec

    spec = dataclasses.replace(
        PresetSpec(),
        hidden=32,
        heads=2,
        kv_heads=1,
        head_dim=16,
        global_head_dim=32,
        intermediate=64,
        expert_intermediate=32,
        canvas_length=canvas,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = DiffusionGemmaForBlockDiffusion(tiny_config(spec, VOCAB)).to(device, dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(4, VOCAB, (batch, 16), generator=g, device=device)
    init = torch.randint(4, VOCAB, (batch, canvas), generator=g, device=device)
    fixed = torch.rand(batch, canvas, generator=g, device=device) < 0.3
    knobs = dict(
        steps=steps,
        temperature_min=0.0,
        temperature_max=0.7,
        entropy_bound=0.3,
        stability_threshold=2,
        confidence_threshold=0.05,
    )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    started = time.perf_counter()
    with PeakLiveBytes() as peak:
        denoise(
            model,
            prompt,
            torch.ones_like(prompt),
            init,
            fixed,
            generator=row_generators(0, batch, device),
            chunk=chunk,
            **knobs,
        )
    seconds = time.perf_counter() - started
    cuda_peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return {
        "batch": batch,
        "canvas": canvas,
        "chunk": chunk or default_chunk(VOCAB),
        "peak": peak.peak,
        "cuda_peak": cuda_peak,
        "logits": batch * canvas * VOCAB * 4,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--chunk", type=int, nargs="+", default=[0], help="positions per chunk; 0 = default")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("| batch | canvas | chunk | peak (MB) | x one fp32 (B, L, V) logits | cuda peak (MB) | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        for chunk in args.chunk:
            r = measure(batch, args.canvas, chunk or None, args.steps, device)
            cuda = f"{r['cuda_peak'] / 1e6:.0f}" if r["cuda_peak"] is not None else "-"
            print(
                f"| {r['batch']} | {r['canvas']} | {r['chunk']} | {r['peak'] / 1e6:.0f} | "
                f"{r['peak'] / r['logits']:.2f} | {cuda} | {r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
