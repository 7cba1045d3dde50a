"""Random-init presets: `model.base: small` resolves to the small dimensions (recipe keys win), survives the
resolved-recipe round trip, and takes the tiny code paths (char tokenizer, base saved under RUN/base)."""

import dataclasses

import pytest
import torch

from ftkit.errors import RecipeError
from ftkit.model.char_tokenizer import build_char_tokenizer
from ftkit.recipe import PRESETS, SMALL, TINY, recipe_from_dict


def test_small_preset_dimensions_and_recipe_keys_win():
    recipe = recipe_from_dict({"model": {"base": "small"}})
    assert recipe.model.tiny == PRESETS[SMALL] and recipe.is_random_init
    mixed = recipe_from_dict({"model": {"base": "small", "tiny": {"layers": 8, "canvas_length": 88}}})
    assert mixed.model.tiny == dataclasses.replace(PRESETS[SMALL], layers=8, canvas_length=88)
    # The tiny preset's values are the schema defaults; a command-line override selects the small preset too.
    assert recipe_from_dict({"model": {"base": "tiny"}}).model.tiny == PRESETS[TINY]
    assert recipe_from_dict({}, overrides=["model.base=small"]).model.tiny == PRESETS[SMALL]


def test_resolved_small_recipe_round_trips(tmp_path):
    from ftkit.recipe import load_recipe

    recipe = recipe_from_dict({"model": {"base": "small", "tiny": {"layers": 7}}})
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_small_preset_wrong_type_is_named():
    with pytest.raises(RecipeError, match=r"`model\.tiny` must be a mapping"):
        recipe_from_dict({"model": {"base": "small", "tiny": 3}})
    with pytest.raises(RecipeError, match=r"`model\.tiny\.top_k` must be <= model\.tiny\.experts"):
        recipe_from_dict({"model": {"base": "small", "tiny": {"top_k": 9}}})


def test_small_preset_builds_saves_and_reloads_its_base(tmp_path, monkeypatch):
    import ftkit.model.load
    from ftkit.model.load import load_base, load_tokenizer

    recipe = recipe_from_dict({"model": {"base": "small", "dtype": "float32"}})
    tok = load_tokenizer(recipe.model)
    assert len(tok) == len(build_char_tokenizer()) and tok.convert_ids_to_tokens(5) is not None  # the char tokenizer
    model = load_base(recipe.model, recipe.quant, tok, tmp_path)
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 < n < 12e6, n
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_experts) == (6, 256, 8)
    assert (tmp_path / "base" / "config.json").is_file()
    monkeypatch.setattr(ftkit.model.load, "build_tiny", lambda *a: pytest.fail("must reload RUN/base, not rebuild"))
    again = load_base(recipe.model, recipe.quant, tok, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_base_of_the_wrong_type_is_a_recipe_error():
    """Found by the fuzz test: the preset lookup hashed `model.base` before its type was checked (TypeError)."""
    with pytest.raises(RecipeError, match=r"model\.base"):
        recipe_from_dict({"model": {"base": []}}, where="r.yaml")
