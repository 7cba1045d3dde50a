"""ftkit.model.arch: the one module that knows DiffusionGemma's structure.

Two kinds of checks: a scan of ftkit's source that fails on any code outside `ftkit/model/` naming a part of the
model itself (it must ask `arch`), and the accessors themselves on a tiny model, against what the model holds."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from tiny_specs import tiny_spec

from ftkit.model import arch
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.recipe import LoraSection

PACKAGE = Path(__file__).resolve().parents[1] / "ftkit"
ALLOWED = PACKAGE / "model"

# Code that names a part of DiffusionGemma: its submodules and attributes, its projection and expert tensor names,
# its config's structural fields, its weight ties. (Recipe switches such as `lora.encoder` or `quant.experts` are
# ftkit's own names and not matched; neither are docstrings, comments and import lines.)
STRUCTURE = re.compile(
    r"\.model\.(encoder|decoder)\b"
    r"|\b(language_model|self_attn|lm_head|final_logit_softcapping|embed_tokens|embed_scale|text_config"
    r"|get_text_config|get_encoder|get_decoder|num_hidden_layers|get_expanded_tied_weights_keys"
    r"|_tied_weights_keys)\b"
    r"|\.(router|mlp|self_conditioning)\b|\.experts\.\w"
    r"|\b(gate_up|gate|up|down|[qkvo])_proj\b"
    r"|\bconfig\)?\.(canvas_length|vocab_size)\b"
    r"|\bencoder\.language_model|\bdecoder\.layers\b"
)


def _skipped_lines(tree: ast.AST) -> set[int]:
    """Lines of docstrings and import statements."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skipped.update(range(node.lineno, node.end_lineno + 1))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                skipped.update(range(first.lineno, first.end_lineno + 1))
    return skipped


def structure_mentions(source: str) -> list[tuple[int, str]]:
    """(line number, line) of each code line of `source` that names a part of DiffusionGemma (see STRUCTURE)."""
    skipped = _skipped_lines(ast.parse(source))
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:  # blank the comment out, keep the code before it
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    return [
        (number, line.strip())
        for number, line in enumerate(lines, start=1)
        if number not in skipped and STRUCTURE.search(line)
    ]


def test_no_module_outside_model_names_diffusion_gemma_parts():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ALLOWED in path.parents:
            continue
        for number, line in structure_mentions(path.read_text(encoding="utf-8")):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line}")
    assert not found, "DiffusionGemma's structure named outside ftkit/model/ (use ftkit.model.arch):\n" + "\n".join(
        found
    )


def test_the_scan_finds_structure_in_code_but_not_in_prose_imports_or_recipe_switches():
    source = '''"""A docstring may say model.decoder.layers.0.self_attn.q_proj."""
from json.decoder import scanstring
import ftkit.diffusion.self_conditioning


def f(core, lora, quant, out, recipe):
    """Nor does this one: core.model.encoder."""
    hidden = core.model.decoder(x)  # planted
    cap = core.final_logit_softcapping
    layers = core.model.encoder.language_model.layers
    name = "decoder.layers.3.experts.gate_up_proj"
    size = model.config.canvas_length
    block = core.model.decoder.self_conditioning
    ok = lora.encoder and lora.experts and quant.experts and out.encoder  # core.lm_head in a comment
    ok = recipe.model.tiny.canvas_length and lora.decoder
'''
    lines = [number for number, _ in structure_mentions(source)]
    assert lines == [8, 9, 10, 11, 12, 13]


@pytest.fixture(scope="module")
def tiny(char_tokenizer):
    spec = tiny_spec(16)
    return build_tiny(spec, char_tokenizer), spec


