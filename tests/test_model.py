import re

import pytest
import torch
from tiny_specs import tiny_spec

from ftkit.diffusion.token_layout import canvas_to_text, end_of_turn_id, layout_example, stop_token_ids
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora, lora_targets, parameter_groups
from ftkit.recipe import LoraSection
from ftkit.tasks import Piece, PromptCanvas

SPEC = tiny_spec(32)


def test_target_regex_hits_text_layers_only():
    regex, params = lora_targets(LoraSection())
    assert params == ["experts.gate_up_proj", "experts.down_proj"]
    assert re.fullmatch(regex, "model.decoder.layers.3.self_attn.q_proj")
    assert re.fullmatch(regex, "model.encoder.language_model.layers.0.self_attn.o_proj")
    assert not re.fullmatch(regex, "model.encoder.vision_tower.encoder.layers.0.self_attn.q_proj.linear")
    assert not re.fullmatch(regex, "model.decoder.layers.3.mlp.up_proj")  # dense MLP off by default
    regex, params = lora_targets(LoraSection(attention=False, dense_mlp=True, encoder=False), num_layers=2)
    assert params == [
        "decoder.layers.0.experts.gate_up_proj",
        "decoder.layers.0.experts.down_proj",
        "decoder.layers.1.experts.gate_up_proj",
        "decoder.layers.1.experts.down_proj",
    ]
    assert re.fullmatch(regex, "model.decoder.layers.1.mlp.down_proj")
    assert not re.fullmatch(regex, "model.encoder.language_model.layers.1.mlp.down_proj")


@pytest.mark.parametrize(
    "lora",
    [
        LoraSection(r=2, alpha=4),
        LoraSection(r=2, alpha=4, experts=False),
        LoraSection(r=2, alpha=4, attention=False),
        LoraSection(r=2, alpha=4, encoder=False),
    ],
)
def test_attach_lora_switches(char_tokenizer, lora):
    model = attach_lora(build_tiny(SPEC, char_tokenizer), lora)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("vision" in n for n in names)
    assert any(".experts." in n for n in names) == lora.experts
    assert any("self_attn" in n for n in names) == lora.attention
    assert any(".encoder." in n for n in names) == lora.encoder
    groups = {g.name: g for g in parameter_groups(model)}
    assert groups["base/router"].trainable == 0 and groups["base/embeddings"].trainable == 0
    assert groups["base/experts"].trainable == 0 and groups["base/experts"].total > 0


def test_tiny_model_shares_encoder_decoder_weights(char_tokenizer):
    model = build_tiny(SPEC, char_tokenizer)
    enc = model.model.encoder.language_model.layers[0]
    dec = model.model.decoder.layers[0]
    assert enc.experts.gate_up_proj is dec.experts.gate_up_proj
    assert enc.self_attn.q_proj.weight is dec.self_attn.q_proj.weight
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.config.text_config.layer_types == ["sliding_attention", "full_attention"]


