"""Loading a 4-bit base without ever holding all dense experts on the compute device (ftkit.model.load.load_base):
the experts modules load on the CPU (device_map), accelerate's dispatch is undone, and quantize_experts moves one
dense tensor at a time to the device and quantizes it there.

On the CPU the whole path runs as on a GPU: with the main device given as torch.device("cpu") (not the string
"cpu"), accelerate offloads the experts modules exactly as it does next to a CUDA device. `quant_device` still
refuses 4-bit without CUDA, so these tests patch it."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from tiny_specs import QUANT_TINY, tiny_spec

from ftkit.errors import FtkitError
from ftkit.model.arch import expert_module_names
from ftkit.model.load import (
    bnb_config,
    build_tiny,
    experts_on_cpu_device_map,
    load_base,
    quant_device,
    reclaim_offloaded_experts,
    tiny_config,
)
from ftkit.model.lora import attach_lora
from ftkit.model.quant import expert_storage, quantize_experts
from ftkit.model.quant.experts import is_fused_experts
from ftkit.recipe import LoraSection, ModelSection, PresetSpec, QuantSection

# Every 4-bit nn.Linear's output width is a multiple of 32 (router.proj is `experts` wide): bitsandbytes' CPU
# inference kernel requires it.
SPEC = tiny_spec(16, base=QUANT_TINY, experts=32)
QUANT = QuantSection(mode="4bit", compute_dtype="float32", blocksize=64)
LORA = LoraSection(r=4, alpha=8)


@pytest.fixture(scope="module")
def full(char_tokenizer):
    return build_tiny(SPEC, char_tokenizer)


@pytest.fixture(scope="module")
def base_dir(full, tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    full.save_pretrained(path)
    return path


def _stacks(model):
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return core.model.encoder.language_model.layers, core.model.decoder.layers


def _load_on_cpu(base_dir):
    """load_base's 4-bit path with the CPU as the compute device, plus what accelerate's dispatch was given and did."""
    import transformers.modeling_utils as modeling_utils

    seen = {}
    real_dispatch = modeling_utils.accelerate_dispatch

    def spy(model, hf_quantizer, device_map, *args):
        real_dispatch(model, hf_quantizer, device_map, *args)
        seen["offloaded"] = sorted(name for name, device in device_map.items() if device == "cpu")
        seen["expert_devices"] = {
            p.device.type for n, p in model.named_parameters(remove_duplicate=False) if ".experts." in n
        }

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ftkit.model.load.quant_device", lambda: torch.device("cpu"))
        mp.setattr(modeling_utils, "accelerate_dispatch", spy)
        model = load_base(ModelSection(base=str(base_dir), dtype="float32"), QUANT, tokenizer=None)
    return model, seen


def _quantized_after_load(base_dir):
    """The path before this change: everything loaded onto the compute device, then quantize_experts in place."""
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        base_dir,
        dtype=torch.float32,
        quantization_config=bnb_config(replace(QUANT, experts=False)),
        device_map={"": "cpu"},
    )
    quantize_experts(model, QUANT)
    return model


def _same_codes(a, b) -> bool:
    return all(
        torch.equal(x.packed.cpu(), y.packed.cpu())
        and torch.equal(x.absmax.cpu(), y.absmax.cpu())
        and torch.equal(x.absmax2.cpu(), y.absmax2.cpu())
        and torch.equal(x.offset.cpu(), y.offset.cpu())
        for x, y in zip(expert_storage(a), expert_storage(b), strict=True)
    )


def _tie_groups(model) -> list[list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted(sorted(v) for v in names.values())


def _inputs(char_tokenizer, seed=0, batch=2, prompt=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(char_tokenizer), (batch, prompt), generator=g)
    canvas = torch.randint(3, len(char_tokenizer), (batch, SPEC.canvas_length), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=canvas)


def test_device_map_sends_exactly_both_stacks_experts_to_the_cpu():
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.integrations.accelerate import expand_device_map

    config = tiny_config(replace(SPEC, layers=12), vocab_size=64)  # layers 1, 10 and 11: no prefix confusion
    device_map = experts_on_cpu_device_map(config, "cuda:0")
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)

    fused = {name for name, module in model.named_modules() if is_fused_experts(module)}
    assert len(fused) == 2 * 12
    assert set(device_map) - {""} == fused == set(expert_module_names(config))
    assert device_map[""] == torch.device("cuda:0")  # a torch.device: never equal to the string "cpu"
    # Resolved per parameter the way from_pretrained does: experts (both stacks) on the CPU, all else on the device.
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    placed = expand_device_map(device_map, names)
    assert {n for n, d in placed.items() if d == "cpu"} == {n for n in names if ".experts." in n}
    assert {d for n, d in placed.items() if ".experts." not in n} == {torch.device("cuda:0")}


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_quantizing_into_a_device_gives_the_same_codes_and_keeps_the_tie(full, device):
    in_place = copy.deepcopy(full).to(device, torch.bfloat16)
    quantize_experts(in_place, QUANT)

    moved = copy.deepcopy(full).to(torch.bfloat16)  # dense experts stay on the CPU
    enc, dec = _stacks(moved)
    dense = enc[0].experts.gate_up_proj
    assert dense is dec[0].experts.gate_up_proj
    stats = quantize_experts(moved, QUANT, device=torch.device(device))

    assert stats.tensors == 2 * SPEC.layers and stats.modules == 2 * SPEC.layers
    assert _same_codes(in_place, moved)
    assert {b.device.type for s in expert_storage(moved) for b in s.buffers()} == {device}
    assert dense.numel() == 0  # the CPU copy is released
    for e, d in zip(enc, dec):
        assert e.experts.gate_up_proj_nf4 is d.experts.gate_up_proj_nf4
        assert e.experts.down_proj_nf4 is d.experts.down_proj_nf4
        assert e.experts.gate_up_proj is d.experts.gate_up_proj
        assert e.experts.gate_up_proj.device.type == device


def test_weights_that_were_never_loaded_are_refused():
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(tiny_config(SPEC, vocab_size=64))
    with pytest.raises(FtkitError, match="meta device"):
        reclaim_offloaded_experts(model)
    with pytest.raises(FtkitError, match=r"expert tensor of shape \(32, 128, 128\).*meta device"):
        quantize_experts(model, QUANT)


def test_load_base_offloads_the_experts_and_matches_quantizing_after_a_full_load(base_dir, char_tokenizer):
    import bitsandbytes as bnb

    model, seen = _load_on_cpu(base_dir)
    reference = _quantized_after_load(base_dir)

    # from_pretrained went through accelerate's offload dispatch (as next to a GPU): experts out, held off-device.
    assert seen["offloaded"] == sorted(expert_module_names(model.config))
    assert seen["expert_devices"] == {"meta"}
    # ... which is fully undone: no hooks, no device map, the class swap to 4-bit experts took effect.
    assert not any(hasattr(m, "_hf_hook") or "forward" in m.__dict__ for m in model.modules())
    assert not hasattr(model, "hf_device_map")
    assert isinstance(_stacks(model)[1][0].self_attn.q_proj, bnb.nn.Linear4bit)  # bitsandbytes still did the linears

    assert len(expert_storage(model)) == 2 * SPEC.layers  # each tied tensor quantized once
    for e, d in zip(*_stacks(model)):
        assert e.experts.gate_up_proj_nf4 is d.experts.gate_up_proj_nf4
        assert e.experts.down_proj_nf4 is d.experts.down_proj_nf4
    assert _tie_groups(model) == _tie_groups(reference)  # attention etc. still tied too
    assert _same_codes(model, reference)
    inputs = _inputs(char_tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def test_lora_on_the_loaded_base_gets_the_gradients_of_quantizing_after_a_full_load(base_dir, char_tokenizer):
    grads = []
    for model in (_load_on_cpu(base_dir)[0], _quantized_after_load(base_dir)):
        torch.manual_seed(0)  # PEFT draws lora_A from the global RNG
        peft_model = attach_lora(model, LORA)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:  # PEFT starts lora_B at zero, which would hide a broken LoRA path
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        peft_model.train()
        output = peft_model(**_inputs(char_tokenizer, seed=3))
        (output.logits.pow(2).mean() + output.encoder_last_hidden_state.pow(2).mean()).backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})

    loaded, reference = grads
    assert loaded.keys() == reference.keys()
    assert any(".experts." in n for n in loaded) and any("self_attn" in n for n in loaded)
    for name, grad in loaded.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad, reference[name], atol=1e-7, rtol=1e-5), name


def test_4bit_without_cuda_is_refused(base_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FtkitError, match="quant.mode=4bit needs a CUDA GPU"):
        load_base(ModelSection(base=str(base_dir), dtype="float32"), QUANT, tokenizer=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_peak_stays_within_two_dense_expert_tensors_of_the_loaded_model(char_tokenizer, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    # Experts dominate (6 layers of 16 experts) and the largest nn.Linear is far below one expert tensor.
    spec = PresetSpec(
        layers=6,
        hidden=256,
        heads=4,
        kv_heads=2,
        head_dim=64,
        global_head_dim=64,
        intermediate=256,
        experts=16,
        top_k=2,
        expert_intermediate=256,
        canvas_length=16,
    )
    build_tiny(spec, char_tokenizer).save_pretrained(tmp_path)
    quant = QuantSection(mode="4bit", compute_dtype="bfloat16")
    model_cfg = ModelSection(base=str(tmp_path), dtype="bfloat16")

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load_base(model_cfg, quant, char_tokenizer)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() - before  # non-expert weights + NF4 experts
    peak = torch.cuda.max_memory_allocated() - before

    storages = expert_storage(model)
    largest_dense = max(s.source_nbytes for s in storages)
    all_dense = sum(s.source_nbytes for s in storages)
    nf4 = sum(s.nbytes for s in storages)
    assert resident >= nf4
    # The bound can fail: holding every dense expert tensor at once (the old load) would exceed it.
    assert all_dense > nf4 + 2 * largest_dense
    assert peak <= resident + 2 * largest_dense, dict(peak=peak, resident=resident, largest_dense=largest_dense)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}

    # Same codes as loading everything onto the GPU and quantizing there.
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(
        tmp_path,
        dtype=torch.bfloat16,
        quantization_config=bnb_config(replace(quant, experts=False)),
        device_map={"": quant_device()},
    )
    quantize_experts(reference, quant)
    assert _same_codes(model, reference)
    inputs = {k: v.cuda() for k, v in _inputs(char_tokenizer).items()}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reference(**inputs).logits)
