"""The shape of ftkit.run: RunPaths (ftkit.run.paths) alone names the files and folders of a run directory (no other
module of ftkit spells one of those names itself), and both trainers hold the atomic checkpoint writer rather than
one inheriting it from the other."""

import ast
import inspect
from pathlib import Path

from ftkit.run.paths import RL_STAGE, RunPaths, is_rl_summary

PACKAGE = Path(__file__).resolve().parents[1] / "ftkit"
OWNER = PACKAGE / "run" / "paths.py"
# Names that are also ordinary words or the standard files of any Hugging Face folder (an export, a model group
# "base/experts", the recipe key `model.base`): a literal of these counts only where it is joined onto a path.
GENERIC = {"base", RunPaths.FULL_CONFIG, RunPaths.FULL_WEIGHTS, RunPaths.GENERATION_CONFIG}


def run_file_names() -> set[str]:
    names = set()
    for key, value in vars(RunPaths).items():
        if key.isupper():
            names.update([value] if isinstance(value, str) else value)
    return names


def spelled_names(source: str) -> list[tuple[int, str]]:
    """(line, literal) for each string in `source` that spells a run-directory name (docstrings aside)."""
    names = run_file_names()
    tree = ast.parse(source)
    docstrings = {
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    joined = {
        id(node.right)
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        text = node.value
        name = next((n for n in names if text == n or text.startswith(n + "/")), None)
        if name is not None and (name not in GENERIC or id(node) in joined):
            found.append((node.lineno, text))
    return sorted(found)


def test_the_scan_finds_a_run_file_name_spelled_out():
    planted = 'def f(run_dir):\n    """Reads summary.json."""\n'
    planted += '    return run_dir / "base", "eval.json", f"checkpoints/{1}"\n'
    assert spelled_names(planted) == [(3, "base"), (3, "checkpoints/"), (3, "eval.json")]
    assert spelled_names('group = "base/experts"\nkey = "base"\n') == []  # not a path


def test_only_run_paths_names_run_directory_files():
    spelled = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != OWNER
        for line, text in spelled_names(path.read_text(encoding="utf-8"))
    ]
    assert spelled == [], "use ftkit.run.paths.RunPaths instead of spelling these names"


def test_run_paths_are_the_names_under_the_run_directory(tmp_path):
    paths = RunPaths(str(tmp_path))
    assert paths.root == tmp_path
    assert paths.summary == tmp_path / "summary.json"
    assert paths.checkpoints == tmp_path / "checkpoints"
    assert paths / RunPaths.ADAPTER_WEIGHTS == tmp_path / "adapter_model.safetensors"
    assert RunPaths.staging(RunPaths.REFERENCE) == ".staging-reference_adapter"
    assert RunPaths.weight_files(full=True) == ("config.json", "model.safetensors")


def test_the_rl_stage_is_written_and_read_through_one_name():
    from ftkit.rl import run as rl_run

    assert is_rl_summary({"stage": RL_STAGE}) and not is_rl_summary({})
    assert "RL_STAGE" in Path(rl_run.__file__).read_text()


def test_both_trainers_hold_the_checkpoint_writer_instead_of_inheriting_it():
    from transformers import Trainer

    from ftkit.rl.trainer import RLTrainer
    from ftkit.sft.trainer import DiffusionTrainer

    assert RLTrainer.__bases__ == (Trainer,) and DiffusionTrainer.__bases__ == (Trainer,)
    for trainer in (RLTrainer, DiffusionTrainer):
        assert "checkpoint_writer.save" in inspect.getsource(trainer._save_checkpoint)
