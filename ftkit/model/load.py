"""Load the DiffusionGemma base (hub id, local directory, or a random-init preset), quantized or not, through
transformers or Unsloth; load a full fine-tune; make every weight trainable (`train.trainable: full`).

LoRA is attached by `ftkit.model.lora`; where the model's parts are (module names, experts, embeddings) is
`ftkit.model.arch`'s.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from ftkit.errors import FtkitError
from ftkit.model import arch
from ftkit.recipe import PRESETS, ModelSection, PresetSpec, QuantSection
from ftkit.run.paths import RunPaths

log = logging.getLogger(__name__)
T = TypeVar("T")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tiny_config(spec: PresetSpec, vocab_size: int, pad_id: int = 0, eos_id: int = 1, bos_id: int = 2, **text_fields):
    """A DiffusionGemma config with the real architecture (sliding + full attention layers, MoE beside a dense MLP,
    k=v global layers, self-conditioning) at CPU-friendly width. The vision tower is kept minimal. `text_fields`: any
    other text-config field (a benchmark's layer interleave or window)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig, Gemma4VisionConfig

    layer_types = ["sliding_attention"] * (spec.layers - 1) + ["full_attention"]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        global_head_dim=spec.global_head_dim,
        num_global_key_value_heads=max(1, spec.kv_heads // 2),
        num_experts=spec.experts,
        top_k_experts=spec.top_k,
        moe_intermediate_size=spec.expert_intermediate,
        layer_types=layer_types,
        sliding_window=512,
        max_position_embeddings=4096,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
    )
    text = DiffusionGemmaTextConfig(**{**fields, **text_fields})
    vision = Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        position_embedding_size=64,
    )
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=spec.canvas_length,
        boi_token_id=None,
        eoi_token_id=None,
        image_token_id=None,
    )


def build_tiny(spec: PresetSpec, tokenizer) -> torch.nn.Module:
    from transformers import DiffusionGemmaForBlockDiffusion

    config = tiny_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = DiffusionGemmaForBlockDiffusion(config)
        # The head is tied to the frozen embeddings and the final norm is frozen, so a logit can reach at most about
        # |h|*|e| = hidden * embedding_std; at the default init (0.02) that is ~2 nats for hidden 96 and the model
        # could never be confident. A larger embedding scale stands in for what pretraining would have learned.
        torch.nn.init.normal_(arch.decoder_token_embedding(model).weight, std=spec.embedding_std)
    return model.float()


def resolve_base(model_cfg: ModelSection, run_dir: Path | None = None) -> str:
    """The path or hub id to load weights from. A preset run saves its random-init base under `run_dir/base`."""
    if model_cfg.base in PRESETS:
        if run_dir is None:
            raise FtkitError(f"the {model_cfg.base} preset needs a run directory to hold its base weights")
        return str(RunPaths(run_dir).base)
    return model_cfg.base


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def base_is_local(base: str) -> bool:
    """True for a local directory, False for a hub id (owner/name). A path that does not exist is an error, not a hub
    id: `runs/quickstart` run from another directory must not become 20 retried downloads of a repo `runs/quickstart`.
    It looks like a path when it starts with `.`, `/` or `~`, has more than one `/`, or its first part is a local
    directory."""
    path = Path(base).expanduser()
    if path.exists():
        return True
    first = base.split("/", 1)[0]
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base or (first and Path(first).is_dir()):
        raise FtkitError(
            f"model.base={base!r}: no such directory {path.resolve()} (a relative path is taken from the "
            "current directory)"
        )
    if not HUB_ID.fullmatch(base):
        raise FtkitError(f"model.base={base!r}: neither a local directory nor a hub id (owner/name)")
    return False


def _hub_failure(base: str, what: str, error: OSError, reason: str | None) -> FtkitError:
    """The one line for a model.base that did not load: offline (or the Hub unreachable) and not cached, or the
    loader's own reason."""
    if reason is not None:
        from ftkit.hub.access import not_cached

        return FtkitError(not_cached("model.base", base, reason))
    where = "" if Path(base).exists() else f"no local directory {Path(base).resolve()}, and "
    return FtkitError(f"model.base={base!r}: {where}cannot load {what} ({error.__class__.__name__}: {error})")


