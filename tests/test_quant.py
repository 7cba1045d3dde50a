"""4-bit experts (ftkit.model.quant): storage, numerics against a dequantized reference, LoRA gradients, standard PEFT
adapters, checkpointing. CPU, tiny model with hidden sizes divisible by the blocksize."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from tiny_specs import QUANT_TINY, tiny_spec

from ftkit.errors import FtkitError
from ftkit.model.compat import enable_decoder_checkpointing
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.model.quant import QuantizedExperts, bind_expert_lora, expert_storage, quantize_experts, set_expert_kernel
from ftkit.recipe import LoraSection, QuantSection

SPEC = tiny_spec(16, base=QUANT_TINY)
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
    enable_decoder_checkpointing(peft_q.get_base_model(), use_reentrant=False)
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


def _bf16_grouped_vs_loop(full, char_tokenizer, device, expert_chunk, expert_r):
    """bf16 4-bit experts with expert LoRA of rank `expert_r`: (logits, expert LoRA grads) per kernel."""
    model = copy.deepcopy(full).to(device, torch.bfloat16)
    quantize_experts(
        model, QuantSection(mode="4bit", compute_dtype="bfloat16", blocksize=64, expert_chunk=expert_chunk)
    )
    torch.manual_seed(0)
    peft_q = attach_lora(model, LoraSection(r=8, alpha=16, expert_r=expert_r))
    _randomize_lora_b(peft_q)
    ranks = {p.shape[0] // SPEC.experts for n, p in peft_q.named_parameters() if "lora_A" in n and ".experts." in n}
    assert ranks == {expert_r}
    inputs = {k: v.to(device) for k, v in _inputs(char_tokenizer).items()}
    results = {}
    for kernel in ("grouped", "loop"):
        set_expert_kernel(peft_q, kernel)
        peft_q.zero_grad(set_to_none=True)
        output = peft_q(**inputs)
        _loss(output).backward()
        grads = {n: p.grad.float() for n, p in peft_q.named_parameters() if "lora_" in n and ".experts." in n}
        results[kernel] = (output.logits.float().detach(), grads)
    return results


def _assert_grouped_matches_loop(results):
    """Whole model, bf16: the two paths sum in different orders, and through every layer and backward the rounding
    of a tiny gradient can grow past any fixed per-tensor tolerance, differently on each CPU (a ~1e-6 encoder lora_A
    gradient differed 0.67 relative on an AVX2-only EPYC). So the model-level check is on the logits and on all expert
    LoRA gradients together; the numerics per call are bounded by construction in
    test_bf16_grouped_kernel_is_within_bf16_rounding_of_the_exact_product."""
    (logits, grads), (ref_logits, ref_grads) = results["grouped"], results["loop"]
    assert _rel(logits, ref_logits) < 2e-2
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * 2 * SPEC.layers
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    together = torch.cat([g.flatten() for g in grads.values()])
    assert _rel(together, torch.cat([ref_grads[n].flatten() for n in grads])) < 1e-1


@pytest.mark.parametrize("expert_r", [1, 4, 12, 16])
def test_bf16_grouped_kernel_takes_any_expert_rank(full, char_tokenizer, expert_r):
    """The grouped kernel needs 16-byte row strides (a rank of 8 in bf16); CPU bf16 grouped_mm enforces the same
    rule as CUDA's, so ranks 1, 4 and 12 crashed it. They are padded inside the kernel call only."""
    _assert_grouped_matches_loop(_bf16_grouped_vs_loop(full, char_tokenizer, "cpu", 0, expert_r))


