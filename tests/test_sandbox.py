"""The sandbox contains what generated code can do: time, processes, memory, files, network, secrets; what it can
see (only the interpreter and its work dir); and it never falls back to its weak level unasked."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ftkit.tasks.sandbox import SandboxPolicy, WeakSandboxRefused, isolation_level, namespaces_available, run_python

LEVELS = [
    pytest.param("namespace", marks=pytest.mark.skipif(not namespaces_available(), reason="unshare unavailable")),
    "prelude",
]


def _processes_with_home(home: str) -> list[int]:
    """Host pids of processes whose environment has HOME=`home` (the sandbox sets HOME to its work dir)."""
    needle = f"HOME={home}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture
def world_writable_sentinel():
    """A sentinel in a world-writable dir outside the sandbox: file permissions alone would not protect it."""
    folder = tempfile.mkdtemp(prefix="ftkit-sentinel-")
    os.chmod(folder, 0o777)
    sentinel = Path(folder, "sentinel.txt")
    sentinel.write_text("keep me")
    os.chmod(sentinel, 0o666)
    yield sentinel
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("isolation", LEVELS)
def test_runs_code_and_reports_exit_status(isolation):
    ok = run_python("print(sum(range(10)))", isolation=isolation)
    assert ok.ok and ok.returncode == 0 and ok.stdout.strip() == "45" and not ok.timed_out
    assert ok.isolation == isolation
    bad = run_python("import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)", isolation=isolation)
    assert not bad.ok and bad.returncode == 3 and "oops" in bad.stderr


@pytest.mark.parametrize("isolation", LEVELS)
def test_infinite_loop_times_out(isolation):
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1, isolation=isolation)
    assert result.timed_out and not result.ok
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("isolation", LEVELS)
def test_fork_bomb_is_contained_and_cleaned_up(isolation):
    code = "import os\nprint(os.environ['HOME'], flush=True)\nwhile True:\n    os.fork()\n"
    start = time.monotonic()
    result = run_python(code, timeout_s=2, isolation=isolation)
    assert not result.ok
    assert time.monotonic() - start < 8
    home = result.stdout.splitlines()[0]
    time.sleep(0.2)
    assert _processes_with_home(home) == []  # nothing of the bomb survives the run
    assert os.getpid() > 0 and run_python("print('alive')").stdout.strip() == "alive"


@pytest.mark.skipif(not namespaces_available(), reason="unshare unavailable")
def test_process_limit_is_enforced_by_the_kernel():
    code = (
        "import os, time\n"
        "made = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        made += 1\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
        "print('made', made)\n"
    )
    result = run_python(code, timeout_s=5, max_processes=8, isolation="namespace")
    assert "refused" in result.stdout, result
    made = int(result.stdout.split("made")[1])
    assert made < 8


@pytest.mark.parametrize("isolation", LEVELS)
def test_cannot_delete_or_overwrite_files_outside_the_work_dir(isolation, world_writable_sentinel):
    path = str(world_writable_sentinel)
    code = (
        "import os\n"
        "errors = 0\n"
        f"for attempt in (lambda: os.remove({path!r}), lambda: open({path!r}, 'w').write('x'),\n"
        f"                lambda: open(os.path.join(os.path.dirname({path!r}), 'new.txt'), 'w')):\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError:\n"
        "        errors += 1\n"
        "open('inside.txt', 'w').write('fine')\n"  # the work dir itself stays writable
        "print(errors, open('inside.txt').read())\n"
    )
    result = run_python(code, isolation=isolation)
    assert result.ok, result
    assert result.stdout.split() == ["3", "fine"]
    assert world_writable_sentinel.read_text() == "keep me"
    assert sorted(os.listdir(world_writable_sentinel.parent)) == ["sentinel.txt"]


@pytest.mark.parametrize("isolation", LEVELS)
def test_memory_hog_is_stopped(isolation):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    result = run_python(code, memory_mb=256, timeout_s=10, isolation=isolation)
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr


@pytest.mark.parametrize("isolation", LEVELS)
def test_network_connect_fails(isolation):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__)\n"
        )
        result = run_python(code, isolation=isolation)
        assert result.stdout.startswith("refused"), result
        with pytest.raises(socket.timeout):
            server.accept()  # the sandbox never reached the listening socket
    finally:
        server.close()


@pytest.mark.parametrize("isolation", LEVELS)
def test_secrets_are_not_passed_and_work_dir_is_removed(isolation, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    result = run_python("import os\nprint(os.getcwd())\nprint(dict(os.environ))", isolation=isolation)
    assert result.ok
    assert "hf_secret_value" not in result.stdout and "HF_TOKEN" not in result.stdout
    assert not os.path.exists(result.stdout.splitlines()[0])


def test_output_is_truncated():
    result = run_python("print('x' * 1_000_000)", max_output_bytes=1000)
    assert result.ok and len(result.stdout) == 1000


# ----------------------------------------------------------------------------------------------------------------
# What generated code can see: the interpreter and its work dir, nothing of the user's


PROJECT = Path(__file__).resolve().parents[1]
PEEK = (
    "import json, os, sys\n"
    "def can_read(path):\n"
    "    try:\n"
    "        open(path).read()\n"
    "        return 'read'\n"
    "    except OSError as e:\n"
    "        return type(e).__name__\n"
    "try:\n"
    "    root = sorted(os.listdir('/'))\n"
    "except OSError as e:\n"
    "    root = type(e).__name__\n"
    "print(json.dumps({'root': root,\n"
    "                  'token': can_read(sys.argv[1] if len(sys.argv) > 1 else TOKEN),\n"
    "                  'project': os.path.exists(PROJECT), 'etc': os.path.exists('/etc/passwd'),\n"
    "                  'home': os.path.exists(HOME)}))\n"
)


def _peek(token: Path, home: Path) -> str:
    return f"TOKEN = {str(token)!r}\nPROJECT = {str(PROJECT)!r}\nHOME = {str(home)!r}\n" + PEEK


@pytest.fixture
def fake_home():
    """A HOME holding a Hugging Face token file, readable by anyone: only the sandbox can keep it in."""
    home = Path(tempfile.mkdtemp(prefix="ftkit-home-"))
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_FakeTokenThatMustNotLeak")
    for p in (home, home / ".cache", token.parent):
        os.chmod(p, 0o755)
    os.chmod(token, 0o644)
    yield home, token
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.skipif(not namespaces_available(), reason="unshare unavailable")
def test_generated_code_sees_a_minimal_read_only_tree(fake_home, monkeypatch):
    home, token = fake_home
    monkeypatch.setenv("HOME", str(home))
    result = run_python(_peek(token, home), isolation="namespace")
    assert result.ok, result
    seen = json.loads(result.stdout)
    assert seen["token"] == "FileNotFoundError" and "hf_" not in result.stdout
    assert not seen["project"] and not seen["etc"] and not seen["home"]
    allowed = {"usr", "bin", "lib", "lib64", "lib32", "libx32", "dev", "proc", "tmp", "sbin"}
    allowed |= {Path(p).parts[1] for p in (sys.prefix, sys.base_prefix, "/usr/bin/python3")}
    assert set(seen["root"]) <= allowed, seen["root"]
    assert not {"root", "home", "work", "etc", "var"} & set(seen["root"])
    writes = run_python(
        "import os\nfor p in ('/x', '/usr/x', '/tmp/x'):\n"
        "    try:\n        open(p, 'w')\n        print('wrote', p)\n"
        "    except OSError as e:\n        print(type(e).__name__)\n",
        isolation="namespace",
    )
    assert "wrote" not in writes.stdout and len(writes.stdout.split()) == 3, writes


def test_prelude_refuses_reading_outside_the_interpreter_and_work_dir(fake_home):
    home, token = fake_home
    result = run_python(_peek(token, home), isolation="prelude")
    assert result.ok, result
    seen = json.loads(result.stdout)
    assert seen["token"] == "PermissionError" and "hf_" not in result.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
    reason="switches to a throwaway unprivileged uid, which needs root",
)
def test_an_unprivileged_user_cannot_read_its_own_token_file(fake_home):
    """ftkit run by an ordinary user (not root): the sandbox keeps that user's own token file (mode 600) from the
    code, although the user itself can read it."""
    home, token = fake_home
    uid = 4_000_000 + os.getpid() % 100_000
    for p in [home, *home.rglob("*")]:
        os.chown(p, uid, uid)
    os.chmod(token, 0o600)
    pkg = Path(tempfile.mkdtemp(prefix="ftkit-pkg-"))
    try:
        os.chmod(pkg, 0o755)
        (pkg / "ftkit" / "tasks").mkdir(parents=True)
        for name in ("__init__.py", "errors.py", "tasks/sandbox.py"):
            shutil.copyfile(PROJECT / "ftkit" / name, pkg / "ftkit" / name)
        (pkg / "ftkit" / "tasks" / "__init__.py").write_text("")  # the sandbox alone, without the task plugins
        script = pkg / "probe.py"
        script.write_text(
            "import json, os, sys\n"
            f"sys.path.insert(0, {str(pkg)!r})\n"
            "from ftkit.tasks.sandbox import run_python, isolation_level\n"
            f"code = {_peek(token, home)!r}\n"
            f"direct = open({str(token)!r}).read()\n"
            "result = run_python(code)\n"
            "print(json.dumps({'uid': os.getuid(), 'direct': direct, 'level': result.isolation, 'ok': result.ok,\n"
            "                  'seen': result.stdout, 'stderr': result.stderr}))\n"
        )
        for p in pkg.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        proc = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-I", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
            cwd=str(pkg),
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["uid"] == uid and report["direct"] == "hf_FakeTokenThatMustNotLeak"  # the user can read it
        if report["level"] == "prelude":
            pytest.skip("unprivileged user namespaces are disabled here")  # (the prelude is tested above)
        assert report["ok"], report
        seen = json.loads(report["seen"])
        assert seen["token"] == "FileNotFoundError" and not seen["home"] and not seen["project"], seen
        assert "hf_" not in report["seen"]
    finally:
        shutil.rmtree(pkg, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# No silent weak sandbox


@pytest.fixture
def no_namespaces(monkeypatch):
    import ftkit.tasks.sandbox as sb

    monkeypatch.setattr(sb, "_namespace_probe", lambda: (False, "unshare: Operation not permitted"))


def test_weak_sandbox_needs_an_opt_in(no_namespaces):
    with pytest.raises(WeakSandboxRefused) as err:
        run_python("print('ran')")
    message = str(err.value)
    for needle in (
        "not a security boundary",
        "unshare: Operation not permitted",
        "kernel.apparmor_restrict_unprivileged_userns=0",
        "kernel.unprivileged_userns_clone=1",
        "--allow-weak-sandbox",
        "eval.allow_weak_sandbox: true",
    ):
        assert needle in message
    with SandboxPolicy(allow_weak=True) as outer:
        with SandboxPolicy() as inner:  # an enclosing scope's opt-in is enough
            result = run_python("print('ran')")
    assert result.ok and result.isolation == "prelude"
    assert outer.record() == inner.record() == {"isolation": "prelude", "programs": 1, "by_level": {"prelude": 1}}
    with pytest.raises(WeakSandboxRefused):  # the scope is over
        run_python("print('ran')")


ADD = {
    "prefix": "def add(a, b):\n    total = a\n",
    "middle": "    total += b\n",
    "suffix": "    return total\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}


def _code_run(monkeypatch, allow_weak: bool = False):
    """evaluate_run on an in-memory code_infill run whose sampler answers correctly, so each check runs the tests."""
    import dataclasses
    from types import SimpleNamespace

    import torch
    from test_evaluate import oracle_sampler

    import ftkit.evaluation.evaluate as ev
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.recipe import EvalSection, Recipe, TaskSection
    from ftkit.tasks import make_task

    task = make_task("code_infill", {})
    examples = [
        task._example(
            f"add{i}", "user", ADD["prefix"], ADD["middle"], ADD["suffix"], test=ADD["test"], entry_point="add"
        )
        for i in range(2)
    ]
    monkeypatch.setattr(ev, "load_examples", lambda *a, **k: examples)  # not through the data cache
    tokenizer = build_char_tokenizer()
    # The oracle sampler answers without a model, so there is no vocabulary to build token masks for.
    recipe = Recipe(
        task=TaskSection(name="code_infill", test_size=2),
        eval=EvalSection(steps=1, batch_size=2, num_examples=2, allow_weak_sandbox=allow_weak, token_masks=False),
    )
    from ftkit.diffusion.token_layout import layout_example

    layouts = [layout_example(tokenizer, task.to_prompt_canvas(e), 96, 512) for e in examples]
    real = getattr(ev.evaluate_examples, "real", ev.evaluate_examples)  # not an earlier call's stand-in

    def with_oracle(*a, **k):
        return real(*a, sampler=oracle_sampler(layouts, []), **k)

    with_oracle.real = real
    monkeypatch.setattr(ev, "evaluate_examples", with_oracle)
    run = SimpleNamespace(
        recipe=dataclasses.replace(recipe),
        model=torch.nn.Linear(1, 1),
        tokenizer=tokenizer,
        task=task,
        canvas_length=96,
    )
    monkeypatch.setattr(ev, "_load_run", lambda run_dir, adapter, checkpoint=None: run)


def test_eval_json_records_the_isolation_that_ran_the_code(tmp_path, monkeypatch):
    import ftkit.evaluation.evaluate as ev
    from ftkit.evaluation.request import EvalRequest

    _code_run(monkeypatch)
    report = ev.evaluate_run(EvalRequest(tmp_path))
    assert report["metrics"]["pass_rate"] == 1.0  # the tests really ran, and passed
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["sandbox"] == {"isolation": isolation_level(), "programs": 2, "by_level": {isolation_level(): 2}}


def test_eval_on_a_weak_machine_stops_unless_told(tmp_path, monkeypatch, no_namespaces):
    from typer.testing import CliRunner

    import ftkit.evaluation.evaluate as ev
    from ftkit.cli import app
    from ftkit.evaluation.request import EvalRequest

    _code_run(monkeypatch)
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    # (Piped, eval's progress lines come first; the error is the last line.)
    assert result.output.splitlines()[-1].startswith("error: model-written code would run in the weak sandbox")
    assert not (tmp_path / "eval.json").exists()

    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--allow-weak-sandbox"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["sandbox"]["isolation"] == "prelude"

    _code_run(monkeypatch, allow_weak=True)  # the recipe key instead of the flag
    report = ev.evaluate_run(EvalRequest(tmp_path))
    assert report["sandbox"] == {"isolation": "prelude", "programs": 2, "by_level": {"prelude": 2}}