def _hub_reason(base: str) -> str | None:
    """For a hub id: why the Hub cannot be used, if it cannot (ftkit.hub.access: fails fast instead of retrying)."""
    if base_is_local(base):
        return None
    from ftkit.hub.access import offline_reason

    return offline_reason()


def load_tokenizer(model_cfg: ModelSection, run_dir: Path | None = None):
    from transformers import AutoTokenizer

    if model_cfg.base in PRESETS:
        if run_dir is not None and (run_dir / RunPaths.TOKENIZER_REQUIRED[0]).is_file():
            return AutoTokenizer.from_pretrained(run_dir)
        from ftkit.model.char_tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    reason = _hub_reason(model_cfg.base)
    try:
        return AutoTokenizer.from_pretrained(model_cfg.base, revision=model_cfg.revision)
    except OSError as e:
        raise _hub_failure(model_cfg.base, "its tokenizer", e, reason) from None


def load_base(model_cfg: ModelSection, quant: QuantSection, tokenizer, run_dir: Path | None = None) -> torch.nn.Module:
    """The frozen base model. A preset (`tiny`, `small`): built from `model.tiny` (and saved to `run_dir/base` for
    later reloads) unless the run already holds it; otherwise `from_pretrained` with optional 4-bit quantization
    (experts included: they load on the CPU and reach the GPU one dense tensor at a time, each quantized there before
    the next).
    `model.loader: unsloth` loads either through Unsloth's FastDiffusionModel instead (`load_with_unsloth`)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.compat import check_transformers

    check_transformers()
    if model_cfg.base in PRESETS:
        base_dir = Path(resolve_base(model_cfg, run_dir))
        # A preset base is fp32 and never quantized, through either loader; through Unsloth from the first load on.
        if not (base_dir / RunPaths.FULL_CONFIG).is_file():
            model = build_tiny(model_cfg.tiny, tokenizer)
            model.save_pretrained(base_dir)
        elif model_cfg.loader == "transformers":
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir, dtype=torch.float32)
        if model_cfg.loader == "unsloth":
            return load_with_unsloth(str(base_dir), model_cfg, QuantSection())
        model.config._attn_implementation = model_cfg.attn_implementation
        return _freeze(model)

    source = model_cfg.base
    _hub_reason(source)  # a missing local path is an error here; an unreachable Hub switches to the cache at once
    if model_cfg.loader == "unsloth":
        return load_with_unsloth(source, model_cfg, quant)
    kwargs = dict(
        dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation, revision=model_cfg.revision
    )
    if quant.mode == "4bit":
        device = quant_device()
        kwargs["quantization_config"] = bnb_config(quant)
        kwargs["device_map"] = {"": device}
        if quant.experts:
            config = _load(DiffusionGemmaForBlockDiffusion.config_class, source, "config", revision=model_cfg.revision)
            kwargs["device_map"] = experts_on_cpu_device_map(config, device)
    model = _load(DiffusionGemmaForBlockDiffusion, source, "weights", **kwargs)
    if quant.mode == "4bit" and quant.experts:
        from ftkit.model.quant import quantize_experts

        reclaim_offloaded_experts(model)
        quantize_experts(model, quant, device=device)  # one dense expert tensor on `device` at a time
    return _freeze(model)


def import_fast_diffusion_model():
    """Unsloth's FastDiffusionModel, or a clear error saying how to install it."""
    try:
        import unsloth  # noqa: F401  # Unsloth patches what it needs at import, before its models are used
        from unsloth.models.diffusion import FastDiffusionModel
    except ImportError as e:
        raise FtkitError(
            f"model.loader=unsloth: Unsloth with FastDiffusionModel does not import ({e.__class__.__name__}: {e}); "
            'install it with `pip install -e ".[unsloth]"` (README: Unsloth), or use model.loader=transformers'
        ) from None
    return FastDiffusionModel


