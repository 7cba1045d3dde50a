"""Full-parameter training (train.trainable: full): every weight trains, the run holds a full model that reloads
bit-identically (ties intact), resume reproduces the uninterrupted run, eval/push treat it as a full model, and
what makes no sense is refused before anything loads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_train import Snapshot, crash_and_resume, probe_batch, tiny_recipe

from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe import recipe_from_dict
from ftkit.run import rundir
from ftkit.run.paths import RunPaths
from ftkit.sft.run import train

ROOT = Path(__file__).resolve().parent.parent


def full_recipe(out, **train_kw):
    # No warmup: the first step has a non-zero learning rate, so "every parameter changes after a step" can hold.
    data = tiny_recipe(out, **{"warmup_steps": 0, **train_kw}).to_dict()
    data["train"]["trainable"] = "full"
    # A self-conditioned example in every batch, so the self-conditioning block gets a gradient every step.
    data["diffusion"]["self_conditioning_p"] = 1.0
    data["eval"].update(num_examples=2, steps=2)  # `ftkit eval RUN` is then the run's own (canonical) evaluation
    return recipe_from_dict(data)


def tied_pairs(model):
    """(encoder, decoder) Parameter pairs of one text layer, and (head, embeddings)."""
    core = getattr(model, "get_base_model", lambda: model)()
    enc, dec = core.model.encoder.language_model.layers[0], core.model.decoder.layers[0]
    return [
        (enc.self_attn.q_proj.weight, dec.self_attn.q_proj.weight),
        (enc.experts.gate_up_proj, dec.experts.gate_up_proj),
        (enc.router.proj.weight, dec.router.proj.weight),
        (core.lm_head.weight, core.model.decoder.embed_tokens.weight),
        (core.model.encoder.language_model.embed_tokens.weight, core.model.decoder.embed_tokens.weight),
    ]


class FirstStep(Snapshot):
    """Parameters before training and after the first optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 1:
            self.after_one = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.ties_kept = all(a is b for a, b in tied_pairs(model))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    snap = FirstStep()
    summary = train(full_recipe(out), progress=False, extra_callbacks=[snap])
    return out, snap, summary


def test_every_parameter_changes_after_one_step(full_run):
    _, snap, summary = full_run
    names = set(snap.before)
    frozen = {n for n in names if n not in snap.trainable}
    assert frozen and all("vision" in n for n in frozen), "only the vision tower (unused by text) stays frozen"
    for part in (
        "router.proj",
        "router.per_expert_scale",
        "experts.gate_up_proj",
        "embed_tokens",
        "self_conditioning",
        "q_proj",
        "mlp.down_proj",
        "layernorm",
        "language_model.norm",
    ):
        assert any(part in n for n in snap.trainable), part
    unchanged = sorted(n for n in snap.trainable if torch.equal(snap.before[n], snap.after_one[n]))
    assert unchanged == []
    assert all(torch.equal(snap.before[n], snap.after_one[n]) for n in frozen)
    assert snap.ties_kept, "encoder/decoder and head/embedding ties must survive training"
    assert summary["trainable"] == "full"
    assert summary["trainable_parameters"] == sum(snap.before[n].numel() for n in snap.trainable)


