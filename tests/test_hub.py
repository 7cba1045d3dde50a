"""`ftkit push` against a local fake Hub (127.0.0.1 only): one commit with the right files and model card, clear
errors for 401/403, an unreachable hub, no token and a missing adapter, and the token never shown."""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftkit.errors import FtkitError
from ftkit.hub.push import push_export, push_run
from ftkit.model.lora import TIED_NOTE
from ftkit.recipe import recipe_from_dict

FAKE_TOKEN = "hf_FakeSecretToken0123456789abcdef"


class FakeHub:
    """Speaks the endpoints huggingface_hub calls for create_repo + create_commit, with every file "regular"."""

    def __init__(self, status: int = 200):
        self.status = status
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                self._reply(hub.status if hub.status != 200 else 404, {"error": "nope"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                if hub.status != 200:
                    self._reply(hub.status, {"error": "Invalid credentials in Authorization header"})
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    data = json.loads(body)
                    hub.created.append(data)
                    self._reply(200, {"url": f"{hub.endpoint}/{data['organization']}/{data['name']}"})
                elif path == "/api/validate-yaml":
                    self._reply(200, {"errors": [], "warnings": []})
                elif "/preupload/" in path:
                    files = json.loads(body)["files"]
                    self._reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                elif "/commit/" in path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {
                        ln["value"]["path"]: base64.b64decode(ln["value"]["content"])
                        for ln in lines
                        if ln["key"] == "file"
                    }
                    hub.commits.append(
                        {
                            "path": path,
                            "header": lines[0]["value"],
                            "files": files,
                            "other": [ln for ln in lines[1:] if ln["key"] != "file"],
                        }
                    )
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                else:
                    self._reply(404, {"error": f"unknown endpoint {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """Online (conftest sets offline mode), no token unless a test gives one, no token file from the real home."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)


def make_run(root: Path, tiny: bool = True, hub_repo: str | None = None, with_eval: bool = True) -> Path:
    """A run directory with the files `push` reads (the model itself is never loaded by push); its eval.json is
    the recipe's own evaluation (50 test examples, 16 steps) of its adapter."""
    run = root / "run"
    (run / "base").mkdir(parents=True)
    data = {
        "model": {"base": "tiny" if tiny else "google/diffusiongemma-26B-A4B-it"},
        "lora": {"experts": True, "attention": True},
        "task": {"name": "sudoku", "test_size": 50},
        "eval": {"num_examples": 50, "steps": 16},
    }
    if hub_repo:
        data["hub"] = {"repo": hub_repo}
    recipe = recipe_from_dict(data)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    (run / "adapter_model.safetensors").write_bytes(b"\x00adapter-bytes\x01")
    (run / "tokenizer.json").write_text("{}")
    (run / "tokenizer_config.json").write_text("{}")
    (run / "summary.json").write_text(
        json.dumps(
            {
                "steps": 300,
                "loss_start": 6.4451,
                "loss_end": 1.2345,
                "canvas_tokens_per_second": 4878.8,
                "trainable_parameters": 198144,
                "train_seconds": 61.2,
                "device": "cpu",
            }
        )
    )
    (run / "loss.png").write_bytes(b"\x89PNG fake")
    (run / "train_log.jsonl").write_text("{}\n")  # not part of the upload
    (run / "base" / "config.json").write_text("{}")
    (run / "base" / "model.safetensors").write_bytes(b"base-weights")
    if with_eval:
        (run / "eval.json").write_text(json.dumps(eval_report(recipe, run)))
    return run


def eval_report(recipe, run: Path, **changes) -> dict:
    """An eval.json as `ftkit eval` writes it (the fields push reads)."""
    from ftkit.evaluation.result_files import file_sha256

    cfg = {**dataclasses.asdict(recipe.eval), **changes.pop("eval", {})}
    return {
        "file": "eval.json",
        "canonical": True,
        "split": cfg["split"],
        "adapter": True,
        "checkpoint": None,
        "num_examples": 50,
        "num_examples_requested": 50,
        "primary": "plain",
        "eval": cfg,
        "adapter_sha256": file_sha256(run / "adapter_model.safetensors"),
        "metrics": {"solve_rate": 0.42, "cell_accuracy_blanks": 0.9, "solve_rate/easy": 0.6, "count": 50.0},
        "modes": {"plain": {"mean_steps_used": 9.5, "tokens_per_forward": 4.25}},
        **changes,
    }


EXPECTED_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "recipe.yaml",
    "eval.json",
    "summary.json",
    "loss.png",
    "README.md",
    "base/config.json",
    "base/model.safetensors",
}


def test_push_uploads_one_commit_with_files_and_card(tmp_path):
    run = make_run(tmp_path)
    with FakeHub() as hub:
        url = push_run(run, repo="alice/tiny-sudoku", private=True, endpoint=hub.endpoint, token=FAKE_TOKEN)
    assert url == f"{hub.endpoint}/alice/tiny-sudoku"
    assert hub.created == [{"name": "tiny-sudoku", "organization": "alice", "visibility": "private", "type": "model"}]
    assert len(hub.commits) == 1, "everything goes in one commit"
    commit = hub.commits[0]
    assert commit["path"] == "/api/models/alice/tiny-sudoku/commit/main"
    assert set(commit["files"]) == EXPECTED_FILES
    assert commit["other"] == []
    assert commit["files"]["adapter_model.safetensors"] == (run / "adapter_model.safetensors").read_bytes()
    assert commit["files"]["base/model.safetensors"] == b"base-weights"
    # The token was sent as a bearer token on every request.
    assert all(h.get("authorization") == f"Bearer {FAKE_TOKEN}" for _, _, h in hub.requests)

    card = commit["files"]["README.md"].decode()
    front = card.split("---")[1]
    assert "library_name: peft" in front
    for tag in ("diffusion-gemma", "block-diffusion", "lora", "ftkit", "sudoku"):
        assert f"- {tag}" in front
    assert TIED_NOTE in card and "Do not merge" in card
    assert "random-init *tiny*" in card and 'subfolder="base"' in card
    assert "experts.gate_up_proj" in card and "experts.down_proj" in card
    assert "6.445 → 1.234" in card or "6.445 → 1.235" in card
    assert "4879" in card  # tokens/s
    assert "| solve_rate | 42.0% | 60.0% |" in card
    assert 'PeftModel.from_pretrained(base, "alice/tiny-sudoku")' in card


def test_card_for_real_base_names_it_in_front_matter(tmp_path):
    run = make_run(tmp_path, tiny=False, with_eval=False)
    folder = Path(push_run(run, repo="bob/sudoku-lora", dry_run=True, allow_no_eval=True))
    card = (folder / "README.md").read_text()
    assert "base_model: google/diffusiongemma-26B-A4B-it" in card
    assert "random-init" not in card and not (folder / "base").exists()
    assert "Not evaluated" in card and not (folder / "eval.json").exists()
    assert "4-bit nf4" not in card and "none (full-precision base)" in card


def test_card_metadata_loads_back_as_an_adapter_with_scores(tmp_path):
    """The Hub reads the front matter: base_model + library_name peft make it an adapter of the base, model-index
    carries the canonical eval's metrics. Loaded back with huggingface_hub's own ModelCard."""
    from huggingface_hub import ModelCard

    run = make_run(tmp_path, tiny=False)
    folder = Path(push_run(run, repo="bob/sudoku-lora", dry_run=True))
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.base_model == "google/diffusiongemma-26B-A4B-it" and data.library_name == "peft"
    assert {"diffusion-gemma", "lora", "peft", "sudoku"} <= set(data.tags)
    assert data.model_name == "sudoku-lora"
    scores = {r.metric_type: r for r in data.eval_results}
    assert set(scores) == {"solve_rate", "cell_accuracy_blanks"}  # overall metrics; strata and counts stay in the table
    assert scores["solve_rate"].metric_value == 42.0 and scores["solve_rate"].dataset_split == "test"
    assert scores["solve_rate"].dataset_type == "sudoku-generated"


def test_card_cites_only_the_canonical_eval(tmp_path):
    """A partial evaluation beside eval.json is neither uploaded nor cited; a partial one *as* eval.json (what an
    older ftkit wrote for `eval --split train -n 2`) is refused, and so is a run without any."""
    run = make_run(tmp_path)
    recipe = recipe_from_dict(__import__("yaml").safe_load((run / "recipe.yaml").read_text()))
    partial = eval_report(
        recipe,
        run,
        file="eval_train_n2.json",
        canonical=False,
        num_examples=2,
        num_examples_requested=2,
        eval={"split": "train"},
        metrics={"solve_rate": 0.99, "count": 2.0},
    )
    (run / "eval_train_n2.json").write_text(json.dumps(partial))
    folder = Path(push_run(run, repo="alice/x", dry_run=True))
    card = (folder / "README.md").read_text()
    assert "| solve_rate | 42.0% | 60.0% |" in card and "99.0%" not in card and "split `test`, 50 examples" in card
    assert not (folder / "eval_train_n2.json").exists() and (folder / "eval.json").is_file()

    (run / "eval.json").write_text(json.dumps(partial))
    with pytest.raises(FtkitError, match=r"eval\.json: not the run's own evaluation \(split 'train'.*2 examples"):
        push_run(run, repo="alice/x", dry_run=True)
    folder = Path(push_run(run, repo="alice/x", dry_run=True, allow_no_eval=True))
    assert not (folder / "eval.json").exists() and "Not evaluated" in (folder / "README.md").read_text()

    (run / "eval.json").unlink()
    with pytest.raises(FtkitError, match=r"no eval\.json.*ftkit eval.*--allow-no-eval"):
        push_run(run, repo="alice/x", dry_run=True)

    # An eval.json of an adapter since retrained is stale.
    (run / "eval.json").write_text(json.dumps(eval_report(recipe, run)))
    (run / "adapter_model.safetensors").write_bytes(b"retrained")
    with pytest.raises(FtkitError, match="another adapter_model.safetensors"):
        push_run(run, repo="alice/x", dry_run=True)


def test_card_states_sandbox_isolation_and_can_describe_a_full_model(tmp_path):
    from ftkit.hub.card import model_card
    from ftkit.hub.plan import plan_push

    run = make_run(tmp_path)
    report = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps({**report, "sandbox": {"isolation": "namespaces+seccomp"}}))
    plan = plan_push(run, "alice/x")
    assert "isolation level: `namespaces+seccomp`" in model_card(plan)
    full = model_card(dataclasses.replace(plan, full_model=True))
    assert "library_name: transformers" in full and "fine-tuned model" in full and "Do not merge" not in full


def test_dry_run_writes_exact_folder_and_uploads_nothing(tmp_path):
    run = make_run(tmp_path)
    with FakeHub() as hub:
        out = push_run(run, repo="alice/x", dry_run=True, endpoint=hub.endpoint)
        assert hub.requests == []
    folder = Path(out)
    assert folder == run / "hub_upload"
    got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert got == EXPECTED_FILES
    assert (folder / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()
    # A second dry run replaces the folder (and never nests the previous upload folder into it).
    out2 = push_run(run, repo="alice/x", dry_run=True, dry_run_dir=tmp_path / "elsewhere")
    got2 = {p.relative_to(out2).as_posix() for p in Path(out2).rglob("*") if p.is_file()}
    assert got2 == EXPECTED_FILES


def test_dry_run_and_real_push_send_the_same_files(tmp_path):
    run = make_run(tmp_path, hub_repo="carol/from-recipe")
    folder = Path(push_run(run, dry_run=True))
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with FakeHub() as hub:
        push_run(run, endpoint=hub.endpoint, token=FAKE_TOKEN)  # repo from the recipe's hub.repo
    assert hub.created[0]["organization"] == "carol" and hub.created[0]["name"] == "from-recipe"
    assert hub.commits[0]["files"] == local


@pytest.mark.parametrize("status", [401, 403])
def test_permission_denied_is_clear_and_token_free(tmp_path, status):
    run = make_run(tmp_path)
    with FakeHub(status=status) as hub, pytest.raises(FtkitError) as e:
        push_run(run, repo="alice/x", endpoint=hub.endpoint, token=FAKE_TOKEN)
    msg = str(e.value)
    assert "permission denied" in msg and f"HTTP {status}" in msg and "hf auth login" in msg
    assert FAKE_TOKEN not in msg and FAKE_TOKEN not in repr(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_is_clear(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(FtkitError) as e:
        push_run(run, repo="alice/x", endpoint=f"http://127.0.0.1:{_free_port()}", token=FAKE_TOKEN)
    assert "cannot reach the Hugging Face Hub" in str(e.value) and FAKE_TOKEN not in str(e.value)


def test_no_token_is_clear(tmp_path):
    run = make_run(tmp_path)
    with FakeHub() as hub, pytest.raises(FtkitError, match=r"hf auth login.*HF_TOKEN"):
        push_run(run, repo="alice/x", endpoint=hub.endpoint)
    assert hub.requests == []


def test_missing_repo_and_bad_repo_and_missing_adapter(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(FtkitError, match=r"--repo.*hub\.repo"):
        push_run(run, token=FAKE_TOKEN)
    with pytest.raises(FtkitError, match=r"USER/NAME"):
        push_run(run, repo="no-slash", token=FAKE_TOKEN)
    (run / "adapter_model.safetensors").unlink()
    with pytest.raises(FtkitError, match=r"train first"):
        push_run(run, repo="alice/x", dry_run=True)
    with pytest.raises(FtkitError, match=r"not an ftkit run directory|no such run directory"):
        push_run(tmp_path / "nowhere", repo="alice/x", dry_run=True)


def test_cli_push_uses_env_token_and_never_prints_it(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants as constants

    from ftkit.cli import app

    run = make_run(tmp_path)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    runner = CliRunner()
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        ok = runner.invoke(app, ["push", str(run), "--repo", "alice/cli", "--public"])
    assert ok.exit_code == 0, ok.output
    assert f"{hub.endpoint}/alice/cli" in ok.output
    assert hub.created[0]["visibility"] == "public"
    assert any(h.get("authorization") == f"Bearer {FAKE_TOKEN}" for _, _, h in hub.requests)
    with FakeHub(status=401) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        bad = runner.invoke(app, ["push", str(run), "--repo", "alice/cli"])
    assert bad.exit_code == 2
    assert "permission denied" in bad.output and "Traceback" not in bad.output
    for text in (ok.output, bad.output, caplog.text):
        assert FAKE_TOKEN not in text
    dry = runner.invoke(app, ["push", str(run), "--dry-run", "--dry-run-dir", str(tmp_path / "up")])
    assert dry.exit_code == 0 and (tmp_path / "up" / "README.md").is_file()


def test_push_of_an_export_uploads_the_merged_model_card_and_eval(tmp_path, char_tokenizer):
    """`ftkit push OUT` on an `ftkit export` folder: one commit of exactly the files the export wrote (merged
    weights, config, generation config, tokenizer, card, the run's eval.json), the card naming the repo."""
    from test_export import make_run as make_trained_run

    from ftkit.export import export_run
    from ftkit.recipe import load_recipe

    run, _, _ = make_trained_run(tmp_path, char_tokenizer, {"shared_stacks": True})
    recipe = load_recipe(run / "recipe.yaml")
    report = eval_report(recipe, run)
    report.update(num_examples=recipe.eval.num_examples, num_examples_requested=recipe.eval.num_examples)
    (run / "eval.json").write_text(json.dumps(report))
    export_run(run, tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "ftkit_export.json").read_text())
    assert manifest["eval"] == "eval.json" and manifest["form"] == "tied"
    with FakeHub() as hub:
        url = push_export(tmp_path / "export", repo="alice/merged", endpoint=hub.endpoint, token=FAKE_TOKEN)
    assert url.endswith("alice/merged")
    (commit,) = hub.commits
    assert set(commit["files"]) == set(manifest["files"])
    assert commit["files"]["eval.json"] == (run / "eval.json").read_bytes()
    card = commit["files"]["README.md"].decode()
    assert "library_name: transformers" in card and "| solve_rate | 42.0% |" in card
    assert 'from_pretrained("alice/merged"' in card and "PATH_OR_REPO" not in card
    # Through the CLI, an export folder is recognized; without an evaluation it is refused.
    from ftkit.cli import app

    result = CliRunner().invoke(app, ["push", str(tmp_path / "export"), "--dry-run"])
    assert result.exit_code == 0, result.output
    (tmp_path / "export" / "eval.json").unlink()
    manifest["eval"] = None
    manifest["files"].remove("eval.json")
    (tmp_path / "export" / "ftkit_export.json").write_text(json.dumps(manifest))
    with pytest.raises(FtkitError, match="holds no evaluation"):
        push_export(tmp_path / "export", repo="alice/merged", endpoint="http://127.0.0.1:9", token=FAKE_TOKEN)


def test_a_failed_dry_run_leaves_no_folder_it_made(tmp_path):
    """`push --dry-run --dry-run-dir a/b/c` that fails while staging leaves neither the staging folder nor the
    parent folders it created; folders that were there before stay."""
    from ftkit.hub.stage import stage_in_place

    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper" / "upload"

    def fail(folder):
        (folder / "half.txt").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        stage_in_place(target, fail)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]
    stage_in_place(target, lambda folder: (folder / "ok.txt").write_text("y"))
    assert (target / "ok.txt").read_text() == "y"
