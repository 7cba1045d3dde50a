"""Memory budget of full-depth LoRA on DiffusionGemma 26B-A4B (30 layers), from exact counts and measured activations.

The issue: attention + expert LoRA (r=16) on all 30 layers, batch 8 x (64 prompt + 256 canvas), in <= 18 GB.
Without the GPU the full model needs, the script builds the budget from parts that are each counted or measured:

1. Weights at 30 layers. `DiffusionGemmaForBlockDiffusion(true_width_config(30))` is instantiated on the meta device
   (no memory): exact parameter counts per group, tied tensors once (encoder and decoder layers share one Parameter
   object). Which nn.Linear become bitsandbytes Linear4bit is asked of transformers' own bnb quantizer code
   (`get_modules_to_not_convert` + `replace_with_bnb_linear`, run on a meta copy with load_base's skip list). Bytes
   under bf16 / plain 4-bit (transformers load_in_4bit: 3-D experts stay bf16) / ftkit 4-bit (experts NF4 too) use
   the exact bnb NF4 size (4-bit codes + uint8 absmax per 64 + fp32 absmax2 per 256 blocks + code tables), checked
   against `bitsandbytes.functional.quantize_4bit`, against the experts ftkit quantized in (3), and against a tiny
   checkpoint loaded with `load_in_4bit` (which also shows whether tied 4-bit linears stay shared).
2. LoRA + optimizer at 30 layers. PEFT LoRA is attached to the meta model for each configuration (exact trainable
   parameter count, cross-checked by the formula r*(in+out) per Linear and E*r*(in+out) per expert tensor). Bytes per
   parameter for three optimizer set-ups; the bitsandbytes 8-bit AdamW state size is checked by stepping it once.
3. Activations, measured at the real widths with few layers through ftkit's real step (`attach_lora` r=16,
   `diffusion_loss` with loss_chunk > 0, backward), without and with both stacks checkpointed. Three meters:
   - `SavedActivations(exclude=model)`: bytes autograd saves for backward. It does not see what a non-reentrant
     checkpointed region keeps for its recompute (its inputs: one (B, S, H) hidden state per layer; printed
     analytically in their own column), nor the encoder's KV cache the checkpointed decoder reads.
   - `LiveBytes` (below): every storage an op creates, kept as a weak reference, so it knows what is alive at the end
     of the forward ("held": saved + checkpoint inputs + KV cache + anything else) and the peak over forward +
     backward. It works at the dispatcher level, so it sees what a GPU would allocate (a bnb dequantize is one bf16
     output, not the CPU kernel's int32/fp32 temporaries). The held bytes are attributed per layer, so the
     extrapolation to 30 layers can use the real mix (25 sliding + 5 full-attention layers) as well as a + b*L.
   - `LargestTensor(last_dim=vocab)`: no (B, L, vocab) tensor exists; the vocab-sized transient is one chunk's.
   CPU: an in-process random-init model (fp32 init, experts quantized by `quantize_experts`, then bf16 compute, like
   the GPU; nn.Linear stays bf16: bnb's Linear4bit saves nothing for backward, MatMul4Bit keeps only its packed
   weight, so the activations are the same); ftkit's grouped expert kernel (CUDA's path; torch has a CPU
   grouped_mm) instead of the slow loop fallback; a reduced vocabulary (`--vocab`, default 8000 — not 8192, which is
   also the full-attention q_proj width and would be mistaken for logits). In the lean path the head + CE are chunked
   and recomputed in backward, so nothing vocabulary-sized is held; the vocabulary only sets the size of the chunk
   transient, which LiveBytes scales to the real 262144. Measured at `--batch` (2) and scaled to `--target-batch` (8):
   every tensor is taken as linear in the batch except vocabulary-sized ones (one chunk of positions),
   weight-derived ones (dequantized experts, casts of LoRA factors) and weight-gradient-shaped ones in backward.
   `--check-batch 8` re-measures the smallest L at the target batch to test that scaling.
   CUDA: `load_base` (bnb 4-bit linears + ftkit NF4 experts, bf16) from a random-init checkpoint at the real
   vocabulary and batch 8; it also reports `torch.cuda.max_memory_allocated()` of the step (after a warm-up step
   that allocates the AdamW states) beside the prediction for that L.
4. Budget at 30 layers: ftkit 4-bit weights + vision tower + LoRA/optimizer + activations, against the goal.
   Activations (both stacks checkpointed) = the linear fit of the measured peak at 30 layers, or, if larger, what
   the forward leaves alive at 30 layers (the larger of the linear and the per-layer-type extrapolation) + the
   backward transient above it at the largest measured L (a layer's recompute + its dequantized experts, or a head
   chunk; gradients waiting for the encoder's backward make it grow slowly with L, which only the peak fit sees).

Commands (the same on a CPU and on one GPU):
    python bench/memory_budget.py                     # CPU: --batch 2 --vocab 8000; CUDA: --batch 8, real vocab
    python bench/memory_budget.py --layers 1,2,4      # more points for the fit (GPU)
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from ftkit.model import arch  # noqa: E402
from ftkit.model.arch import EXPERT_TENSORS  # noqa: E402

GB = 1e9  # decimal gigabytes, as in "18 GB"
REAL_VOCAB = bc.TRUE_WIDTH["vocab_size"]
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bnb 4-bit blocksize (QuantSection default) and its double-quant blocksize
ADAM8_BLOCK, ADAM8_MIN_SIZE = 256, 4096  # bnb 8-bit optimizers: blockwise states; smaller tensors keep fp32 states


def gb(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / GB


def dtype_of(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def section(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * 8}", flush=True)


@contextmanager
def quiet():
    """PEFT and transformers warn about things this script checks itself (e.g. PEFT's rank_pattern notice, which
    looks at module names only: the expert ranks it 'ignored' are verified by count below)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------------
# 1. Weights


def nf4_bytes(numel: int, blocksize: int = NF4_BLOCK, double_quant: bool = True) -> int:
    """Bytes of one tensor in bitsandbytes 4-bit: packed codes (2 per byte, padded to even), one absmax per block
    (fp32, or uint8 + per-256-block fp32 absmax2 + fp32 offset + 256-entry fp32 code with double quant), and the
    16-entry fp32 NF4 code table. Code tables are counted per tensor (an upper bound: bnb may share them)."""
    blocks = math.ceil(numel / blocksize)
    codes = (numel + 1) // 2 + 16 * 4
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 256 * 4 + 4


