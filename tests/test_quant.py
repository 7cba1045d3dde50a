"""4-bit experts (ftkit.quant): storage, numerics against a dequantized reference, LoRA gradients, standard PEFT
adapters, checkpointing. CPU, tiny model with hidden sizes divisible by the blocksize."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from ftkit.errors import FtkitError
from ftkit.model import attach_lora, build_tiny
from ftkit.quant import QuantizedExperts, bind_expert_lora, expert_storage, quantize_experts, set_expert_kernel
from ftkit.recipe import LoraSection, QuantSection, TinySpec

SPEC = TinySpec(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, global_head_dim=64, intermediate=128,
                experts=4, top_k=2, expert_intermediate=64, canvas_length=16)
QUANT = QuantSection(mode="4bit", compute_dtype="float32", blocksize=64)
LORA = LoraSection(r=4, alpha=8)


def _stacks(model):
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return core.model.encoder.language_model.layers, core.model.decoder.layers


def _base_experts(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@pytest.fixture(scope="module")
def full(char_tokenizer):
    return build_tiny(SPEC, char_tokenizer)


@pytest.fixture
def quantized(full):
    model = copy.deepcopy(full)
    quantize_experts(model, QUANT)
    return model


def _dequantized_reference(full, quantized):
    """The unquantized model with its expert tensors replaced by the 4-bit values, ties kept."""
    ref = copy.deepcopy(full)
    for q_layer, r_layer in zip(_stacks(quantized)[1], _stacks(ref)[1]):
        q = _base_experts(q_layer.experts)
        with torch.no_grad():
            r_layer.experts.gate_up_proj.copy_(q.storage("gate_up_proj").dequantize(torch.float32))
            r_layer.experts.down_proj.copy_(q.storage("down_proj").dequantize(torch.float32))
    return ref


def _inputs(char_tokenizer, seed=0, batch=2, prompt=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(char_tokenizer), (batch, prompt), generator=g)
    canvas = torch.randint(3, len(char_tokenizer), (batch, SPEC.canvas_length), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=canvas)


def _randomize_lora_b(model, seed=1):
    # PEFT starts lora_B at zero, which would hide a wrong LoRA path.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _loss(output):
    # Decoder logits AND the encoder's last hidden state: the last encoder layer's MLP feeds only the encoder
    # AR loss (the decoder reads the KV cache, computed before that MLP).
    return output.logits.float().pow(2).mean() + output.encoder_last_hidden_state.float().pow(2).mean()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_storage_is_shared_freed_and_four_times_smaller(full):
    model = copy.deepcopy(full).to(torch.bfloat16)  # the real model loads in bf16
    enc, dec = _stacks(model)
    originals = [enc[0].experts.gate_up_proj, enc[0].experts.down_proj]
    assert originals[0] is dec[0].experts.gate_up_proj  # the tie we must keep

    stats = quantize_experts(model, QUANT)

    assert stats.modules == 2 * SPEC.layers and stats.tensors == 2 * SPEC.layers
    assert all(p.numel() == 0 for p in originals)  # dense copies released
    for e, d in zip(enc, dec):
        assert isinstance(e.experts, QuantizedExperts)
        assert e.experts.gate_up_proj_nf4 is d.experts.gate_up_proj_nf4  # quantized once, still shared
        assert e.experts.gate_up_proj is d.experts.gate_up_proj
        assert e.experts.gate_up_proj.untyped_storage().nbytes() <= 4  # shape-only placeholder
    storages = expert_storage(model)
    assert len(storages) == stats.tensors
    counted = sum(b.numel() * b.element_size() for s in storages for b in s.buffers())
    assert counted == stats.bytes_after
    assert stats.bytes_before == 2 * stats.numel
    assert 3.5 < stats.bytes_before / stats.bytes_after < 4.0  # 4 bits + blockwise statistics
    assert not any("experts" in k for k in model.state_dict())  # neither placeholders nor packed codes


def test_forward_matches_dequantized_reference_and_stays_near_full_precision(full, quantized, char_tokenizer):
    reference = _dequantized_reference(full, quantized)
    inputs = _inputs(char_tokenizer)
    with torch.no_grad():
        want = reference(**inputs).logits
        original = full(**inputs).logits
        got = {}
        for kernel in ("loop", "grouped"):  # CPU fp32 grouped_mm exercises the CUDA path's code
            set_expert_kernel(quantized, kernel)
            got[kernel] = quantized(**inputs).logits
    for kernel, logits in got.items():
        assert torch.allclose(logits, want, atol=1e-5, rtol=1e-4), kernel
    # NF4 error only: nonzero (the experts really are 4-bit) but bounded.
    assert 1e-3 < _rel(got["loop"], original) < 0.3


def test_expert_layer_error_is_normal_nf4_error(full, quantized):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, SPEC.hidden, generator=g)
    idx = torch.stack([torch.randperm(SPEC.experts, generator=g)[: SPEC.top_k] for _ in range(64)])
    w = torch.softmax(torch.randn(64, SPEC.top_k, generator=g), -1)
    exact = _stacks(full)[1][0].experts
    with torch.no_grad():
        rel = _rel(_stacks(quantized)[1][0].experts(x, idx, w), exact(x, idx, w))
    assert 0.01 < rel < 0.25  # per-weight NF4 RMS error on Gaussian weights is ~0.1


def test_lora_matches_plain_peft_on_dequantized_base_and_grads_reach_only_lora(full, quantized, char_tokenizer):
    reference = _dequantized_reference(full, quantized)
    peft_q = attach_lora(quantized, LORA)
    _randomize_lora_b(peft_q)
    peft_ref = attach_lora(reference, LORA)
    result = peft_ref.load_state_dict(peft_q.state_dict(), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    inputs = _inputs(char_tokenizer, seed=3)

    output = peft_q(**inputs)
    out = output.logits
    ref_output = peft_ref(**inputs)
    assert torch.allclose(out, ref_output.logits, atol=1e-5, rtol=1e-4)
    _loss(ref_output).backward()
    ref_grads = {n: p.grad for n, p in peft_ref.named_parameters() if p.requires_grad}
    with peft_q.disable_adapter(), torch.no_grad():
        assert _rel(peft_q(**inputs).logits, out.detach()) > 1e-3  # the LoRA path really contributes

    packed_before = [s.packed.clone() for s in expert_storage(peft_q)]
    _loss(output).backward()
    expert_lora = {n: p for n, p in peft_q.named_parameters() if "lora_" in n and ".experts." in n}
    # gate_up and down, A and B, encoder and decoder, every layer
    assert len(expert_lora) == 2 * 2 * 2 * SPEC.layers
    for name, p in expert_lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Every LoRA gradient (experts and attention, through the 4-bit backward) equals plain PEFT's on the same weights.
    trainable = {n: p for n, p in peft_q.named_parameters() if p.requires_grad}
    assert trainable.keys() == ref_grads.keys()
    for name, p in trainable.items():
        assert torch.allclose(p.grad, ref_grads[name], atol=1e-6, rtol=1e-3), name
    for module in peft_q.modules():
        if isinstance(module, QuantizedExperts):
            assert module.gate_up_proj.grad is None and module.down_proj.grad is None
    assert not any(b.requires_grad for s in expert_storage(peft_q) for b in s.buffers())
    assert all(torch.equal(a, s.packed) for a, s in zip(packed_before, expert_storage(peft_q)))
    with pytest.raises(FtkitError):
        peft_q.merge_and_unload()


def test_adapter_is_standard_peft_and_loads_on_unquantized_base(full, quantized, char_tokenizer, tmp_path):
    from peft import PeftModel

    peft_q = attach_lora(quantized, LORA)
    _randomize_lora_b(peft_q)
    peft_q.save_pretrained(tmp_path / "q")
    attach_lora(copy.deepcopy(full), LORA).save_pretrained(tmp_path / "plain")

    def shapes(d):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    q_shapes, plain_shapes = shapes(tmp_path / "q"), shapes(tmp_path / "plain")
    assert q_shapes == plain_shapes
    assert any(".experts." in k for k in q_shapes)
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]

    loaded = PeftModel.from_pretrained(_dequantized_reference(full, quantized), tmp_path / "q")
    inputs = _inputs(char_tokenizer, seed=5)
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, peft_q(**inputs).logits, atol=1e-5, rtol=1e-4)

    # And back onto a 4-bit base: PEFT builds plain wrappers, which must be bound (and fail loudly if not).
    base = copy.deepcopy(full)
    quantize_experts(base, QUANT)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "q")
    with pytest.raises(FtkitError, match="bind_expert_lora"), torch.no_grad():
        reloaded(**inputs)
    assert bind_expert_lora(reloaded) == 2 * 2 * SPEC.layers
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, peft_q(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_decoder_gradient_checkpointing_gives_the_same_grads(quantized, char_tokenizer):
    peft_q = attach_lora(quantized, LORA)
    _randomize_lora_b(peft_q)
    peft_q.train()
    inputs = _inputs(char_tokenizer, seed=7)

    def expert_grads():
        peft_q.zero_grad(set_to_none=True)
        _loss(peft_q(**inputs)).backward()
        return {n: p.grad.clone() for n, p in peft_q.named_parameters() if "lora_" in n and ".experts." in n}

    plain = expert_grads()
    peft_q.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = expert_grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=1e-4), name


def test_device_and_dtype_moves_keep_storage_and_placeholders(quantized):
    quantized.to(torch.float64)  # a dtype cast must neither touch the codes nor densify the placeholders
    for s in expert_storage(quantized):
        assert s.packed.dtype == torch.uint8 and s.absmax.dtype in (torch.uint8, torch.float32)
    enc, dec = _stacks(quantized)
    assert enc[0].experts.gate_up_proj is dec[0].experts.gate_up_proj
    assert enc[0].experts.gate_up_proj.untyped_storage().nbytes() <= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("expert_chunk", [0, 2])
def test_cuda_grouped_bf16_matches_loop_and_reference(full, char_tokenizer, expert_chunk):
    model = copy.deepcopy(full).to("cuda", torch.bfloat16)
    quantize_experts(model, QuantSection(mode="4bit", compute_dtype="bfloat16", expert_chunk=expert_chunk))
    peft_q = attach_lora(model, LORA)
    _randomize_lora_b(peft_q)
    inputs = {k: v.cuda() for k, v in _inputs(char_tokenizer).items()}
    results = {}
    for kernel in ("grouped", "loop"):
        set_expert_kernel(peft_q, kernel)
        peft_q.zero_grad(set_to_none=True)
        output = peft_q(**inputs)
        logits = output.logits.float()
        _loss(output).backward()
        grads = [p.grad.float() for n, p in peft_q.named_parameters() if "lora_" in n and ".experts." in n]
        results[kernel] = (logits.detach(), grads)
    assert _rel(results["grouped"][0], results["loop"][0]) < 2e-2
    for a, b in zip(results["grouped"][1], results["loop"][1]):
        assert _rel(a, b) < 5e-2


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_rows_equals_the_rows_of_the_whole_stack(double_quant):
    w = torch.randn(6, 96, 64, generator=torch.Generator().manual_seed(0))
    from ftkit.quant.nf4 import NF4Tensor

    storage = NF4Tensor(w, quant_type="nf4", blocksize=64, double_quant=double_quant, compute_dtype=torch.float32)
    assert storage.rows_sliceable()
    whole, absmax = storage.dequantize(torch.float32), storage.absmax_fp32()
    for start, stop in ((0, 1), (2, 5), (5, 6), (0, 6)):
        assert torch.equal(storage.dequantize_rows(start, stop, torch.float32, absmax), whole[start:stop])
    odd = NF4Tensor(torch.randn(3, 5, 7), quant_type="nf4", blocksize=64, double_quant=double_quant,
                    compute_dtype=torch.float32)
    assert not odd.rows_sliceable()  # 35 elements per row: rows share 4-bit blocks


@pytest.mark.parametrize("chunk", [1, 3])
def test_expert_chunks_give_the_same_outputs_and_gradients_with_a_slice_dense_at_a_time(full, char_tokenizer, chunk,
                                                                                       monkeypatch):
    from ftkit.quant.nf4 import NF4Tensor

    rows_seen = []
    original = NF4Tensor.dequantize_rows

    def spy(self, start, stop, dtype, absmax):
        rows_seen.append(stop - start)
        return original(self, start, stop, dtype, absmax)

    monkeypatch.setattr(NF4Tensor, "dequantize_rows", spy)
    inputs = _inputs(char_tokenizer, seed=9)
    results = {}
    for expert_chunk in (0, chunk):
        model = copy.deepcopy(full)
        quantize_experts(model, QuantSection(mode="4bit", compute_dtype="float32", blocksize=64, expert_chunk=expert_chunk))
        torch.manual_seed(0)  # PEFT draws lora_A from the global RNG: the same adapter for both
        peft_q = attach_lora(model, LORA)
        _randomize_lora_b(peft_q)
        for kernel in ("loop", "grouped"):
            set_expert_kernel(peft_q, kernel)
            peft_q.zero_grad(set_to_none=True)
            output = peft_q(**inputs)
            _loss(output).backward()
            grads = {n: p.grad.clone() for n, p in peft_q.named_parameters() if p.requires_grad}
            results[expert_chunk, kernel] = (output.logits.detach(), grads)
    assert rows_seen and max(rows_seen) <= chunk  # never more than one slice of experts dense
    for kernel in ("loop", "grouped"):
        (want, want_grads), (got, got_grads) = results[0, kernel], results[chunk, kernel]
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), kernel
        assert got_grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            assert torch.allclose(got_grads[name], g, atol=1e-6, rtol=1e-4), (kernel, name)
