"""Training throughput and peak memory of LoRA fine-tuning, side by side on the same batch:

  ftkit-4bit    ftkit.model.load.load_base (bnb 4-bit linears + ftkit NF4 experts) + attach_lora (attn + experts)
  peft-4bit     plain transformers `load_in_4bit` (experts stay bf16) + PEFT LoRA on attn + experts (target_parameters)
  peft-bf16     plain transformers bf16 + the same PEFT LoRA
  unsloth-4bit  Unsloth FastDiffusionModel (4-bit attn + dense MLP, LoRA there, experts bf16 and frozen), when it
                imports (skipped with a note otherwise)

Every method runs the same step: ftkit.diffusion.loss.diffusion_loss -> backward -> AdamW step.
Checkpoints are random-init at the real model's widths with L layers, saved with save_pretrained and loaded back
with from_pretrained; a linear fit over L extrapolates peak memory and step time to the real 30 layers.

GPU (one H100/H200):   python bench/train_throughput.py --layers 2,4,8
CPU smoke test:        python bench/train_throughput.py --tiny
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from ftkit.model.arch import TEXT_LINEAR_LAYERS  # noqa: E402

METHODS = ("ftkit-4bit", "peft-4bit", "peft-bf16", "unsloth-4bit")


class Skipped(Exception):
    pass


def lora_section(r: int):
    from ftkit.recipe import LoraSection

    return LoraSection(r=r, alpha=2 * r, attention=True, experts=True, dense_mlp=False)


def plain_lora_config(r: int):
    """The same targets ftkit uses (text-layer attention + expert tensors), built directly with PEFT."""
    from peft import LoraConfig

    from ftkit.model.lora import lora_targets

    regex, params = lora_targets(lora_section(r))  # both stacks: no per-layer scoping needed
    return LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=regex, target_parameters=params, bias="none"
    )


def load_ftkit_4bit(path: Path, tiny: bool, r: int):
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.load import _freeze, load_base
    from ftkit.model.lora import attach_lora
    from ftkit.model.quant import quantize_experts
    from ftkit.recipe import ModelSection, QuantSection

    if torch.cuda.is_available():
        model = load_base(ModelSection(base=str(path), dtype="bfloat16"), QuantSection(mode="4bit"), tokenizer=None)
        note = "bnb nf4 linears + ftkit nf4 experts"
    else:
        # bitsandbytes' Linear4bit path needs CUDA; on CPU only the experts are 4-bit (the part ftkit adds).
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32)
        quantize_experts(model, QuantSection(mode="4bit", compute_dtype="float32"))
        model = _freeze(model)
        note = "CPU: experts nf4 only, fp32 compute"
    return attach_lora(model, lora_section(r)), note


def load_peft_4bit(path: Path, tiny: bool, r: int):
    from peft import get_peft_model
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.load import bnb_config
    from ftkit.recipe import QuantSection

    if not torch.cuda.is_available():
        raise Skipped("benchmarked on CUDA only (bnb Linear4bit)")
    # ftkit's own bnb settings (same modules kept in full precision), without its expert quantization.
    quant = bnb_config(QuantSection(mode="4bit", experts=False))
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=quant, device_map={"": torch.cuda.current_device()}
    )
    return get_peft_model(model, plain_lora_config(r)), "bnb nf4 linears, experts bf16"


def load_peft_bf16(path: Path, tiny: bool, r: int):
    from peft import get_peft_model
    from transformers import DiffusionGemmaForBlockDiffusion

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).to(bc.device())
    return get_peft_model(model, plain_lora_config(r)), f"{str(dtype).removeprefix('torch.')}, no quantization"


# Unsloth's LoRA targets for DiffusionGemma: attention + dense MLP of the text encoder and decoder layers only. The bare
# suffix list (q_proj ... down_proj) would also wrap decoder.self_conditioning.{gate,up,down}_proj and the vision
# tower's Gemma4ClippableLinear; the experts are fused 3D parameters that PEFT's target_modules cannot reach.
# Source: unslothai/unsloth unsloth/models/diffusion_gemma_objective.py (DIFFUSION_GEMMA_PROFILE.lora_target_modules).
UNSLOTH_LORA_TARGETS = TEXT_LINEAR_LAYERS


def load_unsloth_4bit(path: Path, tiny: bool, r: int):
    """Unsloth's DiffusionGemma path, as its API actually is (unsloth 2026.10, `pip install -e ".[unsloth]"`; it
    imports on a CPU machine too, where this row runs unquantized: bitsandbytes' Linear4bit path needs CUDA).

    API sources (unslothai/unsloth):
      - unsloth/models/diffusion.py: `FastDiffusionModel`, a transformers-only "slow path" (no Unsloth kernels or
        compile patching; it loads the unmodified DiffusionGemmaForBlockDiffusion, so ftkit's diffusion_loss forward
        kwargs apply unchanged). `from_pretrained(model_name, max_seq_length=None, dtype=None, load_in_4bit=False,
        ..., device_map="auto", attn_implementation=None (eager for DiffusionGemma), return_tokenizer=True, **kw)`
        returns `(model, processor_or_tokenizer)`, or `(model, None)` with return_tokenizer=False. load_in_4bit
        builds a bnb NF4 config (double quant, compute dtype = dtype) skipping lm_head, embed_tokens, experts,
        self_conditioning and router: only attention + dense-MLP linears become 4-bit, the experts stay bf16.
        `get_peft_model(model, r=16, target_modules=None, lora_alpha=16, lora_dropout=0.0, bias="none",
        use_gradient_checkpointing=True, random_state=3407, task_type=None, **kw)` wraps plain PEFT (returns a
        PeftModel) and, by default, turns on HF gradient checkpointing. `for_training(model,
        use_gradient_checkpointing=True)` is only model.train() + that same switch.
      - unsloth/models/loader.py: `FastModel.from_pretrained` / `get_peft_model` dispatch diffusion model_types
        ("diffusion_gemma", "diffusion_gemma4") to FastDiffusionModel; Unsloth's own notebook
        (unslothai/notebooks nb/DiffusionGemma_(26B-A4B)-Sudoku.ipynb) goes through FastModel.
    `FastDiffusionModel` is not re-exported at unsloth's top level on a CPU machine: it is imported from its module.
    """
    try:
        import unsloth  # type: ignore[import-not-found]  # noqa: F401  # patches what it needs at import
        from unsloth.models.diffusion import FastDiffusionModel  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or an Unsloth release without the diffusion path
        traceback.print_exc()
        raise Skipped(f"unsloth FastDiffusionModel does not import: {_first_line(e)}") from None
    cuda = torch.cuda.is_available()
    # The Unsloth configuration: 4-bit, LoRA on attention + dense MLP (Unsloth does not adapt the experts).
    # return_tokenizer=False: the benchmark checkpoints carry no tokenizer/processor files. attn_implementation is
    # left at Unsloth's default ("eager"); the note below records it.
    model, _ = FastDiffusionModel.from_pretrained(
        model_name=str(path),
        dtype=torch.bfloat16 if cuda else torch.float32,
        load_in_4bit=cuda,
        device_map={"": torch.cuda.current_device() if cuda else "cpu"},
        return_tokenizer=False,
    )
    # Gradient checkpointing stays off here (Unsloth's default would turn it on): run_method applies --grad-ckpt to
    # every method alike.
    model = FastDiffusionModel.get_peft_model(
        model,
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        bias="none",
        target_modules=UNSLOTH_LORA_TARGETS,
        use_gradient_checkpointing=False,
    )
    model = FastDiffusionModel.for_training(model, use_gradient_checkpointing=False)
    attn = getattr(model.get_base_model().config, "_attn_implementation", "?")
    weights = "bnb nf4 attn+MLP, experts bf16" if cuda else "CPU: fp32, no 4-bit (bnb Linear4bit needs CUDA)"
    return model, f"unsloth {weights}; LoRA attn + dense MLP; attn={attn}"


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message` for a table cell; the full traceback goes to the log."""
    lines = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {lines[0]}" if lines else e.__class__.__name__