def load_with_unsloth(source: str, model_cfg: ModelSection, quant: QuantSection) -> torch.nn.Module:
    """The base through Unsloth's FastDiffusionModel: its own bitsandbytes 4-bit (NF4, double quantization, compute
    in model.dtype; the recipe check refuses other settings) or 8-bit loading of the attention and dense-MLP
    linears, with the experts, router, embeddings and self-conditioning left dense. Then ftkit's expert quantization
    as on the default path (`quant.experts`), in place on the device; attach_lora adds the expert LoRA after.

    The cost against the default loader: Unsloth has no way to keep the experts on the CPU while loading, so the
    dense experts are on the device at once before quantize_experts shrinks them (docs/performance.md)."""
    FastDiffusionModel = import_fast_diffusion_model()
    dtype = torch.float32 if model_cfg.base in PRESETS else DTYPES[model_cfg.dtype]
    quantized = quant.mode != "none"
    # Unquantized, it loads on the CPU as the default path does (the trainer or load_run places it).
    device = quant_device() if quantized else "cpu"
    try:
        model, _ = FastDiffusionModel.from_pretrained(
            model_name=source,
            dtype=dtype,
            load_in_4bit=quant.mode == "4bit",
            load_in_8bit=quant.mode == "8bit",
            device_map={"": device},
            attn_implementation=model_cfg.attn_implementation,
            revision=model_cfg.revision,
            return_tokenizer=False,  # ftkit's tokenizer is the run's own (load_tokenizer)
        )
    except OSError as e:
        raise FtkitError(f"model.base={source!r}: Unsloth cannot load it ({e.__class__.__name__}: {e})") from None
    if quantized and quant.experts:
        from ftkit.model.quant import quantize_experts

        quantize_experts(model, quant, device=device)
    return _freeze(model)


def load_in_turns(load: Callable[[], T]) -> T:
    """`load()` in every process of a distributed run, one process per node at a time: the main process first and
    alone (it may write files the others read, such as the tiny base), then each local rank in order on every node.

    A 4-bit load holds the dense experts in host RAM until each is quantized (~46 GB in bf16 at full depth, see
    `experts_on_cpu_device_map`), and load_base releases them before it returns, so in turns a node never holds more
    than one process's dense copy; N ranks loading at once would need N times that. Every process of the process
    group must call this (each turn ends in a barrier); without an initialized group it just calls `load`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return load()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))

    def barrier():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    result = load() if rank == 0 else None
    barrier()
    for turn in range(local_world):
        if turn == local_rank and rank != 0:
            result = load()
        barrier()
    return result


def _load(cls, source: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as e:
        raise _hub_failure(source, what, e, _hub_reason(source)) from None


def quant_device() -> torch.device:
    """The GPU a 4-bit base loads onto. One full copy per process under DDP: each rank loads onto its own GPU
    (LOCAL_RANK), not all onto GPU 0.

    No CPU fallback, although the whole load path works there (tests/test_quant_load.py patches this function to run
    it): bitsandbytes' CPU inference kernel rejects 4-bit layers whose output width is not a multiple of 32 (a router
    over 4 experts), and a 4-bit CPU run of the real model has no use."""
    if not torch.cuda.is_available():
        raise FtkitError("quant.mode=4bit needs a CUDA GPU (bitsandbytes); use quant.mode=none on CPU")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def bnb_config(quant: QuantSection):
    """bitsandbytes `load_in_4bit` for the nn.Linear layers (attention, dense MLP); the experts are ftkit's."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        llm_int8_skip_modules=list(arch.KEEP_UNQUANTIZED),
        # Only lets a device_map name CPU modules (the experts, see experts_on_cpu_device_map); for 4-bit it changes
        # nothing else but adding those modules (no nn.Linear inside) to the skip list.
        llm_int8_enable_fp32_cpu_offload=quant.experts,
    )


def experts_on_cpu_device_map(config, device: torch.device | int | str) -> dict:
    """A `from_pretrained` device_map: everything on `device` except the experts modules, which load on the CPU.

    bitsandbytes leaves the 3-D expert tensors dense, so on `device` all of them would be there at once (~46 GB in
    bf16 for the real 30 layers) before quantize_experts could shrink them; from the CPU it moves them over one at a
    time. Loading them dense and streaming each through the GPU keeps transformers' own key handling (renames,
    shards, ties) instead of re-implementing it over the safetensors files. The price is host RAM: each loading
    process holds all dense experts on the CPU until they are quantized.

    `device` is a torch.device and the experts' target the string "cpu": accelerate offloads exactly the modules
    mapped to "cpu" when the main device is anything else, so a CPU-only run takes the same dispatch path as a GPU
    run (tests/test_quant_load.py relies on that). More specific keys win over "" (transformers sorts by depth)."""
    return {"": torch.device(device)} | dict.fromkeys(arch.expert_module_names(config), "cpu")