def test_unwrap_model_sees_through_peft_and_refuses_other_modules(tiny, char_tokenizer):
    model = build_tiny(tiny[1], char_tokenizer)  # its own: attaching LoRA changes the model in place
    peft_model = attach_lora(model, LoraSection(r=2, alpha=4))
    assert arch.unwrap_model(peft_model) is model
    assert arch.unwrap_model(model) is model
    assert arch.vocab_size(peft_model) == arch.vocab_size(model)
    assert arch.encoder_layers(peft_model) == arch.encoder_layers(model)
    with pytest.raises(TypeError, match="not a DiffusionGemmaForBlockDiffusion"):
        arch.unwrap_model(torch.nn.Linear(2, 2))


def test_sizes_come_from_the_config(tiny, char_tokenizer):
    model, spec = tiny
    assert arch.vocab_size(model) == len(char_tokenizer)
    assert arch.canvas_length(model) == arch.canvas_length(model.config) == spec.canvas_length
    assert arch.num_text_layers(model.config) == spec.layers


def test_stacks_layers_and_experts_are_the_models_modules(tiny):
    model, spec = tiny
    modules = dict(model.named_modules())
    assert arch.encoder(model) is modules["model.encoder"]
    assert arch.decoder(model) is modules["model.decoder"]
    assert arch.encoder_layers(model) == [modules[f"model.encoder.language_model.layers.{i}"] for i in range(2)]
    assert arch.decoder_layers(model) == [modules[f"model.decoder.layers.{i}"] for i in range(2)]
    names = arch.expert_module_names(model.config)
    assert len(names) == 2 * spec.layers
    for name in names:
        experts = modules[name]
        assert [n for n in arch.EXPERT_TENSORS if getattr(experts, n).ndim == 3] == list(arch.EXPERT_TENSORS)
    assert arch.EXPERT_PARAMS == tuple(f"experts.{n}" for n in arch.EXPERT_TENSORS)
    assert arch.self_conditioning_block(model) is modules["model.decoder.self_conditioning"]


def test_name_patterns_select_the_text_layers_of_the_tiny_model(tiny):
    model, spec = tiny
    names = [n for n, _ in model.named_modules()]
    linears = [n for n in names if re.fullmatch(arch.TEXT_LINEAR_LAYERS, n)]
    # q, k, v, o (a full-attention layer shares k and v: no v_proj) and gate/up/down per layer and stack
    assert linears and all(".vision_tower." not in n and ".self_conditioning." not in n for n in linears)
    assert {n.rsplit(".", 1)[-1] for n in linears} <= set(arch.ATTENTION_PROJ_NAMES + arch.DENSE_MLP_PROJ_NAMES)
    for stack, prefix in ((arch.ENCODER_LAYERS, arch.ENCODER_LAYER_PREFIX), (arch.DECODER_LAYERS, "decoder.layers")):
        assert any(re.match(stack, n) for n in linears)
        assert any(n.startswith(f"model.{prefix}.") for n in linears)
    assert all(arch.ENCODER_STACK in f".{n}" or arch.DECODER_STACK in f".{n}" for n in linears)


def test_head_logits_and_soft_embeddings_are_the_models_own(tiny):
    model, _ = tiny
    hidden = torch.randn(3, model.config.get_text_config().hidden_size)
    cap = model.final_logit_softcapping
    assert cap is not None
    expected = torch.tanh(model.lm_head(hidden).float() / cap) * cap
    assert torch.equal(arch.head_logits(model, hidden), expected)
    weight, scale = arch.embedding_weight_and_scale(model)
    embed = model.model.decoder.embed_tokens
    assert weight is embed.weight and weight is model.lm_head.weight  # the head is tied to the embeddings
    assert scale.dtype == weight.dtype and float(scale) == pytest.approx(float(embed.embed_scale))


def test_ties_come_from_transformers(tiny):
    import copy

    model, _ = tiny
    ties = arch.tied_targets(model.config)
    assert ties["lm_head.weight"] == "model.decoder.embed_tokens.weight"
    assert any(t.startswith("model.encoder.language_model.layers.0.") for t in ties)
    untied = arch.untie(copy.deepcopy(model.config))
    assert untied.tie_word_embeddings is False and untied.get_text_config().tie_word_embeddings is False