def test_tiny_build_is_deterministic(char_tokenizer):
    a, b = build_tiny(SPEC, char_tokenizer), build_tiny(SPEC, char_tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_layout_pieces_fixed_mask_end_of_turn_and_eos_fill(char_tokenizer):
    pc = PromptCanvas(prompt="hi", pieces=(Piece("ab", True), Piece("cd", False), Piece("\n", True)))
    lay = layout_example(char_tokenizer, pc, canvas_length=8, max_prompt_length=32)
    # The prompt is DiffusionGemma's chat template up to the model's turn, each marker one token.
    assert char_tokenizer.decode(lay.prompt_ids) == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n"
    assert len(lay.prompt_ids) == 1 + 1 + 5 + 2 + 1 + 1 + 1 + 6
    eot = char_tokenizer.convert_tokens_to_ids("<turn|>")
    assert end_of_turn_id(char_tokenizer) == eot and stop_token_ids(char_tokenizer) == (
        eot,
        char_tokenizer.eos_token_id,
    )
    # The canvas: the pieces, the end-of-turn token (free: the model writes it), then the EOS fill.
    assert lay.canvas_ids[:6] == char_tokenizer("abcd\n", add_special_tokens=False).input_ids + [eot]
    assert lay.fixed == [True, True, False, False, True, False, False, False]
    assert lay.canvas_ids[6:] == [char_tokenizer.eos_token_id] * 2 and lay.content_length == 6
    assert lay.char_starts == [0, 1, 2, 3, 4]
    assert canvas_to_text(char_tokenizer, lay.canvas_ids) == "abcd\n"


def test_layout_canvas_is_what_the_training_template_supervises(char_tokenizer):
    """TRL's DiffusionGemma training template marks what the model emits in its turn; the canvas is that span up to
    the end-of-turn token, and the encoder prompt is everything before it."""
    import importlib.resources

    template = (importlib.resources.files("trl") / "chat_templates" / "diffusion_gemma_training.jinja").read_text()
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4, as\nshown"},
    ]
    rendered = char_tokenizer.apply_chat_template(
        chat, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    start = mask.index(1)
    pc = PromptCanvas(
        prompt="", pieces=(Piece("4, as\nshown", False),), messages=(("system", "Be brief."), ("user", "2+2?"))
    )
    lay = layout_example(char_tokenizer, pc, canvas_length=32, max_prompt_length=64)
    assert lay.prompt_ids == ids[:start]
    assert lay.canvas_ids[: lay.content_length] == ids[start : start + lay.content_length]
    assert lay.canvas_ids[lay.content_length - 1] == end_of_turn_id(char_tokenizer)


def test_tokenizer_without_chat_template_keeps_bos_text_and_eos_fill(char_tokenizer):
    import copy

    plain = copy.deepcopy(char_tokenizer)
    plain.chat_template = None
    lay = layout_example(
        plain, PromptCanvas(prompt="hi", pieces=(Piece("ab", False),)), canvas_length=4, max_prompt_length=8
    )
    assert lay.prompt_ids == [plain.bos_token_id] + plain("hi", add_special_tokens=False).input_ids
    assert lay.canvas_ids[2:] == [plain.eos_token_id] * 2 and lay.content_length == 2
    assert stop_token_ids(plain) == (plain.eos_token_id,)


def test_layout_rejects_a_canvas_longer_than_the_model(char_tokenizer):
    from ftkit.errors import FtkitError

    pc = PromptCanvas(prompt="", pieces=(Piece("x" * 8, False),))
    with pytest.raises(
        FtkitError,
        match=r"example e7: canvas is 9 tokens \(its end-of-turn token included\), "
        r"longer than the model's canvas_length=8",
    ):
        layout_example(char_tokenizer, pc, canvas_length=8, max_prompt_length=32, example_id="e7")


def test_expert_rank_is_its_own_and_keeps_alpha_over_r(char_tokenizer, tmp_path):
    """lora.expert_r gives every expert rank expert_r (attention keeps r) at the same alpha/r, through PEFT's own
    rank_pattern, so the saved adapter reloads with plain PEFT; the 4-bit expert path reads the smaller rank too."""
    import copy

    from peft import PeftModel

    from ftkit.model.quant import quantize_experts
    from ftkit.recipe import QuantSection
    from ftkit.run.rundir import load_adapter

    lora = LoraSection(r=4, alpha=8, expert_r=2)
    base = build_tiny(SPEC, char_tokenizer)
    model = attach_lora(copy.deepcopy(base), lora)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    e, hidden = SPEC.experts, SPEC.hidden
    assert shapes["base_model.model.model.decoder.layers.0.experts.lora_A.default.weight"] == (
        e * 2,
        SPEC.expert_intermediate,
    )
    assert shapes["base_model.model.model.decoder.layers.0.experts.base_layer.lora_A.default.weight"] == (e * 2, hidden)
    assert shapes["base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight"] == (4, hidden)
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {2.0}

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(char_tokenizer), (2, 6), generator=g)
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        decoder_input_ids=torch.randint(3, len(char_tokenizer), (2, SPEC.canvas_length), generator=g),
    )
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    on_4bit = copy.deepcopy(base)
    quantize_experts(on_4bit, QuantSection(mode="4bit", compute_dtype="float32", blocksize=32))
    on_4bit = load_adapter(on_4bit, tmp_path)  # how `ftkit eval` loads a 4-bit run: bound, so it runs
    with torch.no_grad():
        assert (on_4bit(**inputs).logits - reloaded(**inputs).logits).abs().max() > 0  # NF4 experts, and it ran
        want = model(**inputs).logits
        assert torch.equal(reloaded(**inputs).logits, want)
        assert not torch.allclose(attach_lora(copy.deepcopy(base), lora)(**inputs).logits, want)  # LoRA matters

    # Same adapter on 4-bit experts: the quantized forward takes the rank from the weights it is handed, and
    # matches plain PEFT on a base holding the dequantized expert values.
    quantized = copy.deepcopy(base)
    quantize_experts(quantized, QuantSection(mode="4bit", compute_dtype="float32", blocksize=32))
    reference = copy.deepcopy(base)
    for q_layer, r_layer in zip(quantized.model.decoder.layers, reference.model.decoder.layers):
        with torch.no_grad():  # encoder layers share these tensors
            for name in ("gate_up_proj", "down_proj"):
                getattr(r_layer.experts, name).copy_(q_layer.experts.storage(name).dequantize(torch.float32))
    lora_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    outputs = []
    for m in (quantized, reference):
        adapted = attach_lora(m, lora)
        assert not adapted.load_state_dict(lora_state, strict=False).unexpected_keys
        with torch.no_grad():
            outputs.append(adapted(**inputs).logits)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_bnb_keeps_router_self_conditioning_head_and_vision_in_full_precision(char_tokenizer):
    """Checked with transformers' own matcher over every Linear of a real (tiny) DiffusionGemma."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from ftkit.model.arch import KEEP_UNQUANTIZED

    model = build_tiny(SPEC, char_tokenizer)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = {n for n in linears if should_convert_module(n, list(KEEP_UNQUANTIZED))}
    kept = set(linears) - converted
    for part in ("router.proj", "self_conditioning.gate_proj", "vision_tower", "lm_head"):
        assert any(part in n for n in kept), part
        assert not any(part in n for n in converted), part
    assert {
        "model.decoder.layers.1.self_attn.q_proj",
        "model.encoder.language_model.layers.0.mlp.down_proj",
    } <= converted
    assert all(re.search(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$", n) for n in converted)
