"""Denoising throughput: canvases solved per second and tokens per decoder forward, ftkit's sampler
(ftkit.diffusion.sample.denoise) vs transformers' DiffusionGemma `generate`, same model, same prompts, same
sampler knobs (transformers' defaults: 48 steps, t 0.8 -> 0.4, entropy bound 0.1, stability 1, confidence 0.005).

One canvas per prompt (max_new_tokens = canvas_length), so both run the same number of decoder passes per step.

GPU (one H100/H200):   python bench/denoise_throughput.py --layers 4 [--experts-4bit]
CPU smoke test:        python bench/denoise_throughput.py --tiny
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def load(path: Path, experts_4bit: bool):
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.quant import quantize_experts
    from ftkit.recipe import QuantSection

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).to(bc.device()).eval()
    # `generate` compares prompts to image_token_id, which the text-only checkpoints leave unset (None); id 3 never
    # occurs in the synthetic prompts (they draw from 4 up).
    if model.config.image_token_id is None:
        model.config.image_token_id = 3
    if experts_4bit:
        quantize_experts(model, QuantSection(mode="4bit", compute_dtype="bfloat16" if cuda else "float32"))
        bc.free_memory()
    return model


def run_ftkit(model, prompt_ids, prompt_mask, canvas_length, knobs, seed):
    from ftkit.diffusion.sample import denoise

    batch = prompt_ids.shape[0]
    canvas_init = torch.zeros(batch, canvas_length, dtype=torch.long, device=prompt_ids.device)
    fixed = torch.zeros_like(canvas_init, dtype=torch.bool)
    result = denoise(
        model,
        prompt_ids,
        prompt_mask,
        canvas_init,
        fixed,
        steps=knobs["steps"],
        temperature_min=knobs["t_min"],
        temperature_max=knobs["t_max"],
        entropy_bound=knobs["entropy_bound"],
        stability_threshold=knobs["stability"],
        confidence_threshold=knobs["confidence"],
        generator=torch.Generator(device=prompt_ids.device).manual_seed(seed),
    )
    return float(result.tokens_per_forward), result.forward_passes


def run_generate(model, prompt_ids, prompt_mask, canvas_length, knobs, seed):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    torch.manual_seed(seed)  # generate draws from the global RNG
    # The saved benchmark checkpoints carry an empty generation_config (no eos/pad ids, unlike the released model's
    # generation_config.json). Without them generate neither pads after EOS nor excludes that fill from
    # tokens_per_forward, which would then count the whole canvas while ftkit counts up to the first EOS.
    text = model.config.get_text_config()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=canvas_length,
        max_denoising_steps=knobs["steps"],
        t_min=knobs["t_min"],
        t_max=knobs["t_max"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=knobs["entropy_bound"]),
        stability_threshold=knobs["stability"],
        confidence_threshold=knobs["confidence"],
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    )
    return float(out.tokens_per_forward.float().mean()), None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths on CPU (smoke test)")
    parser.add_argument("--layers", type=int, default=None, help="default 4 (tiny 2)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per call (default 8; tiny 2)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64; tiny 16)")
    parser.add_argument("--steps", type=int, default=None, help="max denoising steps (default 48; tiny 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per sampler (default 3; tiny 1)")
    parser.add_argument("--experts-4bit", action="store_true", help="run both samplers on ftkit's NF4 experts")
    parser.add_argument("--workdir", default="/tmp/ftkit-bench")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("true-width runs need a CUDA GPU; use --tiny on CPU")
    layers = args.layers or (2 if args.tiny else 4)
    batch = args.batch or (2 if args.tiny else 8)
    prompt = args.prompt or (16 if args.tiny else 64)
    repeats = args.repeats or (1 if args.tiny else 3)
    knobs = dict(
        steps=args.steps or (8 if args.tiny else 48),
        t_min=0.4,
        t_max=0.8,
        entropy_bound=0.1,
        stability=1,
        confidence=0.005,
    )

    path = Path(args.workdir) / f"denoise-L{layers}{'-tiny' if args.tiny else ''}"
    facts = bc.build_checkpoint(path, layers, args.tiny)
    model = load(path, args.experts_4bit)
    shutil.rmtree(path, ignore_errors=True)
    data = bc.synthetic_batch(batch, prompt, facts["canvas"], facts["vocab"])
    prompt_ids = data["input_ids"][:, :prompt].to(bc.device())
    prompt_mask = torch.ones_like(prompt_ids)
    print(
        f"device={bc.device()} tiny={args.tiny} layers={layers} batch={batch} prompt={prompt} "
        f"canvas={facts['canvas']} experts_4bit={args.experts_4bit} {knobs}"
    )

    rows = []
    for name, sampler in (("ftkit denoise", run_ftkit), ("transformers generate", run_generate)):
        stats = {}

        def call(stats=stats, sampler=sampler):  # bound now: called inside this iteration only
            stats["tpf"], stats["passes"] = sampler(model, prompt_ids, prompt_mask, facts["canvas"], knobs, seed=0)

        bc.free_memory()
        times = bc.timed(call, repeats, warmup=1)
        seconds = bc.median(times)
        rows.append(
            {
                "sampler": name,
                "canvases_s": batch / seconds,
                "s_per_call": seconds,
                "tokens_per_forward": stats["tpf"],
                "forward_passes": stats["passes"],
                "peak_gb": bc.peak_gb(),
            }
        )
    print("\ncanvases_s = batch / median wall time of one call (prompt encoding included)")
    print(bc.table(rows, ["sampler", "canvases_s", "s_per_call", "tokens_per_forward", "forward_passes", "peak_gb"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
