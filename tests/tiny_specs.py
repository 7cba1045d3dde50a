"""The tiny DiffusionGemma shapes the tests build: the real classes and code paths, a few thousand parameters."""

from ftkit.recipe import PresetSpec

# Two layers (one sliding-window, one full-attention), 4 experts top-2 beside the dense MLP.
TINY = {
    "layers": 2,
    "hidden": 48,
    "heads": 2,
    "kv_heads": 1,
    "head_dim": 24,
    "global_head_dim": 24,
    "intermediate": 64,
    "experts": 4,
    "top_k": 2,
    "expert_intermediate": 32,
}
# Widths that are multiples of the 4-bit block size (64), for the quantization tests.
QUANT_TINY = {
    **TINY,
    "hidden": 128,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 32,
    "global_head_dim": 64,
    "intermediate": 128,
    "expert_intermediate": 64,
}


def tiny_dims(canvas_length: int, base: dict = TINY, **changes) -> dict:
    """A recipe's `model.tiny` mapping: `base` with this canvas and any other dimension changed."""
    return {**base, "canvas_length": canvas_length, **changes}


def tiny_spec(canvas_length: int, base: dict = TINY, **changes) -> PresetSpec:
    return PresetSpec(**tiny_dims(canvas_length, base, **changes))