def reclaim_offloaded_experts(model: torch.nn.Module) -> None:
    """Undo accelerate's dispatch of a model loaded with `experts_on_cpu_device_map`, keeping every weight.

    The dispatch hooks hold the CPU modules' tensors in a weights map and leave meta tensors in the modules; removing
    the hooks writes the CPU tensors back, but as one new Parameter per module, which splits the encoder/decoder tie
    (both still view the same memory), and leaves each module's forward pinned as an instance attribute. This undoes
    both, so the model is what a single-device load gives: no hooks, no `hf_device_map`, tied experts on the CPU."""
    from accelerate.hooks import remove_hook_from_module

    offloaded = [name for name, dev in getattr(model, "hf_device_map", {}).items() if dev == "cpu"]
    remove_hook_from_module(model, recurse=True)
    model.__dict__.pop("hf_device_map", None)
    _unpin_forwards(model)
    _retie_same_memory(model.get_submodule(name) for name in offloaded)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise FtkitError(f"{len(on_meta)} weights were never loaded (still on the meta device), e.g. {on_meta[0]}")


def _unpin_forwards(model: torch.nn.Module) -> None:
    """Drop the `module.forward = <its class's forward, bound>` that accelerate's hook removal leaves behind: it would
    hide a later class swap (quantize_experts turns each experts module into a QuantizedExperts subclass)."""
    for module in model.modules():
        pinned = module.__dict__.get("forward")
        if getattr(pinned, "__self__", None) is module and getattr(pinned, "__func__", None) is type(module).forward:
            del module.forward


def _retie_same_memory(modules) -> None:
    """Make Parameters that view exactly the same memory one Parameter again (they were one before the dispatch)."""
    canonical: dict[tuple, torch.nn.Parameter] = {}
    for module in modules:
        for name, param in module._parameters.items():
            if param is not None:
                view = (
                    param.untyped_storage().data_ptr(),
                    param.storage_offset(),
                    tuple(param.shape),
                    param.stride(),
                    param.dtype,
                    param.device,
                )
                module._parameters[name] = canonical.setdefault(view, param)


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Full-parameter training (train.trainable: full)

# Full training keeps fp32 weights, gradients and two AdamW states: 16 bytes a parameter, ~413 GB for the 26B base.
FULL_TRAINING_MAX_PARAMS = 2_000_000_000


def count_parameters(config) -> int:
    """Parameters of a DiffusionGemma built from `config` (tied tensors once), counted on the meta device: no memory,
    no weights read."""
    return sum(p.numel() for p in arch.build_on_meta(config).parameters())


def check_full_training(config, source: str) -> None:
    """Refuse full-parameter training of a base too large for it, before any weight is loaded."""
    n = count_parameters(config)
    if n > FULL_TRAINING_MAX_PARAMS:
        raise FtkitError(
            f"train.trainable=full: model.base={source!r} has {n / 1e9:.1f}B parameters; full training holds fp32 "
            f"weights, gradients and AdamW states (16 bytes a parameter, ~{16 * n / 1e9:.0f} GB) and is limited to "
            f"{FULL_TRAINING_MAX_PARAMS / 1e9:.0f}B. Use train.trainable=lora (adapters, 4-bit base) for this model"
        )


def make_fully_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Unfreeze every weight of the text model, in fp32 (the master weights; a GPU run computes in the recipe's
    dtype under autocast). The router trains too: from a random init a frozen router would fix the routing
    forever. Tied tensors (the encoder and decoder share their text weights, the head shares the embeddings) are
    one Parameter each, so they train once."""
    model = model.float()
    for name, p in model.named_parameters():
        p.requires_grad_(not arch.UNUSED_BY_TEXT.search(name))
    return model


def load_full_model(model_cfg: ModelSection, weights_dir: Path) -> torch.nn.Module:
    """A full model saved by `train.trainable: full` (the run directory or one of its checkpoints), frozen, in fp32
    for a preset and the recipe's dtype otherwise."""
    from transformers import DiffusionGemmaForBlockDiffusion

    dtype = torch.float32 if model_cfg.base in PRESETS else DTYPES[model_cfg.dtype]
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            weights_dir, dtype=dtype, attn_implementation=model_cfg.attn_implementation
        )
    except OSError as e:
        raise FtkitError(f"{weights_dir}: cannot load the trained full model ({e.__class__.__name__}: {e})") from None
    return _freeze(model)
