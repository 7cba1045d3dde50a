"""Shared pieces of the benchmarks: checkpoints (true-width or tiny, random weights, saved and reloaded through
`from_pretrained`), a fixed synthetic batch, memory/timing helpers, the linear fit over layer counts, tables."""

from __future__ import annotations

import gc
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from ftkit.model.arch import RELEASED, RELEASED_VOCAB

hf_logging.disable_progress_bar()  # keep the printed tables readable

# The real model (google/diffusiongemma-26B-A4B-it, ftkit.model.arch.RELEASED); only the layer count varies here.
TRUE_WIDTH = {"hidden_size": RELEASED["hidden"], "vocab_size": RELEASED_VOCAB}
TRUE_CANVAS = RELEASED["canvas_length"]
REAL_LAYERS = RELEASED["layers"]
PAD, EOS, BOS = 0, 1, 2


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def layer_types(layers: int) -> list[str]:
    # Gemma-style interleave: five sliding-window layers, then one full-attention layer; the last is always full.
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    types[-1] = "full_attention"
    return types


def true_width_config(layers: int):
    from ftkit.model.load import tiny_config
    from ftkit.recipe import PresetSpec

    spec = PresetSpec(**{**RELEASED, "layers": layers})
    # The released interleave, window, positions and global k=v heads (the tiny presets' defaults differ).
    return tiny_config(
        spec,
        RELEASED_VOCAB,
        PAD,
        EOS,
        BOS,
        layer_types=layer_types(layers),
        sliding_window=1024,
        max_position_embeddings=8192,
        num_global_key_value_heads=2,
    )


def tiny_spec(layers: int):
    from ftkit.recipe import PresetSpec

    # Hidden sizes divisible by the 4-bit blocksize (64).
    return PresetSpec(
        layers=layers,
        hidden=128,
        heads=4,
        kv_heads=2,
        head_dim=32,
        global_head_dim=64,
        intermediate=128,
        experts=8,
        top_k=2,
        expert_intermediate=64,
        canvas_length=32,
    )


def build_checkpoint(path: Path, layers: int, tiny: bool) -> dict:
    """Random-init checkpoint saved with save_pretrained (bf16 at true width, fp32 tiny). Returns its config facts."""
    from transformers import DiffusionGemmaForBlockDiffusion

    if path.exists():
        shutil.rmtree(path)
    if tiny:
        from ftkit.model.char_tokenizer import build_char_tokenizer
        from ftkit.model.load import build_tiny

        model = build_tiny(tiny_spec(layers), build_char_tokenizer())
    else:
        # Initialize straight on the GPU in bf16: a CPU fp32 init of ~1.5 GB per layer would dominate the run.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device()):
                model = DiffusionGemmaForBlockDiffusion(true_width_config(layers))
        finally:
            torch.set_default_dtype(previous)
    model.save_pretrained(path)
    facts = dict(vocab=model.config.text_config.vocab_size, canvas=model.config.canvas_length)
    del model
    free_memory()
    return facts


def synthetic_batch(batch: int, prompt: int, canvas: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch (ftkit.diffusion.token_layout.collate) of random prompts and canvases, the same for every
    method."""
    from ftkit.diffusion.token_layout import TokenLayout, collate

    g = torch.Generator().manual_seed(seed)
    layouts = []
    for _ in range(batch):
        prompt_ids = [BOS] + torch.randint(4, vocab, (prompt - 1,), generator=g).tolist()
        canvas_ids = torch.randint(4, vocab, (canvas,), generator=g).tolist()
        layouts.append(
            TokenLayout(
                prompt_ids=prompt_ids,
                canvas_ids=canvas_ids,
                fixed=[False] * canvas,
                content_length=canvas,
                char_starts=[],
            )
        )
    return collate(layouts, PAD)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int) -> list[float]:
    """Seconds per call of `fn` over `steps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass(frozen=True)
class Fit:
    slope: float
    intercept: float

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


def linear_fit(xs: list[float], ys: list[float]) -> Fit | None:
    """Least squares y = a + b x; None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return Fit(slope, my - slope * mx)


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = (
        [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        if cells
        else [len(c) for c in columns]
    )
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)])