def test_run_holds_a_full_model_not_an_adapter(full_run):
    out, _, summary = full_run
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "base/config.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not list(out.glob(".staging*"))
    assert summary["loss_end"] < summary["loss_start"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # The tied tensors are stored once (transformers keeps the decoder's copy); only the per-stack buffers
    # (layer_scalar) are written for both stacks.
    encoder = {
        k.removeprefix("model.encoder.language_model.")
        for k in keys
        if k.startswith("model.encoder.language_model.layers.")
    }
    decoder = {k.removeprefix("model.decoder.") for k in keys if k.startswith("model.decoder.layers.")}
    assert decoder and {k.rsplit(".", 1)[1] for k in encoder & decoder} == {"layer_scalar"}
    assert "lm_head.weight" not in keys and "model.decoder.embed_tokens.weight" in keys
    assert (out / "checkpoints" / "checkpoint-6" / "model.safetensors").is_file()


def test_saved_full_model_reloads_with_identical_logits_and_ties(full_run):
    out, snap, _ = full_run
    run = rundir.load_run(out)
    assert all(a is b for a, b in tied_pairs(run.model))
    assert run.weights_dir == out
    with torch.no_grad():
        assert torch.equal(run.model(**probe_batch()).logits, snap.logits)
    base = rundir.load_run(out, trained=False)  # the untrained random init, for `eval --base`
    with torch.no_grad():
        assert not torch.allclose(base.model(**probe_batch()).logits, snap.logits)
    ckpt = rundir.load_run(out, checkpoint="checkpoint-3")
    assert ckpt.weights_dir.name == "checkpoint-3"
    with torch.no_grad():
        assert not torch.equal(ckpt.model(**probe_batch()).logits, snap.logits)


def test_resume_after_crash_reproduces_the_uninterrupted_run(full_run, tmp_path):
    full_dir, _, _ = full_run
    out = tmp_path / "b"
    crash_and_resume(full_recipe, full_dir, out, "model.safetensors")
    with safe_open(full_dir / "model.safetensors", "pt") as fa, safe_open(out / "model.safetensors", "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():
            assert torch.allclose(fa.get_tensor(key), fb.get_tensor(key), rtol=1e-4, atol=1e-6), key


def test_resume_with_another_trainable_is_refused(full_run):
    out, _, _ = full_run
    lora = recipe_from_dict(
        {**full_recipe(out).to_dict(), "train": {**full_recipe(out).to_dict()["train"], "trainable": "lora"}}
    )
    with pytest.raises(FtkitError, match="train.trainable"):
        train(lora, resume=True, progress=False)


def test_eval_and_push_treat_it_as_a_full_model(full_run, tmp_path):
    from ftkit.evaluation import EvalRequest, evaluate_run
    from ftkit.hub.push import push_run

    out, _, _ = full_run
    report = evaluate_run(EvalRequest(out))
    assert report["adapter"] and (out / "eval.json").is_file()
    evaluate_run(EvalRequest(out, checkpoint="checkpoint-3"))
    assert (out / "eval_checkpoint-3.json").is_file()
    folder = push_run(out, repo="alice/tiny-full", dry_run=True, dry_run_dir=tmp_path / "up")
    files = {p.relative_to(folder).as_posix() for p in (tmp_path / "up").rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= files
    assert not any(f.startswith(("adapter_", "base/")) for f in files), "a full model needs neither"
    card = (tmp_path / "up" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "- full-finetune" in front and "- lora" not in front
    assert "fine-tuned model for `sudoku`" in card and "LoRA adapter" not in card
    assert "Do not merge" not in card and "PeftModel" not in card and "Trained from scratch" in card
    assert 'DiffusionGemmaForBlockDiffusion.from_pretrained("alice/tiny-full", dtype="auto")' in card


def test_quantized_base_is_refused_at_validation(tmp_path):
    data = full_recipe(tmp_path / "q").to_dict()
    data["quant"]["mode"] = "4bit"
    with pytest.raises(RecipeError, match=r"`train\.trainable` is `full`, which needs a full-precision base"):
        recipe_from_dict(data, where="r.yaml")


def test_a_base_over_the_limit_is_refused_before_loading_weights(tmp_path):
    """A local base whose config describes the real model's widths (no weights on disk): refused from the
    config alone, and no run directory is left behind."""
    from ftkit.model.arch import RELEASED
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.model.load import tiny_config
    from ftkit.recipe import PresetSpec

    base = tmp_path / "big"
    tok = build_char_tokenizer()
    # The real model's depth and expert widths (google/diffusiongemma-26B-A4B-it); the tokenizer is the char one.
    spec = PresetSpec(**RELEASED)
    tiny_config(spec, len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    data = full_recipe(tmp_path / "run").to_dict()
    data["model"] = {"base": str(base), "dtype": "float32"}
    with pytest.raises(FtkitError, match=r"train\.trainable=full: .* has 24\.5B parameters.*train\.trainable=lora"):
        train(recipe_from_dict(data), progress=False)
    assert not (tmp_path / "run").exists()


def test_count_parameters_matches_a_built_model(char_tokenizer):
    from test_train import TINY

    from ftkit.model.load import build_tiny, count_parameters
    from ftkit.recipe import PresetSpec

    model = build_tiny(PresetSpec(**TINY), char_tokenizer)
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())


def test_cli_solve_on_a_full_run(full_run):
    from typer.testing import CliRunner

    from ftkit.cli import app

    out, _, _ = full_run
    puzzle = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
    result = CliRunner().invoke(app, ["solve", str(out), puzzle, "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output or "steps used" in result.output
    assert json.loads((out / "summary.json").read_text())["trainable"] == "full"


QUICK = [
    "train.max_steps=4",
    "task.train_size=16",
    "task.test_size=4",
    "train.batch_size=4",
    "train.logging_steps=1",
    "eval.steps=2",
    "eval.num_examples=4",
    "model.tiny.layers=1",
    "model.tiny.hidden=48",
    "model.tiny.head_dim=24",
    "model.tiny.global_head_dim=24",
]


def test_quickstart_recipe_is_a_full_preset_run():
    from ftkit.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert recipe.is_full and recipe.is_random_init and recipe.quant.mode == "none"
    assert recipe.task.name == "sudoku" and recipe.task.options["min_givens"] >= 40  # easy puzzles


def test_learning_curve_bench_trains_evaluates_and_plots(tmp_path):
    """bench/learning_curve.py on the quickstart recipe shrunk to seconds: step 0 (the random init) and each
    checkpoint evaluated, the table printed, the JSON and PNG written."""
    import subprocess
    import sys

    out = tmp_path / "lc"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "learning_curve.py"), *QUICK, "--every", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "learning_curve.json").read_text())
    assert [p["step"] for p in data["points"]] == [0, 2, 4]
    assert data["points"][0]["seconds"] == 0.0 and data["points"][2]["seconds"] > 0
    assert all("cell_accuracy_blanks/easy" in p["metrics"] for p in data["points"])
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "seconds"])
    assert [line.split()[0] for line in lines[head + 2 : head + 6]] == ["0", "2", "4", "chance"]


def test_rl_on_a_full_run_takes_it_as_the_base(full_run, tmp_path):
    """`rl.init_from` refuses a full run and says to make it the base; that recipe trains a fresh adapter on the
    trained full model (the reference: that model, adapter off; KL 0 at the first step), and the adapter's weights
    are the only ones that move."""
    from ftkit.rl.run import rl

    out, _, _ = full_run
    data = {
        "model": {"base": str(out), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "attention": True, "experts": True, "dense_mlp": True},
        "diffusion": {"self_conditioning_p": 0.0},
        "train": {
            "output_dir": str(tmp_path / "rl"),
            "max_steps": 2,
            "batch_size": 16,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "lr_scheduler": "constant",
            "logging_steps": 1,
            "save_steps": 2,
        },
        "task": {"name": "sudoku", "train_size": 24, "test_size": 4},
        "eval": {"num_examples": 2, "steps": 2},
        "rl": {
            "init_from": str(out),
            "group_size": 4,
            "prompts_per_step": 2,
            "num_iterations": 2,
            "elbo_samples": 1,
            "evaluate": False,
        },
    }
    with pytest.raises(
        FtkitError,
        match=rf"a full-parameter run .* make it the base: model.base={out} with "
        r"rl.init_from: null",
    ):
        rl(recipe_from_dict(data), progress=False)
    data["rl"]["init_from"] = None
    summary = rl(recipe_from_dict(data), progress=False)
    assert summary["steps"] == 2 and (tmp_path / "rl" / "adapter_model.safetensors").is_file()
    rows = [r for r in rundir.read_jsonl(RunPaths(tmp_path / "rl").train_log) if "reward" in r]
    first = next((r for r in rows if "kl" in r), None)
    assert first is None or first["kl"] == 0.0