LOADERS = {
    "ftkit-4bit": load_ftkit_4bit,
    "peft-4bit": load_peft_4bit,
    "peft-bf16": load_peft_bf16,
    "unsloth-4bit": load_unsloth_4bit,
}


def expert_gb(model) -> float:
    """Bytes holding the expert weights: NF4 storage if ftkit quantized them, else the dense tensors (once each)."""
    from ftkit.model.quant import expert_storage

    stored = expert_storage(model)
    if stored:
        return sum(s.nbytes for s in stored) / 1e9
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if ".experts." in name and "lora_" not in name and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / 1e9


def run_method(method: str, path: Path, batch: dict, args) -> dict:
    from ftkit.diffusion.loss import diffusion_loss
    from ftkit.recipe import DiffusionSection

    bc.free_memory()
    row = {"method": method, "layers": args.current_layers}
    start = time.perf_counter()
    try:
        model, note = LOADERS[method](path, args.tiny, args.r)
    except Skipped as e:
        return {**row, "note": f"skipped: {e}"}
    except Exception as e:  # a baseline that fails to load is reported, not fatal to the other columns
        print(f"\n{method} (L={args.current_layers}) failed to load; full traceback:", flush=True)
        traceback.print_exc()
        return {**row, "note": f"failed to load: {_first_line(e)} (traceback in the log)"}
    row["load_s"] = time.perf_counter() - start
    ftkit = method.startswith("ftkit")
    if args.grad_ckpt:
        from ftkit.model.checkpointing import set_gradient_checkpointing

        # transformers can checkpoint only the decoder; the encoder's checkpointing is ftkit's own.
        set_gradient_checkpointing(model, True, encoder=ftkit)
    model.train()
    dev = bc.device()
    on_device = {k: v.to(dev) for k, v in batch.items()}
    # The baselines compute the objective as TRL / Unsloth do (full logits, the whole model in the first pass);
    # ftkit uses its lean path (encoder once, first pass where needed, chunked head + CE) when --loss-chunk > 0.
    cfg = DiffusionSection(loss_chunk=args.loss_chunk if ftkit else 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator(device=dev).manual_seed(0)

    def step():
        out = diffusion_loss(model, on_device, cfg, generator)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        times = bc.timed(step, args.steps, args.warmup)
    except torch.OutOfMemoryError:
        peak = bc.peak_gb()
        model = optimizer = None  # free them before the next method loads
        bc.free_memory()
        return {**row, "peak_gb": peak, "note": "out of memory"}
    except Exception as e:  # one method failing its step leaves the others' rows
        print(f"\n{method} (L={args.current_layers}) failed in its training step; full traceback:", flush=True)
        traceback.print_exc()
        model = optimizer = None
        bc.free_memory()
        return {**row, "note": f"failed in step: {_first_line(e)} (traceback in the log)"}
    step_s = bc.median(times)
    canvas_tokens = batch["canvas"].numel()
    row.update(
        step_s=step_s,
        canvas_tok_s=canvas_tokens / step_s,
        peak_gb=bc.peak_gb(),
        experts_gb=expert_gb(model),
        trainable=sum(p.numel() for p in trainable),
        note=note,
    )
    model = optimizer = None
    bc.free_memory()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths on CPU (smoke test)")
    parser.add_argument("--layers", default=None, help="comma-separated layer counts (default 2,4,8; tiny 1,2)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=None, help="default 8 (tiny 2)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64; tiny 16)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    parser.add_argument(
        "--grad-ckpt",
        action="store_true",
        help="checkpoint decoder layers (all methods) and encoder layers (ftkit only: its own)",
    )
    parser.add_argument(
        "--loss-chunk",
        type=int,
        default=128,
        help="ftkit's DiffusionSection.loss_chunk (0 = the reference path, as the baselines run)",
    )
    parser.add_argument("--workdir", default="/tmp/ftkit-bench", help="where checkpoints are written (then deleted)")
    args = parser.parse_args(argv)
    layers = [int(x) for x in (args.layers or ("1,2" if args.tiny else "2,4,8")).split(",")]
    args.batch = args.batch or (2 if args.tiny else 8)
    args.prompt = args.prompt or (16 if args.tiny else 64)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("true-width runs need a CUDA GPU; use --tiny on CPU")

    print(
        f"device={bc.device()} torch={torch.__version__} tiny={args.tiny} batch={args.batch} prompt={args.prompt} "
        f"r={args.r} steps={args.steps} warmup={args.warmup} grad_ckpt={args.grad_ckpt} loss_chunk={args.loss_chunk}"
    )
    rows = []
    for n in layers:
        args.current_layers = n
        path = Path(args.workdir) / f"ckpt-L{n}{'-tiny' if args.tiny else ''}"
        facts = bc.build_checkpoint(path, n, args.tiny)
        batch = bc.synthetic_batch(args.batch, args.prompt, facts["canvas"], facts["vocab"])
        for method in methods:
            row = run_method(method, path, batch, args)
            rows.append(row)
            print(f"  L={n} {method}: {row.get('note', '')}", flush=True)
        import shutil

        shutil.rmtree(path, ignore_errors=True)

    columns = ["method", "layers", "canvas_tok_s", "step_s", "peak_gb", "experts_gb", "trainable", "load_s", "note"]
    print("\nMeasured (canvas_tok_s = batch x canvas / median step; peak_gb = torch.cuda.max_memory_allocated)")
    print(bc.table(rows, columns))

    fits = []
    for method in methods:
        done = [r for r in rows if r["method"] == method and "step_s" in r]
        step_fit = bc.linear_fit([r["layers"] for r in done], [r["step_s"] for r in done])
        if step_fit is None:
            continue
        mem = [r for r in done if r.get("peak_gb") is not None]
        mem_fit = bc.linear_fit([r["layers"] for r in mem], [r["peak_gb"] for r in mem])
        step30 = step_fit.at(bc.REAL_LAYERS)
        fits.append(
            {
                "method": method,
                "s_per_layer": step_fit.slope,
                "step_s@30": step30,
                "canvas_tok_s@30": done[0]["canvas_tok_s"] * done[0]["step_s"] / step30 if step30 > 0 else None,
                "gb_per_layer": mem_fit.slope if mem_fit else None,
                "peak_gb@30": mem_fit.at(bc.REAL_LAYERS) if mem_fit else None,
            }
        )
    if fits:
        print(f"\nLinear fit over layers {layers}, extrapolated to {bc.REAL_LAYERS} layers")
        print(bc.table(fits, ["method", "s_per_layer", "step_s@30", "canvas_tok_s@30", "gb_per_layer", "peak_gb@30"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