@pytest.mark.parametrize("expert_r", [1, 4, 12, 16])
def test_bf16_grouped_kernel_is_within_bf16_rounding_of_the_exact_product(expert_r):
    """The grouped low-rank expert path in bf16 (rank padded inside the call) against the exact product of the same
    bf16 values, forward and every gradient. Each result is two products, each rounded once to bf16 (unit roundoff
    u = 2^-8) after an fp32 sum of n terms (error <= n 2^-24 of the sum of magnitudes), so elementwise
    |got - exact| <= (2u + 2 (n + 1) 2^-24) * (the same products over absolute values): a bound from the arithmetic
    that holds on any CPU."""
    from ftkit.model.quant.grouped import low_rank_grouped_linear

    g = torch.Generator().manual_seed(expert_r)
    experts, hidden, out, counts = 4, 64, 48, [5, 0, 9, 3]
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    rows = sum(counts)
    x = torch.randn(rows, hidden, generator=g).bfloat16()
    lora_a = torch.randn(experts, expert_r, hidden, generator=g).bfloat16()
    lora_b = torch.randn(experts, out, expert_r, generator=g).bfloat16()
    upstream = torch.randn(rows, out, generator=g).bfloat16()
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
    y = low_rank_grouped_linear(*leaves, offsets, "grouped")
    got = [y, *torch.autograd.grad(y, leaves, upstream)]

    def exact(x, a, b, up, absolute: bool):
        f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
        x, a, b, up = map(f, (x, a, b, up))
        y, gx, ga, gb, start = (
            torch.zeros(rows, out).double(),
            torch.zeros_like(x),
            torch.zeros_like(a),
            torch.zeros_like(b),
            0,
        )
        for e, end in enumerate(offsets.tolist()):
            xs, us = x[start:end], up[start:end]
            y[start:end] = xs @ a[e].T @ b[e].T
            gx[start:end] = us @ b[e] @ a[e]
            ga[e] = (us @ b[e]).T @ xs
            gb[e] = us.T @ (xs @ a[e].T)
            start = end
        return [y, gx, ga, gb]

    want, scale = exact(x, lora_a, lora_b, upstream, False), exact(x, lora_a, lora_b, upstream, True)
    u, n = 2.0**-8, max(hidden, out, rows, expert_r)
    for name, have, ref, mag in zip(("output", "grad x", "grad lora_A", "grad lora_B"), got, want, scale):
        bound = (2 * u + 2 * (n + 1) * 2.0**-24) * mag
        assert have.dtype == torch.bfloat16 and have.shape == ref.shape, name
        excess = (have.double() - ref).abs() - bound
        assert excess.max() <= 0, (name, excess.max().item())
        assert (have.double() - ref).abs().max() > 0 or name == "grad lora_A"  # really bf16, not exact


def test_rank_padding_stays_inside_the_kernel_call(quantized, tmp_path):
    """The adapter keeps its own rank: PEFT's lora_A / lora_B (and the saved file) are never padded."""
    peft_q = attach_lora(quantized, LoraSection(r=8, alpha=16, expert_r=4))
    peft_q.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        expert_a = [tuple(f.get_slice(k).get_shape()) for k in f.keys() if ".experts." in k and "lora_A" in k]
    assert expert_a and {shape[0] for shape in expert_a} == {4 * SPEC.experts}