def quant_state_bytes(packed: torch.Tensor, state) -> int:
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [torch.as_tensor(state.offset), state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


def verify_nf4_formula() -> list[dict]:
    """quantize_4bit on real-width tensors (one attention weight, one with a ragged last block) vs the formula."""
    import bitsandbytes.functional as bnbf

    rows = []
    for shape in [(4096, 2816), (2816, 2112), (1000, 33)]:
        source = torch.randn(shape, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(source, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
        rows.append(
            {
                "check": f"quantize_4bit {shape}",
                "measured_B": quant_state_bytes(packed, state),
                "formula_B": nf4_bytes(source.numel()),
            }
        )
    return rows


def load_in_4bit_config():
    """load_base's bitsandbytes settings (ftkit.model.load.bnb_config), without the CPU placement of the experts."""
    from ftkit.model.load import bnb_config
    from ftkit.recipe import QuantSection

    return bnb_config(QuantSection(mode="4bit", experts=False))


def tiny_load_in_4bit_check(workdir: Path) -> dict:
    """A tiny checkpoint loaded the way load_base loads the real one (transformers load_in_4bit, bf16): are the tied
    encoder/decoder Linear4bit weights one tensor, and do its 4-bit weights take what the formula says?"""
    import bitsandbytes as bnb
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.model.load import build_tiny

    path = workdir / "tiny-4bit"
    build_tiny(bc.tiny_spec(2), build_char_tokenizer()).to(torch.bfloat16).save_pretrained(path)
    quant = load_in_4bit_config()
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    with quiet():
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            path, dtype=torch.bfloat16, quantization_config=quant, device_map={"": device}
        )
    enc = model.model.encoder.language_model.layers[0].self_attn.q_proj
    dec = model.model.decoder.layers[0].self_attn.q_proj
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    measured = sum(quant_state_bytes(w.data, w.quant_state) for w in weights.values())
    formula = sum(nf4_bytes(math.prod(w.quant_state.shape)) for w in weights.values())
    return {
        "tied_shared": enc.weight is dec.weight,
        "measured_B": measured,
        "formula_B": formula,
        "tensors": len(weights),
    }


def config_for(layers: int, vocab: int = REAL_VOCAB, default_vision: bool = False):
    """true_width_config(layers) with another vocabulary and, optionally, the default Gemma 4 vision tower (the
    benchmark's config carries a 1-layer stand-in)."""
    from transformers import DiffusionGemmaConfig, Gemma4VisionConfig

    cfg = bc.true_width_config(layers)
    cfg.text_config.vocab_size = vocab
    if default_vision:
        cfg = DiffusionGemmaConfig(
            text_config=cfg.text_config,
            vision_config=Gemma4VisionConfig(),
            canvas_length=bc.TRUE_CANVAS,
            boi_token_id=None,
            eoi_token_id=None,
            image_token_id=None,
        )
    return cfg


def meta_model(cfg) -> torch.nn.Module:
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        return DiffusionGemmaForBlockDiffusion(cfg).to(torch.bfloat16)


def bnb_4bit_module_names(cfg) -> set[str]:
    """Names of the modules transformers turns into Linear4bit under load_base's quantization config, from
    transformers' own code (its skip patterns match from the start of a name or as a suffix)."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    model = meta_model(cfg)
    quant = load_in_4bit_config()
    quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)
    skip = quantizer.get_modules_to_not_convert(model, quant.llm_int8_skip_modules, model._keep_in_fp32_modules)
    with quiet():
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quant)
    return {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


WEIGHT_GROUPS = (
    "embeddings = lm_head (tied)",
    "attention q/k/v/o",
    "dense MLP",
    "experts",
    "router",
    "self-conditioning MLP",
    "norms / scales",
    "vision tower + projection",
)


def weight_group(name: str) -> str:
    if "vision_tower" in name or "embed_vision" in name:
        return "vision tower + projection"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings = lm_head (tied)"
    if ".self_conditioning." in name:
        return "self-conditioning MLP"
    if ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if ".self_attn." in name and name.endswith("_proj.weight"):
        return "attention q/k/v/o"
    if ".mlp." in name:
        return "dense MLP"
    return "norms / scales"


@dataclass
class WeightGroup:
    params: int = 0
    tensors: int = 0
    bf16: int = 0
    plain_4bit: int = 0
    ftkit_4bit: int = 0
    quantized_by_bnb: int = 0  # tensors of this group transformers made Linear4bit


def weight_groups(model: torch.nn.Module, bnb_modules: set[str]) -> dict[str, WeightGroup]:
    """Per group: unique parameters (tied ones once: encoder and decoder hold the same Parameter) and their bytes
    under the three storage schemes."""
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    groups = {g: WeightGroup() for g in WEIGHT_GROUPS}
    for key, p in params.items():
        names = aliases[key]
        group = groups[weight_group(names[0])]
        n = p.numel()
        in_linear4bit = any(name.rsplit(".", 1)[0] in bnb_modules for name in names)
        is_expert = p.ndim == 3 and names[0].rsplit(".", 1)[-1] in EXPERT_TENSORS
        group.params += n
        group.tensors += 1
        group.bf16 += 2 * n
        group.plain_4bit += nf4_bytes(n) if in_linear4bit else 2 * n
        group.ftkit_4bit += nf4_bytes(n) if (in_linear4bit or is_expert) else 2 * n
        group.quantized_by_bnb += int(in_linear4bit)
    return groups


@dataclass
class Weights:
    groups: dict[str, WeightGroup]  # the model as built (its vision tower is the benchmark's 1-layer stand-in)
    vision_assumed: WeightGroup  # the vision tower of Gemma4VisionConfig() defaults
    buffers_numel: int

    def total(self, scheme: str, standin_vision: bool = True) -> int:
        groups = [g for name, g in self.groups.items() if standin_vision or not name.startswith("vision")]
        return sum(getattr(g, scheme) for g in groups)


def count_weights(layers: int, vocab: int = REAL_VOCAB) -> Weights:
    cfg = config_for(layers, vocab)
    model = meta_model(cfg)
    groups = weight_groups(model, bnb_4bit_module_names(cfg))
    vision_cfg = config_for(1, vocab, default_vision=True)
    vision = weight_groups(meta_model(vision_cfg), bnb_4bit_module_names(vision_cfg))["vision tower + projection"]
    return Weights(groups, vision, sum(b.numel() for b in model.buffers()))


def weights_table(w: Weights, layers: int) -> str:
    rows = []
    for name, g in w.groups.items():
        label = f"{name} (1-layer stand-in, as built)" if name.startswith("vision") else name
        rows.append(_weight_row(label, g))
    rows.append(
        _weight_row(
            f"text model total ({layers} layers)",
            _sum_groups([g for n, g in w.groups.items() if not n.startswith("vision")]),
        )
    )
    rows.append(_weight_row("vision tower: Gemma4VisionConfig() defaults (ASSUMED)", w.vision_assumed))
    return bc.table(
        rows, ["group", "params", "tensors", "bf16_GB", "plain_4bit_GB", "ftkit_4bit_GB", "bnb_4bit_tensors"]
    )


def _sum_groups(groups: list[WeightGroup]) -> WeightGroup:
    total = WeightGroup()
    for g in groups:
        for f in ("params", "tensors", "bf16", "plain_4bit", "ftkit_4bit", "quantized_by_bnb"):
            setattr(total, f, getattr(total, f) + getattr(g, f))
    return total


def _weight_row(label: str, g: WeightGroup) -> dict:
    return {
        "group": label,
        "params": g.params,
        "tensors": g.tensors,
        "bf16_GB": gb(g.bf16),
        "plain_4bit_GB": gb(g.plain_4bit),
        "ftkit_4bit_GB": gb(g.ftkit_4bit),
        "bnb_4bit_tensors": g.quantized_by_bnb,
    }


def skip_list_findings(w: Weights) -> list[str]:
    """Groups load_base keeps in full precision that transformers quantizes anyway (none, since its skip list is
    written as regexes: this re-checks it with transformers' own code)."""
    notes = []
    for group in ("router", "self-conditioning MLP", "vision tower + projection"):
        g = w.groups[group]
        if g.quantized_by_bnb:
            notes.append(
                f"{group}: {g.quantized_by_bnb} tensor(s) become Linear4bit although load_base keeps it "
                f"in full precision (ftkit.model.arch.KEEP_UNQUANTIZED)"
            )
    return notes


# ---------------------------------------------------------------------------------------------------------------
# 2. LoRA and optimizer


@dataclass(frozen=True)
class LoraPlan:
    name: str
    attention: bool = True  # q/k/v/o of both stacks, rank r
    expert_rank: int | None = None  # None: no expert LoRA
    expert_decoder_only: bool = False


def lora_plans(r: int) -> list[LoraPlan]:
    return [
        LoraPlan(f"attn+experts r{r} (issue)", expert_rank=r),
        *[LoraPlan(f"attn r{r} + experts r{k}", expert_rank=k) for k in (8, 4, 2) if k < r],
        LoraPlan(f"attn r{r} + experts r{r} decoder only", expert_rank=r, expert_decoder_only=True),
        LoraPlan(f"attention only r{r}"),
    ]


def lora_config(plan: LoraPlan, r: int, layers: int):
    """A PEFT LoraConfig with ftkit's targets (ftkit.model.lora.lora_targets) for this plan."""
    from peft import LoraConfig

    from ftkit.model.lora import lora_targets
    from ftkit.recipe import LoraSection

    regex, _ = lora_targets(LoraSection(r=r, attention=plan.attention, experts=False)) if plan.attention else (None, [])
    params: list[str] = []
    if plan.expert_rank is not None:
        section_ = LoraSection(r=r, attention=False, experts=True, encoder=not plan.expert_decoder_only)
        params = lora_targets(section_, layers)[1]
    rank_pattern = {}
    if plan.expert_rank is not None and plan.expert_rank != r:
        rank_pattern = {arch.EXPERT_PARAM_PATTERN: plan.expert_rank}
    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=regex or [],
        target_parameters=params or None,
        rank_pattern=rank_pattern,
        bias="none",
    )


def lora_formula_params(model: torch.nn.Module, config, plan: LoraPlan, r: int) -> int:
    """r*(in+out) per targeted Linear (each stack has its own adapter), E*k*(in+out) per targeted expert tensor."""
    total = 0
    targets = list(config.target_parameters or [])
    for name, module in model.named_modules():
        if config.target_modules and isinstance(module, torch.nn.Linear) and re.fullmatch(config.target_modules, name):
            total += r * (module.in_features + module.out_features)
        for pname in EXPERT_TENSORS:
            key = f"{name}.{pname}"
            p = module._parameters.get(pname)
            if p is not None and any(key == t or key.endswith("." + t) for t in targets):
                experts, out_features, in_features = p.shape
                total += experts * plan.expert_rank * (in_features + out_features)
    return total


def peft_trainable(plan: LoraPlan, r: int, layers: int) -> tuple[list[torch.Size], torch.dtype, int]:
    """Attach PEFT LoRA to a meta-device model: (trainable shapes, their dtype, formula count on the base)."""
    from peft import get_peft_model

    model = meta_model(config_for(layers))
    config = lora_config(plan, r, layers)
    formula = lora_formula_params(model, config, plan, r)
    with quiet():
        peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    dtypes = {p.dtype for p in trainable}
    return [p.shape for p in trainable], dtypes.pop() if len(dtypes) == 1 else None, formula


def adam8bit_state_bytes(numel: int) -> int:
    """bitsandbytes 8-bit Adam(W): two uint8 states + one fp32 absmax per 256 elements each; tensors below 4096
    elements keep two fp32 states. The two shared 256-entry quantization maps are left out (2 KB in all)."""
    if numel < ADAM8_MIN_SIZE:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / ADAM8_BLOCK)


def verify_adam8bit() -> dict:
    """One bnb AdamW8bit step on LoRA-shaped tensors (an attention A/B pair, an expert A) vs the formula."""
    import bitsandbytes as bnb

    shapes = [(16, 2816), (4096, 16), (2048, 2816), (1000,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    measured = sum(
        v.numel() * v.element_size()
        for p in params
        for k, v in opt.state[p].items()
        if torch.is_tensor(v) and not k.startswith("qmap")
    )
    return {
        "check": f"bnb AdamW8bit states {shapes}",
        "measured_B": measured,
        "formula_B": sum(adam8bit_state_bytes(math.prod(s)) for s in shapes),
    }


OPTIMIZERS = {
    "a": "fp32 params + fp32 grads + AdamW fp32 m,v (16 B/param; ftkit's default: PEFT keeps adapters fp32)",
    "b": "fp32 params + fp32 grads + bnb 8-bit AdamW (8 B + states ~2.03 B/param)",
    "c": "bf16 params + bf16 grads + bnb 8-bit AdamW (4 B + states ~2.03 B/param; needs autocast_adapter_dtype=False)",
}


def optimizer_bytes(shapes: list[torch.Size]) -> dict[str, int]:
    numels = [math.prod(s) for s in shapes]
    states8 = sum(adam8bit_state_bytes(n) for n in numels)
    total = sum(numels)
    return {"a": 16 * total, "b": 8 * total + states8, "c": 4 * total + states8}


@dataclass
class LoraRow:
    plan: LoraPlan
    trainable: int
    formula: int
    dtype: torch.dtype | None
    bytes: dict[str, int]


def count_lora(plans: list[LoraPlan], r: int, layers: int) -> list[LoraRow]:
    rows = []
    for plan in plans:
        shapes, dtype, formula = peft_trainable(plan, r, layers)
        rows.append(LoraRow(plan, sum(math.prod(s) for s in shapes), formula, dtype, optimizer_bytes(shapes)))
    return rows


def lora_table(rows: list[LoraRow]) -> str:
    out = [
        {
            "config": row.plan.name,
            "trainable (PEFT)": row.trainable,
            "formula": row.formula,
            "match": "yes" if row.trainable == row.formula else "NO",
            "dtype": str(row.dtype).removeprefix("torch."),
            "(a)_GB": gb(row.bytes["a"]),
            "(b)_GB": gb(row.bytes["b"]),
            "(c)_GB": gb(row.bytes["c"]),
        }
        for row in rows
    ]
    return bc.table(out, ["config", "trainable (PEFT)", "formula", "match", "dtype", "(a)_GB", "(b)_GB", "(c)_GB"])


# ---------------------------------------------------------------------------------------------------------------
# 3. Activations


@dataclass
class _Storage:
    ref: StorageWeakRef
    nbytes: int
    weighted: float
    kind: str  # "vocab", "weights" (computed from weights / weight-gradient-shaped) or "activations"
    from_weights: bool
    label: str


KINDS = ("activations", "weights", "vocab")


class LiveBytes(TorchDispatchMode):
    """A device-independent stand-in for torch.cuda.memory_allocated / max_memory_allocated: every storage an op
    creates inside the block is tracked through a weak reference, so `held()` tells what is still alive and `peak`
    the most that was alive at once. Storages that existed before (weights, grads, inputs: `ignore`) are not counted.

    Each storage is counted with a weight that projects the measured run onto the target one: vocabulary-sized
    tensors (last dim == vocab) x vocab_scale; tensors computed from weights alone, and weight-gradient-shaped
    tensors during backward, x 1; all others x batch_scale. `label` (set by layer hooks) attributes what is held."""

    def __init__(
        self,
        ignore: set[int],
        weights: set[int],
        vocab: int,
        vocab_scale: float,
        batch_scale: float,
        weight_shapes: set[tuple[int, ...]],
    ):
        super().__init__()
        self.ignore, self.weights, self.vocab = ignore, weights, vocab
        self.vocab_scale, self.batch_scale, self.weight_shapes = vocab_scale, batch_scale, weight_shapes
        self.label = "outside layers"
        self.backward = False
        self.peak = 0.0
        self.peak_in_backward = False
        self.peak_parts: dict[str, float] = {}  # weighted bytes by kind at the peak
        self.vocab_peak = 0  # unweighted bytes of vocabulary-sized tensors alive at once
        self._live: dict[int, _Storage] = {}
        self._vocab_live: dict[int, _Storage] = {}
        self._tracked = 0.0  # weighted bytes of _live, expired entries included until the next sweep

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_weights = bool(inputs) and all(self._is_weight(t) for t in inputs)
        added_vocab = False
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                added_vocab |= self._add(t, from_weights)
        if self._tracked > self.peak:  # only an allocation can raise the peak; sweep to see if it really did
            self._sweep()
            if self._tracked > self.peak:
                self.peak, self.peak_in_backward = self._tracked, self.backward
                self.peak_parts = self._by("kind")
        if added_vocab:
            self._sweep_vocab()
        return out

    def _is_weight(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.weights:
            return True
        entry = self._live.get(ptr)
        return entry is not None and entry.from_weights and not entry.ref.expired()

    def _add(self, t: torch.Tensor, from_weights: bool) -> bool:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not ptr or not nbytes or ptr in self.ignore:
            return False
        old = self._live.get(ptr)
        if old is not None:
            if not old.ref.expired():
                return False  # a view of, or an in-place result in, a storage already counted
            self._tracked -= old.weighted  # the address was freed and reused
        vocab = bool(self.vocab) and t.ndim > 0 and t.shape[-1] == self.vocab
        if vocab:
            kind, factor = "vocab", self.vocab_scale
        elif from_weights or (self.backward and tuple(t.shape) in self.weight_shapes):
            kind, factor = "weights", 1.0
        else:
            kind, factor = "activations", self.batch_scale
        entry = _Storage(StorageWeakRef(storage), nbytes, nbytes * factor, kind, from_weights, self.label)
        self._live[ptr] = entry
        self._tracked += entry.weighted
        if vocab:
            self._vocab_live[ptr] = entry
        return vocab

    def _sweep(self) -> None:
        for ptr in [p for p, e in self._live.items() if e.ref.expired()]:
            self._tracked -= self._live.pop(ptr).weighted
        self._tracked = max(self._tracked, 0.0)

    def _sweep_vocab(self) -> None:
        for ptr in [p for p, e in self._vocab_live.items() if e.ref.expired()]:
            del self._vocab_live[ptr]
        self.vocab_peak = max(self.vocab_peak, sum(e.nbytes for e in self._vocab_live.values()))

    def relabel(self, t: torch.Tensor, label: str) -> None:
        entry = self._live.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) else None
        if entry is not None and not entry.ref.expired():
            entry.label = label

    def _by(self, attribute: str, count: bool = False) -> dict[str, float]:
        totals: dict[str, float] = {}
        for e in self._live.values():
            key = getattr(e, attribute)
            totals[key] = totals.get(key, 0) + (1 if count else e.weighted)
        return totals

    def held(self) -> tuple[float, int, dict[str, float], dict[str, int]]:
        """(weighted bytes alive now, raw bytes alive now, weighted bytes by label, storages by label)."""
        self._sweep()
        raw = sum(e.nbytes for e in self._live.values())
        return self._tracked, raw, self._by("label"), self._by("label", count=True)


@contextmanager
def labelled_layers(model, meter: LiveBytes):
    """While active, storages created inside a text layer are labelled '<stack>/<layer type>', except the layer's
    output, labelled '<stack>/layer output': whether it stays alive depends on whether a next layer exists (it is the
    next checkpointed layer's input), not on the layer's type."""
    core = arch.unwrap_model(model)
    stacks = {"encoder": arch.encoder_layers(core), "decoder": arch.decoder_layers(core)}
    types = core.config.text_config.layer_types
    handles, previous = [], []

    def enter(label):
        def hook(module, args, kwargs=None):
            previous.append(meter.label)
            meter.label = label

        return hook

    def leave(stack):
        def hook(module, args, output):
            meter.label = previous.pop() if previous else "outside layers"
            meter.relabel(output, f"{stack}/layer output")

        return hook

    for stack, layers in stacks.items():
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter(f"{stack}/{types[i]}")))
            handles.append(layer.register_forward_hook(leave(stack)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def storage_ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


def build_model(layers: int, args):
    """Random-init model at the real widths with `layers` layers, frozen, 4-bit experts, LoRA r attached.
    Returns (peft model, notes dict)."""
    from ftkit.model.lora import attach_lora
    from ftkit.recipe import LoraSection, QuantSection

    cfg = config_for(layers, args.vocab)
    notes: dict = {}
    if torch.cuda.is_available():
        model = _load_base_on_gpu(cfg, layers, args)
        notes["weights_measured_B"] = torch.cuda.memory_allocated()
    else:
        from transformers import DiffusionGemmaForBlockDiffusion

        from ftkit.model.quant import expert_storage, quantize_experts, set_expert_kernel
        from ftkit.model.quant.grouped import has_native_grouped_mm

        with quiet():
            model = DiffusionGemmaForBlockDiffusion(cfg)  # fp32 init: bnb's CPU quantizer is fastest from fp32
        stats = quantize_experts(model, QuantSection(mode="4bit", compute_dtype=args.dtype))
        model.to(dtype_of(args.dtype))
        for p in model.parameters():
            p.requires_grad_(False)
        notes["experts_nf4_B"] = stats.bytes_after
        notes["experts_formula_B"] = sum(nf4_bytes(math.prod(s.shape)) for s in expert_storage(model))
        if has_native_grouped_mm():
            set_expert_kernel(model, "grouped")  # CUDA's kernel; the CPU loop fallback's backward is ~10x slower
        notes["expert_kernel"] = "grouped" if has_native_grouped_mm() else "loop"
    with quiet():
        model = attach_lora(model, LoraSection(r=args.r, alpha=2 * args.r))
    return model, notes


def _load_base_on_gpu(cfg, layers: int, args):
    """As ftkit trains the real model: a bf16 checkpoint loaded by load_base with quant.mode=4bit."""
    import shutil

    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.load import load_base
    from ftkit.recipe import ModelSection, QuantSection

    path = Path(args.workdir) / f"ckpt-L{layers}-V{args.vocab}"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"), quiet():
            DiffusionGemmaForBlockDiffusion(cfg).save_pretrained(path)
    finally:
        torch.set_default_dtype(previous)
    bc.free_memory()
    with quiet():
        model = load_base(
            ModelSection(base=str(path), dtype=args.dtype),
            QuantSection(mode="4bit", compute_dtype=args.dtype),
            tokenizer=None,
        )
    shutil.rmtree(path, ignore_errors=True)
    return model


def trainable_shapes(model) -> set[tuple[int, ...]]:
    """Shapes a weight gradient takes in backward: the LoRA parameters, their transposes, and the (E, r, in) /
    (E, out, r) / (out, r, E) views ftkit's 4-bit experts hand to the grouped GEMM."""
    shapes = set()
    for p in model.parameters():
        if p.requires_grad:
            shapes |= {tuple(p.shape), tuple(reversed(p.shape))}
    experts = model.get_base_model().config.text_config.num_experts
    for rows, cols in list(shapes):
        for r, c in ((rows, cols), (cols, rows)):
            if r % experts == 0:  # lora_A (E*k, in) -> (E, k, in)
                shapes.add((experts, r // experts, c))
            if c % experts == 0:  # lora_B (out, k*E) -> (E, out, k) and (out, k, E)
                shapes |= {(experts, r, c // experts), (r, c // experts, experts)}
    return shapes


@dataclass
class StepResult:
    layers: int
    checkpointed: bool
    batch: int
    saved_B: int = 0  # SavedActivations at the end of the forward (measured batch)
    held_B: int = 0  # LiveBytes alive at the end of the forward, raw
    held_w: float = 0.0  # the same, projected to the target batch and the real vocabulary
    held_by_label_w: dict[str, float] = field(default_factory=dict)
    held_count_by_label: dict[str, int] = field(default_factory=dict)
    peak_w: float = 0.0  # LiveBytes peak over forward + backward, projected
    peak_in_backward: bool = False
    peak_parts_w: dict[str, float] = field(default_factory=dict)
    vocab_peak_B: int = 0  # vocabulary-sized bytes alive at once, measured vocabulary
    largest_vocab_shape: tuple = ()
    ckpt_inputs_B: int = 0  # analytic, measured batch
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    self_conditioned: float = 0.0
    gpu_resident_B: int | None = None
    gpu_peak_B: int | None = None


def ckpt_input_bytes(layers: int, batch: int, args, checkpointed: bool) -> int:
    """What non-reentrant checkpointing keeps per checkpointed layer: its (B, S, H) input, S = prompt + canvas in
    the encoder and canvas in the decoder."""
    if not checkpointed:
        return 0
    hidden = bc.TRUE_WIDTH["hidden_size"]
    per_token = hidden * dtype_of(args.dtype).itemsize
    return layers * batch * (args.prompt + bc.TRUE_CANVAS) * per_token + layers * batch * bc.TRUE_CANVAS * per_token


def measure_step(model, layers: int, batch_size: int, args, checkpointed: bool) -> StepResult:
    from ftkit.diffusion.loss import diffusion_loss
    from ftkit.model.checkpointing import set_gradient_checkpointing
    from ftkit.profiling import LargestTensor, SavedActivations
    from ftkit.recipe import DiffusionSection

    dev = bc.device()
    batch = {k: v.to(dev) for k, v in bc.synthetic_batch(batch_size, args.prompt, bc.TRUE_CANVAS, args.vocab).items()}
    cfg = DiffusionSection(loss_chunk=args.loss_chunk, self_conditioning_p=args.self_conditioning_p)
    set_gradient_checkpointing(model, checkpointed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # grads resident before the step, as the budget counts them (no set_to_none)
        p.grad = torch.zeros_like(p)
    optimizer = None
    if torch.cuda.is_available():  # a warm-up step allocates the AdamW states, then the measured step runs
        optimizer = torch.optim.AdamW(trainable, lr=1e-6)
        diffusion_loss(model, batch, cfg, torch.Generator(device=dev).manual_seed(1)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        bc.free_memory()
    result = StepResult(
        layers, checkpointed, batch_size, ckpt_inputs_B=ckpt_input_bytes(layers, batch_size, args, checkpointed)
    )
    if torch.cuda.is_available():
        result.gpu_resident_B = torch.cuda.memory_allocated()
    weights = storage_ptrs([*model.parameters(), *model.buffers()])
    states = [t for s in (optimizer.state.values() if optimizer else []) for t in s.values() if torch.is_tensor(t)]
    ignore = weights | storage_ptrs([p.grad for p in trainable]) | storage_ptrs(batch.values()) | storage_ptrs(states)
    meter = LiveBytes(
        ignore, weights, args.vocab, REAL_VOCAB / args.vocab, args.target_batch / batch_size, trainable_shapes(model)
    )
    generator = torch.Generator(device=dev).manual_seed(0)
    with meter, LargestTensor(last_dim=args.vocab) as largest, labelled_layers(model, meter):
        start = time.perf_counter()
        with SavedActivations(exclude=model) as saved:
            out = diffusion_loss(model, batch, cfg, generator)
        bc.sync()
        result.fwd_s = time.perf_counter() - start
        result.held_w, result.held_B, result.held_by_label_w, result.held_count_by_label = meter.held()
        meter.backward = True
        start = time.perf_counter()
        out.loss.backward()
        bc.sync()
        result.bwd_s = time.perf_counter() - start
    result.saved_B = saved.bytes
    result.peak_w, result.peak_in_backward, result.peak_parts_w = meter.peak, meter.peak_in_backward, meter.peak_parts
    result.vocab_peak_B, result.largest_vocab_shape = meter.vocab_peak, largest.shape
    result.self_conditioned = float(out.self_conditioned)
    if torch.cuda.is_available():
        result.gpu_peak_B = torch.cuda.max_memory_allocated()
    del out, optimizer
    for p in trainable:
        p.grad = None
    bc.free_memory()
    return result


def measure_activations(args) -> tuple[list[StepResult], list[StepResult], dict[int, dict]]:
    """(results at --batch for every L and mode, results of the batch-scaling check, build notes by L)."""
    results, checks, notes = [], [], {}
    for layers in args.layer_list:
        start = time.perf_counter()
        model, notes[layers] = build_model(layers, args)
        notes[layers]["build_s"] = time.perf_counter() - start
        print(f"  L={layers}: built in {notes[layers]['build_s']:.0f}s", flush=True)
        for checkpointed in (False, True):
            r = measure_step(model, layers, args.batch, args, checkpointed)
            results.append(r)
            print(f"  L={layers} checkpointed={checkpointed}: fwd {r.fwd_s:.1f}s bwd {r.bwd_s:.1f}s", flush=True)
        if args.check_batch and layers == min(args.layer_list):
            r = measure_step(model, layers, args.check_batch, args, True)
            checks.append(r)
            print(
                f"  L={layers} checkpointed=True batch={args.check_batch}: fwd {r.fwd_s:.1f}s bwd {r.bwd_s:.1f}s",
                flush=True,
            )
        del model
        bc.free_memory()
    return results, checks, notes


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def measured_table(results: list[StepResult], args) -> str:
    """What the meters saw, at the measured batch and vocabulary."""
    rows = [
        {
            "L": r.layers,
            "ckpt": yes_no(r.checkpointed),
            "B": r.batch,
            "saved_GB": gb(r.saved_B),
            "saved/example_MB": r.saved_B / r.batch / 1e6,
            "held_GB": gb(r.held_B),
            "held-saved_GB": gb(r.held_B - r.saved_B),
            "ckpt_inputs_GB": gb(r.ckpt_inputs_B),
            "vocab_live_MB": r.vocab_peak_B / 1e6,
            "x_fp32_chunk": r.vocab_peak_B / (args.loss_chunk * args.vocab * 4),
            "largest_vocab_tensor": "x".join(map(str, r.largest_vocab_shape)) or "-",
            "self_cond": r.self_conditioned,
            "fwd_s": r.fwd_s,
            "bwd_s": r.bwd_s,
        }
        for r in results
    ]
    return bc.table(rows, list(rows[0]))


def projected_table(results: list[StepResult], args) -> str:
    """The same runs projected to the target batch and the real vocabulary; on CUDA beside the allocator's numbers."""
    rows = []
    for r in results:
        row = {
            "L": r.layers,
            "ckpt": yes_no(r.checkpointed),
            "B": r.batch,
            "held_GB": gb(r.held_w),
            "peak_GB": gb(r.peak_w),
            "peak-held_GB": gb(r.peak_w - r.held_w),
            "peak_in": "backward" if r.peak_in_backward else "forward",
        }
        row.update({f"at_peak_{k}_GB": gb(r.peak_parts_w.get(k, 0.0)) for k in KINDS})
        if torch.cuda.is_available():
            row.update({"gpu_max_alloc-resident_GB": gb(r.gpu_peak_B - r.gpu_resident_B)})
        rows.append(row)
    return bc.table(rows, list(rows[0]))


@dataclass
class Extrapolation:
    checkpointed: bool
    saved_fit: bc.Fit | None  # SavedActivations, target batch (uniform batch scaling)
    held_fit: bc.Fit | None  # LiveBytes held, projected
    peak_fit: bc.Fit | None
    held_by_type: float | None  # at `layers`, from per-layer attribution
    transient: float  # peak - held at the largest measured L, projected
    transient_fit: bc.Fit | None  # peak - held over L: what backward adds on top of the held bytes, per layer
    layers: int

    @property
    def held(self) -> float:
        """The larger of the two extrapolations of what the forward leaves alive (conservative)."""
        options = [v for v in (self.held_fit.at(self.layers) if self.held_fit else None, self.held_by_type) if v]
        return max(options)

    @property
    def activations(self) -> float:
        """Peak activation memory at `layers`: held + transient, or the fitted peak if that is larger."""
        return max(self.held + self.transient, self.peak_fit.at(self.layers) if self.peak_fit else 0.0)


def held_by_layer_type(r: StepResult, layers: int) -> float:
    """Held bytes at `layers` from one run's per-layer attribution: what is held outside the layers; for each stack
    the measured bytes per sliding / full-attention layer (its output aside) times that type's count at `layers`
    (a type the run did not contain borrows the other's); and the layer outputs still alive, one more per added
    layer (each is the next layer's checkpoint input)."""
    measured_types = bc.layer_types(r.layers)
    counts_measured = {t: measured_types.count(t) for t in set(measured_types)}
    counts_target = {t: bc.layer_types(layers).count(t) for t in ("sliding_attention", "full_attention")}
    total = r.held_by_label_w.get("outside layers", 0.0)
    for stack in ("encoder", "decoder"):
        per_layer = {t: r.held_by_label_w.get(f"{stack}/{t}", 0.0) / n for t, n in counts_measured.items()}
        for t, n in counts_target.items():
            total += n * per_layer.get(t, max(per_layer.values()))
        outputs = r.held_count_by_label.get(f"{stack}/layer output", 0)
        if outputs:
            total += r.held_by_label_w[f"{stack}/layer output"] / outputs * (outputs + layers - r.layers)
    return total


def held_by_label_table(r: StepResult, args) -> str:
    rows = [
        {
            "created in": label,
            "storages": r.held_count_by_label[label],
            "held_GB": gb(w),
            "per_layer_MB": w / max(1, bc.layer_types(r.layers).count(label.split("/")[1])) / 1e6
            if label.split("/")[-1] in ("sliding_attention", "full_attention")
            else None,
        }
        for label, w in sorted(r.held_by_label_w.items())
    ]
    return bc.table(rows, ["created in", "storages", "held_GB", "per_layer_MB"])


def extrapolate(results: list[StepResult], checkpointed: bool, layers: int, batch_scale: float) -> Extrapolation:
    runs = sorted((r for r in results if r.checkpointed == checkpointed), key=lambda r: r.layers)
    xs = [r.layers for r in runs]
    largest = runs[-1]
    return Extrapolation(
        checkpointed=checkpointed,
        saved_fit=bc.linear_fit(xs, [r.saved_B * batch_scale for r in runs]),
        held_fit=bc.linear_fit(xs, [r.held_w for r in runs]),
        peak_fit=bc.linear_fit(xs, [r.peak_w for r in runs]),
        held_by_type=held_by_layer_type(largest, layers),
        transient=largest.peak_w - largest.held_w,
        transient_fit=bc.linear_fit(xs, [r.peak_w - r.held_w for r in runs]),
        layers=layers,
    )


def fit_table(fits: list[Extrapolation], args) -> str:
    rows = []
    for e in fits:
        rows.append(
            {
                "ckpt": yes_no(e.checkpointed),
                "saved_GB/layer": gb(e.saved_fit.slope) if e.saved_fit else None,
                f"saved@{e.layers}_GB": gb(e.saved_fit.at(e.layers)) if e.saved_fit else None,
                "held_GB/layer": gb(e.held_fit.slope) if e.held_fit else None,
                f"held@{e.layers}_fit_GB": gb(e.held_fit.at(e.layers)) if e.held_fit else None,
                f"held@{e.layers}_by_type_GB": gb(e.held_by_type),
                f"peak@{e.layers}_fit_GB": gb(e.peak_fit.at(e.layers)) if e.peak_fit else None,
                f"transient@L{max(args.layer_list)}_GB": gb(e.transient),
                "transient_GB/layer": gb(e.transient_fit.slope) if e.transient_fit else None,
                f"activations@{e.layers}_GB": gb(e.activations),
            }
        )
    return bc.table(rows, list(rows[0]))


def batch_check_table(results: list[StepResult], checks: list[StepResult], args) -> str:
    rows = []
    for check in checks:
        base = next(r for r in results if r.layers == check.layers and r.checkpointed == check.checkpointed)
        for what, predicted, measured in (
            ("held", base.held_w, check.held_w),
            ("peak", base.peak_w, check.peak_w),
            (
                "saved (uniform x batch)",
                base.saved_B * args.target_batch / base.batch,
                check.saved_B * args.target_batch / check.batch,
            ),
        ):
            rows.append(
                {
                    "L": check.layers,
                    "quantity": what,
                    f"from B={base.batch}_GB": gb(predicted),
                    f"measured B={check.batch}_GB": gb(measured),
                    "error_%": 100 * (predicted - measured) / measured if measured else None,
                }
            )
    return bc.table(rows, list(rows[0]))


# ---------------------------------------------------------------------------------------------------------------
# 4. Budget


def budget_rows(weights30: Weights, lora30: list[LoraRow], ckpt: Extrapolation, args) -> list[dict]:
    weights_b = weights30.total("ftkit_4bit", standin_vision=False)
    vision_b = weights30.vision_assumed.ftkit_4bit
    rows = []
    for row in lora30:
        schemes = ("a", "b", "c") if row is lora30[0] else ("b",)
        for scheme in schemes:
            peak = weights_b + vision_b + row.bytes[scheme] + ckpt.activations
            rows.append(
                {
                    "config": row.plan.name,
                    "opt": scheme,
                    "weights_GB": gb(weights_b),
                    "vision*_GB": gb(vision_b),
                    "lora+opt_GB": gb(row.bytes[scheme]),
                    "activations_GB": gb(ckpt.activations),
                    "peak_GB": gb(peak),
                    f"fits {args.goal_gb:g} GB?": "yes" if peak <= args.goal_gb * GB else "no",
                    "margin_GB": args.goal_gb - peak / GB,
                }
            )
    return rows


def gpu_check_rows(
    results: list[StepResult], weights_at: dict[int, Weights], lora_at: dict[int, LoraRow], args
) -> list[dict]:
    """At each measured L: the budget's formula (weights + LoRA/AdamW fp32 (a) + this run's held + transient) vs
    torch.cuda.max_memory_allocated() of the same step."""
    rows = []
    for r in results:
        w = weights_at[r.layers].total("ftkit_4bit")  # the stand-in vision tower the run built
        resident = w + lora_at[r.layers].bytes["a"]
        rows.append(
            {
                "L": r.layers,
                "ckpt": yes_no(r.checkpointed),
                "B": r.batch,
                "pred_resident_GB": gb(resident),
                "gpu_resident_GB": gb(r.gpu_resident_B),
                "pred_peak_GB": gb(resident + r.peak_w),
                "gpu_max_alloc_GB": gb(r.gpu_peak_B),
                "error_%": 100 * (resident + r.peak_w - r.gpu_peak_B) / r.gpu_peak_B if r.gpu_peak_B else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,2", help="layer counts measured in part 3 (comma-separated)")
    parser.add_argument("--batch", type=int, default=8 if cuda else 2, help="measured batch (CPU 2, CUDA 8)")
    parser.add_argument("--target-batch", type=int, default=8, help="batch of the budget (the issue's 8)")
    parser.add_argument(
        "--check-batch",
        type=int,
        default=0 if cuda else 8,
        help="re-measure the smallest L, checkpointed, at this batch: tests the batch scaling (0: off)",
    )
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument(
        "--vocab",
        type=int,
        default=REAL_VOCAB if cuda else 8000,
        help="vocabulary of the measured model (CPU 8000; the head transient is scaled to 262144)",
    )
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (attention; experts in the issue's row)")
    parser.add_argument("--loss-chunk", type=int, default=256, help="DiffusionSection.loss_chunk (lean path)")
    parser.add_argument(
        "--self-conditioning-p",
        type=float,
        default=1.0,
        help="1.0: every example takes the self-conditioning pass (the most memory a step takes)",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="compute dtype of the measured model (bf16, as ftkit trains)",
    )
    parser.add_argument("--goal-gb", type=float, default=18.0)
    parser.add_argument("--workdir", default="/tmp/ftkit-memory-budget")
    parser.add_argument("--skip-activations", action="store_true", help="parts 1 and 2 only")
    parser.add_argument(
        "--budget-layers",
        type=int,
        default=bc.REAL_LAYERS,
        help="depth of parts 1 and 2 (the real 30; fewer only to smoke-test the script quickly)",
    )
    args = parser.parse_args(argv)
    args.layer_list = sorted({int(x) for x in args.layers.split(",") if x})
    if args.budget_layers != bc.REAL_LAYERS and not args.skip_activations:
        parser.error("--budget-layers is for --skip-activations smoke runs: the budget of part 4 is at 30 layers")
    if args.vocab != REAL_VOCAB:
        clash = vocab_clash(args)
        if clash:
            parser.error(
                f"--vocab {args.vocab} equals a model/batch dimension ({clash}): the meters identify "
                f"vocabulary-sized tensors by their last dimension; pick another size (e.g. 8000)"
            )
    return args


def vocab_clash(args) -> str | None:
    """A model or batch dimension equal to the measured vocabulary would be mistaken for logits."""
    model = meta_model(config_for(max(args.layer_list), vocab=1))
    dims = {d for p in model.parameters() for d in p.shape}
    seq = args.prompt + bc.TRUE_CANVAS
    for b in {args.batch, args.target_batch, args.check_batch or args.batch}:
        dims |= {b * seq, b * bc.TRUE_CANVAS, b * (seq - 1), args.loss_chunk}
    return "weights or tokens" if args.vocab in dims else None


def report_weights(args) -> tuple[Weights, list[dict]]:
    section(f"1. Weights at {args.budget_layers} layers (meta device: exact counts, no memory)")
    weights30 = count_weights(args.budget_layers)
    checks = verify_nf4_formula()
    tiny = tiny_load_in_4bit_check(Path(args.workdir))
    checks.append(
        {
            "check": f"tiny checkpoint load_in_4bit: {tiny['tensors']} Linear4bit weights",
            "measured_B": tiny["measured_B"],
            "formula_B": tiny["formula_B"],
        }
    )
    print(weights_table(weights30, args.budget_layers))
    print(
        f"bnb NF4, blocksize {NF4_BLOCK}, double quant. Buffers (rotary tables, scalars: "
        f"{weights30.buffers_numel:,} elements) are not counted."
    )
    print(
        f"Tied encoder/decoder 4-bit linears after load_in_4bit share one tensor: {yes_no(tiny['tied_shared'])} "
        f"(so they are counted once)."
    )
    for note in skip_list_findings(weights30):
        print(f"NOTE: {note}")
    return weights30, checks


def report_lora(args, checks: list[dict]) -> list[LoraRow]:
    section(f"2. LoRA and optimizer at {args.budget_layers} layers (PEFT attached on the meta device)")
    lora30 = count_lora(lora_plans(args.r), args.r, args.budget_layers)
    checks.append(verify_adam8bit())
    for key, text in OPTIMIZERS.items():
        print(f"({key}) {text}")
    print(lora_table(lora30))
    print("\nFormula checks (bytes)")
    for c in checks:
        c["match"] = yes_no(c["measured_B"] == c["formula_B"])
    print(bc.table(checks, ["check", "measured_B", "formula_B", "match"]))
    return lora30


def report_builds(notes: dict[int, dict], args) -> None:
    for layers, n in notes.items():
        if "experts_nf4_B" in n:
            same = yes_no(n["experts_nf4_B"] == n["experts_formula_B"])
            print(
                f"L={layers}: experts as ftkit stored them in NF4 {n['experts_nf4_B']:,} B, formula "
                f"{n['experts_formula_B']:,} B (match: {same}); expert kernel {n['expert_kernel']}; "
                f"build {n['build_s']:.0f}s"
            )
        else:
            formula = count_weights(layers, args.vocab).total("ftkit_4bit")
            print(
                f"L={layers}: GPU memory after load_base {gb(n['weights_measured_B']):.3f} GB, ftkit 4-bit formula "
                f"{gb(formula):.3f} GB; build {n['build_s']:.0f}s"
            )


def report_activations(args) -> list[StepResult]:
    section("3. Activations, measured at the real widths")
    results, batch_checks, notes = measure_activations(args)
    print(
        f"\nMeasured: batch {args.batch} x ({args.prompt} prompt + {bc.TRUE_CANVAS} canvas), vocab {args.vocab}, "
        f"{args.dtype}, loss_chunk {args.loss_chunk}, LoRA r{args.r} attn+experts, self-conditioning p "
        f"{args.self_conditioning_p:g}"
    )
    print(measured_table(results, args))
    print(
        f"saved = SavedActivations(exclude=model) at the end of the forward; held = LiveBytes: everything the "
        f"forward left alive (saved + checkpoint inputs + KV cache ...); ckpt_inputs = analytic B x S x H x "
        f"{dtype_of(args.dtype).itemsize} B per checkpointed layer (S: encoder {args.prompt + bc.TRUE_CANVAS}, "
        f"decoder {bc.TRUE_CANVAS}), which SavedActivations does not see. vocab_live = vocabulary-sized bytes alive "
        f"at once (forward + backward); x_fp32_chunk = the same in units of one fp32 logits chunk "
        f"({args.loss_chunk} x {args.vocab} x 4 B)."
    )
    print(
        f"\nProjected to batch {args.target_batch} and vocab {REAL_VOCAB} (LiveBytes weights: vocabulary-sized "
        f"tensors x {REAL_VOCAB}/{args.vocab}, one chunk of positions whatever the batch; weight-derived and "
        f"weight-gradient-shaped tensors x 1; all other tensors x {args.target_batch}/B: activations are linear "
        f"in the batch)"
    )
    print(projected_table(results, args))
    report_builds(notes, args)
    if batch_checks:
        print(
            f"\nBatch-scaling check: measured at B={args.batch} vs at B={args.check_batch}, both projected onto "
            f"batch {args.target_batch}, vocab {REAL_VOCAB}"
        )
        print(batch_check_table(results, batch_checks, args))
    for r in results:
        if r.layers == max(args.layer_list):
            print(
                f"\nHeld at the end of the forward by where it was created, L={r.layers}, checkpointed="
                f"{yes_no(r.checkpointed)} (projected to batch {args.target_batch})"
            )
            print(held_by_label_table(r, args))
    return results


def report_extrapolation(results: list[StepResult], args) -> Extrapolation:
    section(f"Extrapolation to {bc.REAL_LAYERS} layers (batch {args.target_batch}, vocab {REAL_VOCAB})")
    batch_scale = args.target_batch / args.batch
    fits = [extrapolate(results, ckpt, bc.REAL_LAYERS, batch_scale) for ckpt in (False, True)]
    print(fit_table(fits, args))
    ckpt = fits[1]
    largest = max((r for r in results if r.checkpointed), key=lambda r: r.layers)
    types30 = bc.layer_types(bc.REAL_LAYERS)
    print(
        f"Fits: a + b*L over L={args.layer_list}. by_type: from the L={largest.layers} run, held outside the layers "
        f"+ per encoder/decoder layer of each type x the {bc.REAL_LAYERS}-layer mix "
        f"({types30.count('sliding_attention')} sliding + {types30.count('full_attention')} full) + the layer "
        f"outputs held (one more per added layer). transient = peak - held (what backward adds on top: a layer's "
        f"recompute, its dequantized experts, gradients still waiting for their consumer). activations = max(peak "
        f"fit, max(held fit, by_type) + transient at L={largest.layers}); the second term is a lower bound when "
        f"the transient grows with L."
    )
    saved30 = ckpt.saved_fit.at(bc.REAL_LAYERS) if ckpt.saved_fit else largest.saved_B * batch_scale
    inputs30 = ckpt_input_bytes(bc.REAL_LAYERS, args.target_batch, args, True)
    head = largest.vocab_peak_B * REAL_VOCAB / args.vocab
    print(
        f"Cross-check, checkpointed, {bc.REAL_LAYERS} layers: the brief's sum, saved {gb(saved30):.3f} GB + "
        f"checkpoint inputs {gb(inputs30):.3f} GB (analytic) + head transient {gb(head):.3f} GB "
        f"({largest.vocab_peak_B / (args.loss_chunk * args.vocab * 4):.2f} x {args.loss_chunk} x {REAL_VOCAB} x 4 B) "
        f"= {gb(saved30 + inputs30 + head):.3f} GB, leaves out the KV cache and the backward's layer recompute + "
        f"dequantized experts; LiveBytes: {gb(ckpt.activations):.3f} GB"
    )
    return ckpt


def report_budget(
    weights30: Weights, lora30: list[LoraRow], ckpt: Extrapolation, results: list[StepResult], args
) -> None:
    section(
        f"4. Budget at {bc.REAL_LAYERS} layers, batch {args.target_batch} x ({args.prompt} + {bc.TRUE_CANVAS}), "
        f"both stacks checkpointed, loss_chunk {args.loss_chunk}"
    )
    rows = budget_rows(weights30, lora30, ckpt, args)
    print(bc.table(rows, list(rows[0])))
    print(
        f"weights = ftkit 4-bit text model (table 1); vision* = Gemma4VisionConfig() defaults, ASSUMED for the real "
        f"checkpoint, quantized as transformers does; lora+opt = table 2; activations = the checkpointed "
        f"extrapolation above, measured with the issue's LoRA (r{args.r} attn+experts) and used for every row (an "
        f"upper bound for smaller ranks / fewer targets). GB = 1e9 bytes."
    )
    if torch.cuda.is_available():
        weights_at = {L: count_weights(L, args.vocab) for L in args.layer_list}
        lora_at = {L: count_lora(lora_plans(args.r)[:1], args.r, L)[0] for L in args.layer_list}
        print(
            "\nGPU check at the measured L: prediction (weights formula + LoRA with AdamW fp32 (a), as the measured "
            "step ran + LiveBytes peak) vs torch.cuda.max_memory_allocated()"
        )
        rows = gpu_check_rows(results, weights_at, lora_at, args)
        print(bc.table(rows, list(rows[0])))


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    dev = bc.device()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device={dev} ({name}) torch={torch.__version__}")
    print("args: " + " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "layer_list"))
    timings = {}

    def timed(part: str, fn, *fn_args):
        start = time.perf_counter()
        out = fn(*fn_args)
        timings[part] = time.perf_counter() - start
        return out

    weights30, checks = timed("1 weights", report_weights, args)
    lora30 = timed("2 LoRA", report_lora, args, checks)
    if not args.skip_activations:
        results = timed("3 activations", report_activations, args)
        ckpt = timed("extrapolation", report_extrapolation, results, args)
        timed("4 budget", report_budget, weights30, lora30, ckpt, results, args)
    print(
        "\nTimings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f", total {sum(timings.values()):.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
