"""End-to-end training on the tiny preset: what trains, what stays frozen, resume, adapter round-trip."""

import json

import pytest
import torch
from tiny_specs import tiny_dims
from transformers import TrainerCallback

from ftkit.errors import FtkitError
from ftkit.recipe import recipe_from_dict
from ftkit.run import rundir
from ftkit.sft.run import train

TINY = tiny_dims(96)


def tiny_recipe(out, **train):
    return recipe_from_dict(
        {
            "model": {"base": "tiny", "dtype": "float32", "tiny": TINY},
            "lora": {"r": 4, "alpha": 8, "attention": True, "experts": True, "dense_mlp": True},
            "train": {
                "output_dir": str(out),
                "max_steps": 6,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "warmup_steps": 1,
                "logging_steps": 1,
                "save_steps": 3,
                "save_total_limit": 3,
                "seed": 3,
                **train,
            },
            "task": {"name": "sudoku", "train_size": 24, "test_size": 4},
        }
    )


def probe_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (2, 12), generator=g)
    canvas = torch.randint(4, 100, (2, 96), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=canvas)


class Snapshot(TrainerCallback):
    """Parameters at the start and end of training, and the trained model's logits on a fixed probe."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            self.logits = model(**probe_batch()).logits.clone()


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    snap = Snapshot()
    summary = train(tiny_recipe(out), progress=False, extra_callbacks=[snap])
    return out, snap, summary


def test_every_lora_parameter_changed_and_base_did_not(trained):
    _, snap, _ = trained
    lora = [n for n in snap.trainable]
    assert lora and all("lora_" in n for n in lora)
    kinds = {("experts" if ".experts." in n else "attn" if "self_attn" in n else "mlp") for n in lora}
    assert kinds == {"experts", "attn", "mlp"}
    unchanged = [n for n in lora if torch.equal(snap.before[n], snap.after[n])]
    assert unchanged == []
    changed_base = [
        n for n in snap.before if n not in snap.trainable and not torch.equal(snap.before[n], snap.after[n])
    ]
    assert changed_base == []
    frozen = [n for n in snap.before if n not in snap.trainable]
    for part in ("router", "experts.base_layer", "embed_tokens", "q_proj.base_layer"):
        assert any(part in n for n in frozen), part


def test_run_dir_contents_and_falling_loss(trained):
    out, _, summary = trained
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "versions.json",
        "summary.json",
        "train_log.jsonl",
        "loss.png",
        "tokenizer.json",
        "base/config.json",
    ):
        assert (out / name).is_file(), name
    rows = [r for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"diffusion_loss", "encoder_loss", "noise_level"} <= set(rows[0])
    assert summary["loss_end"] < summary["loss_start"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert "vision" not in json.dumps(cfg["target_modules"]) and "language_model" in json.dumps(cfg["target_modules"])


def test_saved_adapter_reloads_with_identical_logits(trained):
    out, snap, _ = trained
    run = rundir.load_run(out)
    with torch.no_grad():
        logits = run.model(**probe_batch()).logits
    assert torch.equal(logits, snap.logits)
    base = rundir.load_run(out, trained=False)
    with torch.no_grad():
        assert not torch.allclose(base.model(**probe_batch()).logits, snap.logits)


def crash_and_resume(make_recipe, full_dir, out, final_file: str) -> None:
    """Crash a 6-step run at step 4, resume it from checkpoint-3, and check its log against the uninterrupted
    run's in `full_dir`: the same steps once each, the same losses and noise levels."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_recipe(out), progress=False, extra_callbacks=[CrashAt(4)])
    assert rundir.latest_checkpoint(out).name == "checkpoint-3"
    assert not (out / final_file).exists()
    summary = train(make_recipe(out), resume=True, progress=False)
    assert summary["resumed_from_step"] == 3
    full = [r for r in rundir.read_jsonl(full_dir / "train_log.jsonl") if "loss" in r]
    resumed = [r for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["noise_level"] == pytest.approx(b["noise_level"], rel=1e-6)


def test_resume_after_crash_reproduces_the_uninterrupted_run(trained, tmp_path):
    crash_and_resume(tiny_recipe, trained[0], tmp_path / "b", "adapter_config.json")


def test_resume_past_a_damaged_checkpoint_reproduces_the_uninterrupted_run(trained, tmp_path, capsys):
    """The newest checkpoint is damaged: --resume names the file, moves the checkpoint aside (never deletes it),
    continues from the one before, and still ends exactly where the uninterrupted run ended."""
    import shutil

    from safetensors.torch import load_file

    full_dir, _, _ = trained
    out = tmp_path / "damaged"
    shutil.copytree(full_dir, out)
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json"):
        (out / name).unlink()  # as if killed after checkpoint-6, before the final save
    weights = out / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    summary = train(tiny_recipe(out), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint-6 is damaged (adapter_model.safetensors: 100 bytes, the manifest says" in err
    assert "moved it aside to damaged-checkpoint-6" in err and "resuming from checkpoint-3 (step 3 of 6)" in err
    assert summary["resumed_from_step"] == 3
    assert (out / "checkpoints" / "damaged-checkpoint-6" / "adapter_model.safetensors").stat().st_size == 100
    full = [r for r in rundir.read_jsonl(full_dir / "train_log.jsonl") if "loss" in r]
    resumed = [r for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    got, want = load_file(out / "adapter_model.safetensors"), load_file(full_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name


def test_existing_run_needs_resume(trained):
    out, _, _ = trained
    with pytest.raises(FtkitError, match=r"already holds a run \(.*checkpoint-6.*\); pass --resume"):
        train(tiny_recipe(out), progress=False)


def test_bad_data_leaves_no_run_dir(tmp_path):
    out = tmp_path / "c"
    bad = tmp_path / "bad.csv"
    bad.write_text("quizzes,solutions\n" + "0" * 81 + ",123\n")
    recipe = recipe_from_dict({**tiny_recipe(out).to_dict(), "task": {"name": "sudoku", "data_path": str(bad)}})
    with pytest.raises(FtkitError, match=r"bad\.csv:2: solution: expected 81 cells"):
        train(recipe, progress=False)
    assert not out.exists()


def test_fsdp_launch_refuses_the_lean_loss_path_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "fsdp"
    recipe = recipe_from_dict({**tiny_recipe(out).to_dict(), "diffusion": {"loss_chunk": 64}})
    with pytest.raises(FtkitError, match=r"diffusion\.loss_chunk=64: FSDP needs the unchunked loss path"):
        train(recipe, progress=False)
    assert not out.exists()


class GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_the_large_batch(tmp_path, monkeypatch):
    """batch 2 x accum 2 must give the same first-step gradient as batch 4 x accum 1. The noise is made a fixed
    function of the canvas so both runs see identical inputs; the canvas CE is a mean over equal-length canvases, so
    the micro-batch means average to the large-batch mean exactly when the Trainer scales each by 1/accum."""
    import ftkit.diffusion.loss as loss_mod

    monkeypatch.setattr(loss_mod, "sample_noise_level", lambda b, eps, gen, dev: torch.full((b,), 0.5, device=dev))
    monkeypatch.setattr(
        loss_mod,
        "corrupt_canvas",
        lambda canvas, t, vocab, gen: (
            torch.where(torch.arange(canvas.shape[1]) % 2 == 0, (canvas * 7 + 3) % vocab, canvas),
            None,
        ),
    )
    grads = []
    for batch, accum in ((4, 1), (2, 2)):
        cap = GradCapture()
        recipe = tiny_recipe(tmp_path / f"b{batch}", max_steps=1, batch_size=batch, grad_accum=accum, max_grad_norm=1e9)
        recipe = recipe_from_dict(
            {**recipe.to_dict(), "diffusion": {"self_conditioning_p": 0.0, "encoder_loss_weight": 0.0}}
        )
        train(recipe, progress=False, extra_callbacks=[cap])
        grads.append(cap.grads)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6), name


def test_logged_loss_is_the_sum_of_its_logged_parts_under_accumulation(tmp_path):
    """The step loss the Trainer logs (its own accumulation) and the parts ftkit logs (averaged over micro-batches)
    must agree: loss == diffusion_loss + encoder_loss_weight * encoder_loss."""
    out = tmp_path / "ga"
    train(tiny_recipe(out, max_steps=2, batch_size=2, grad_accum=2, logging_steps=1), progress=False)
    rows = [r for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        # tiny_recipe keeps the default encoder_loss_weight of 1.0
        assert r["loss"] == pytest.approx(r["diffusion_loss"] + r["encoder_loss"], rel=1e-5)


def test_memory_lean_recipe_trains_every_lora_parameter(tmp_path):
    """The real recipe's memory settings on the tiny model: both stacks checkpointed, chunked loss, 8-bit AdamW,
    a smaller expert rank — every LoRA tensor still trains and the settings are really in force."""
    from ftkit.model.checkpointing import CheckpointedEncoderLayer

    class Inspect(Snapshot):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            super().on_train_begin(args, state, control, model=model, **kw)
            self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
            self.encoder_checkpointed = all(
                isinstance(layer, CheckpointedEncoderLayer)
                for layer in model.get_base_model().model.encoder.language_model.layers
            )
            self.expert_a = [
                tuple(p.shape)
                for n, p in model.named_parameters()
                if "experts.lora_A" in n and ".decoder.layers.0." in n
            ]

    recipe = tiny_recipe(
        tmp_path / "lean", gradient_checkpointing=True, optim="adamw_bnb_8bit", max_steps=3, save_steps=10
    )
    recipe = recipe_from_dict(
        {**recipe.to_dict(), "diffusion": {"loss_chunk": 40}, "lora": {**recipe.to_dict()["lora"], "expert_r": 2}}
    )
    snap = Inspect()
    summary = train(recipe, progress=False, extra_callbacks=[snap])
    # bitsandbytes' AdamW in 8-bit mode (it keeps 32-bit states only for tensors under min_8bit_size elements,
    # which every tiny LoRA tensor is).
    assert type(snap.optimizer).__module__.startswith("bitsandbytes.") and snap.optimizer.args.optim_bits == 8
    assert snap.encoder_checkpointed
    assert snap.expert_a == [(TINY["experts"] * 2, TINY["expert_intermediate"])]
    unchanged = [n for n in snap.trainable if torch.equal(snap.before[n], snap.after[n])]
    assert snap.trainable and unchanged == []
    assert summary["loss_end"] is not None and torch.isfinite(torch.tensor(summary["loss_end"]))


@pytest.mark.parametrize("loss_chunk", [0, 40])
def test_mixed_precision_reaches_both_loss_paths(tmp_path, loss_chunk):
    """accelerate's mixed precision wraps the model's forward, which the lean path does not call: the trainer enters
    the same autocast itself, so a bf16 run computes the LoRA layers under autocast on either path."""
    from transformers import TrainingArguments

    from ftkit.diffusion.token_layout import collate, layout_example
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.model.load import build_tiny
    from ftkit.model.lora import attach_lora
    from ftkit.recipe import DiffusionSection, LoraSection, PresetSpec
    from ftkit.sft.trainer import DiffusionTrainer
    from ftkit.tasks.sudoku import SudokuTask

    tok = build_char_tokenizer()
    model = attach_lora(build_tiny(PresetSpec(**TINY), tok), LoraSection(r=4, alpha=8))
    task = SudokuTask()
    batch = collate(
        [layout_example(tok, task.to_prompt_canvas(e), 96, 256) for e in task.build_dataset("test", 2, 0)],
        tok.pad_token_id,
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[])
    trainer = DiffusionTrainer(model=model, args=args, diffusion=DiffusionSection(loss_chunk=loss_chunk))
    seen = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("decoder.layers.0.self_attn.q_proj.lora_A.default"))
    hook = lora_a.register_forward_hook(
        lambda m, a, out: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
    )
    try:
        trainer.compute_loss(model, batch)
    finally:
        hook.remove()
    assert seen and set(seen) == {(True, torch.bfloat16, torch.bfloat16)}


def test_loss_parts_are_summed_on_the_device_without_a_host_read_per_micro_batch(monkeypatch):
    """Each micro-batch's loss parts stay device tensors (a float() per part waits for the GPU every micro-batch);
    they are read back where the Trainer logs."""
    import torch

    from ftkit.diffusion.loss import LossOutput
    from ftkit.sft.trainer import DiffusionTrainer

    trainer = DiffusionTrainer.__new__(DiffusionTrainer)
    trainer._sums, trainer._count, trainer.noise_log, trainer._noise_rows = None, 0, None, []
    outs = [
        LossOutput(
            loss=torch.tensor(1.0),
            diffusion=torch.tensor(d),
            encoder=torch.tensor(2.0 * d),
            t_mean=torch.tensor(0.5),
            self_conditioned=torch.tensor(0.25),
            t=torch.rand(2),
            per_example=torch.rand(2),
        )
        for d in (1.0, 3.0)
    ]

    def host_read(*args, **kwargs):
        raise AssertionError("host read per micro-batch")

    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for out in outs:
        trainer._record(out)
    monkeypatch.undo()
    assert trainer._count == 2
    assert trainer._sums.tolist() == [4.0, 8.0, 1.0, 0.5]