def test_auto_kernel_follows_transformers_grouped_mm_support(monkeypatch):
    """torch <= 2.8 has only torch._grouped_mm, on sm90 alone; `auto` asks transformers' own check instead of
    assuming every sm80+ GPU can run it."""
    from types import SimpleNamespace

    from transformers.integrations import moe as hf_moe

    from ftkit.model.quant.grouped import resolve_kernel

    cuda = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    offsets = torch.zeros(4, dtype=torch.int32)
    monkeypatch.setattr(hf_moe, "is_torchdynamo_compiling", lambda: False)
    # An old torch: no F.grouped_mm, torch._grouped_mm present, version below 2.9.
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(hf_moe, "is_torch_greater_or_equal", lambda *a, **k: False)
    for capability, want in (((8, 0), "loop"), ((8, 9), "loop"), ((9, 0), "grouped")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_kernel("auto", cuda, cuda, offsets) == want, capability
    # A new torch runs it from sm80 on; never on the CPU or outside bf16, and a forced kernel is kept.
    monkeypatch.setattr(hf_moe, "is_torch_greater_or_equal", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_kernel("auto", cuda, cuda, offsets) == "grouped"
    fp16 = SimpleNamespace(device=cuda.device, dtype=torch.float16)
    assert resolve_kernel("auto", cuda, fp16, offsets) == "loop"
    cpu = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert resolve_kernel("auto", cpu, cpu, offsets) == "loop"
    assert resolve_kernel("grouped", cpu, cpu, offsets) == "grouped"


@pytest.mark.parametrize("top_k", [2, 4])
def test_expert_sum_is_a_reshape_sum_equal_to_the_old_index_add(quantized, monkeypatch, top_k):
    """Each token's k expert outputs are summed by reshape + sum (deterministic on CUDA, unlike index_add_'s
    atomics): the same values as the old index_add_ into the token rows, and no index_add anywhere in the step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    captured = {}
    original = QuantizedExperts._project

    def spy(self, name, x, *args):
        out = original(self, name, x, *args)
        if name == "down_proj":
            captured["out"] = out.detach()
        return out

    monkeypatch.setattr(QuantizedExperts, "_project", spy)
    g = torch.Generator().manual_seed(top_k)
    x = torch.randn(48, SPEC.hidden, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(SPEC.experts, generator=g)[:top_k] for _ in range(48)])
    w = torch.softmax(torch.randn(48, top_k, generator=g), -1)
    experts = _stacks(quantized)[1][0].experts
    with Ops() as ops:
        got = experts(x, idx, w)
        got.pow(2).sum().backward()
    assert not any(name.startswith("index_add") for name in ops.names), sorted(ops.names)

    _, order = torch.sort(idx.reshape(-1), stable=True)
    old = torch.zeros(48, SPEC.hidden).index_add_(0, order // top_k, captured["out"].float())
    if top_k == 2:
        assert torch.equal(got.detach(), old)  # a + b in either order is the same float
    else:
        assert torch.allclose(got.detach(), old, rtol=1e-6, atol=1e-7)
    again = experts(x, idx, w)
    assert torch.equal(again, got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("expert_chunk,expert_r", [(0, 4), (2, 4), (0, 12), (0, 16)])
def test_cuda_grouped_bf16_matches_loop(full, char_tokenizer, expert_chunk, expert_r):
    _assert_grouped_matches_loop(_bf16_grouped_vs_loop(full, char_tokenizer, "cuda", expert_chunk, expert_r))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_kernel_is_grouped_on_this_gpu_and_deterministic(full, char_tokenizer):
    model = copy.deepcopy(full).to("cuda", torch.bfloat16)
    quantize_experts(model, QuantSection(mode="4bit", compute_dtype="bfloat16"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, SPEC.hidden, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    idx = torch.randint(0, SPEC.experts, (512, SPEC.top_k), device="cuda", generator=g)
    w = torch.rand(512, SPEC.top_k, device="cuda", generator=g)
    experts = _stacks(model)[1][0].experts
    from ftkit.model.quant.grouped import resolve_kernel

    if torch.cuda.get_device_capability() >= (9, 0):  # H100 / H200: every torch with grouped_mm runs it here
        assert resolve_kernel("auto", x, experts.gate_up_proj, torch.zeros(1, device="cuda")) == "grouped"
    runs = []
    for _ in range(3):
        x.grad = None
        out = experts(x, idx, w)
        out.float().pow(2).sum().backward()
        runs.append((out.detach().clone(), x.grad.clone()))
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_rows_equals_the_rows_of_the_whole_stack(double_quant):
    w = torch.randn(6, 96, 64, generator=torch.Generator().manual_seed(0))
    from ftkit.model.quant.nf4 import NF4Tensor

    storage = NF4Tensor(w, quant_type="nf4", blocksize=64, double_quant=double_quant, compute_dtype=torch.float32)
    assert storage.rows_sliceable()
    whole, absmax = storage.dequantize(torch.float32), storage.absmax_fp32()
    for start, stop in ((0, 1), (2, 5), (5, 6), (0, 6)):
        assert torch.equal(storage.dequantize_rows(start, stop, torch.float32, absmax), whole[start:stop])
    odd = NF4Tensor(
        torch.randn(3, 5, 7), quant_type="nf4", blocksize=64, double_quant=double_quant, compute_dtype=torch.float32
    )
    assert not odd.rows_sliceable()  # 35 elements per row: rows share 4-bit blocks


@pytest.mark.parametrize("chunk", [1, 3])
def test_expert_chunks_give_the_same_outputs_and_gradients_with_a_slice_dense_at_a_time(
    full, char_tokenizer, chunk, monkeypatch
):
    from ftkit.model.quant.nf4 import NF4Tensor

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
        quantize_experts(
            model, QuantSection(mode="4bit", compute_dtype="float32", blocksize=64, expert_chunk=expert_chunk)
        )
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


@pytest.mark.parametrize("expert_chunk", [0, 1, 3])
def test_grouped_expert_layer_reads_nothing_back_to_the_host(quantized, expert_chunk, monkeypatch):
    """On the GPU a host read (`.tolist()`, `.item()`, a data-dependent output size such as bincount's) stalls the
    stream at every expert-layer call: 120+ per step at 30 layers. The grouped path, whole stack or a slice of
    experts at a time, forward and backward, must do none; the loop (the CPU fallback) may."""
    experts = copy.deepcopy(next(m for m in quantized.modules() if isinstance(m, QuantizedExperts)))
    experts.expert_chunk = expert_chunk
    experts.expert_kernel = "grouped"
    g = torch.Generator().manual_seed(0)
    tokens, hidden = 12, experts.storage("gate_up_proj").shape[-1]
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, 2, generator=g)
    want = experts(x, top_k_index, top_k_weights)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)

    def host_read(*args, **kwargs):
        raise AssertionError("host read on the grouped expert path")

    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    monkeypatch.setattr(torch, "bincount", host_read)
    got = experts(x, top_k_index, top_k_weights)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    monkeypatch.undo()
    experts.expert_kernel = "loop"
    loop = experts(x, top_k_index, top_k_weights)
    assert torch.equal(got, want)
    assert torch.equal(got_grad, want_grad)
    assert torch.allclose(got, loop, rtol=1e-5, atol=1e-5 * loop.abs().max().item())
