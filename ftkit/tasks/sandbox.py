"""Run untrusted (model-generated) Python in a contained subprocess.

`run_python(code)` writes `code` to `main.py` in a fresh temporary working directory (deleted afterwards) and runs
`python -I main.py` there with a minimal environment (PATH, LANG, HOME=the work dir: no HF_TOKEN or any other
variable of ours is passed through), stdin from /dev/null, and stdout/stderr captured to files (bounded by the
file-size limit and truncated to `max_output_bytes`).

Two isolation levels; `isolation="auto"` picks the strongest that works on this machine (`isolation_level()`):

"namespace" (enforced by the kernel) — used when `unshare` can create the namespaces:
  * resource limits set in `preexec_fn`: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (processes, so a fork bomb
    fails), RLIMIT_FSIZE (file size), RLIMIT_NOFILE;
  * a new session (`start_new_session`) and PID namespace; on timeout the whole process group is SIGKILLed, and
    `unshare --kill-child` takes every process of the namespace down with it, including ones that called setsid;
  * a new network namespace with no interfaces up: any connect fails (ENETUNREACH);
  * a new mount namespace whose root is a fresh, read-only tmpfs holding only what the interpreter needs: its
    installation (sys.prefix and base prefix) and the system library directories (/usr, /lib*, /bin), read-only
    bind mounts; /dev/null, /dev/zero, /dev/random, /dev/urandom; a read-only /proc of the sandbox's own PID
    namespace; and the work dir, the only writable place. The old root is detached (pivot_root + lazy unmount),
    so the home directory, token files (~/.cache/huggingface/token), the project tree and /etc do not exist for
    the code. The setup refuses to run the code if any mount but the work dir is still writable;
  * no capabilities: all are dropped (bounding set cleared, no_new_privs) before the code starts, so it cannot
    remount anything;
  * when we run as root, the code runs as a throwaway unprivileged uid (fresh per call): root ignores RLIMIT_NPROC
    and may open block devices, an unprivileged uid does neither and cannot read root-only files. If the current
    interpreter is not reachable by other users (e.g. under /root), the system python3 is used (stdlib only).
    As non-root we use a user namespace (`unshare --map-root-user`) instead and keep our own uid.

"prelude" (best effort, NOT a security boundary) — where namespaces are unavailable, and only when the caller
opts in (see below):
  * the same rlimits, session and process-group kill (so timeouts, memory hogs and fork bombs are still contained
    by the kernel; as root the code is still moved to an unprivileged uid when the interpreter allows it);
  * a Python audit hook installed before the code runs refuses sockets, reads outside the interpreter's
    installation and the work dir, writes/deletes/renames outside the work dir, subprocesses and ctypes. Audit
    hooks cannot be removed from Python, but native code could bypass them.

No silent fallback: `isolation="auto"` on a machine without namespaces raises WeakSandboxRefused (an FtkitError
saying why and how to enable them) unless a `SandboxPolicy(allow_weak=True)` scope is active (the recipe key
`eval.allow_weak_sandbox`, the CLI flag `--allow-weak-sandbox`). A SandboxPolicy scope also counts the programs run
in it per isolation level, which is how a report records the isolation it used.
"""

from __future__ import annotations

import contextvars
import functools
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ftkit.errors import FtkitError

Isolation = Literal["auto", "namespace", "prelude"]

# Exit status and stderr line of the namespace setup when a mount could not be made read-only: we refuse to run.
SETUP_REFUSED = 97
SETUP_REFUSED_MARK = "ftkit-sandbox: a mount stayed writable; refusing to run"


class SandboxUnavailable(RuntimeError):
    """The requested isolation level cannot be set up on this machine."""


class WeakSandboxRefused(FtkitError):
    """Only the prelude is available and nobody opted in to it."""


ENABLE_NAMESPACES = (
    "enable unprivileged user namespaces (Ubuntu 23.10+: "
    "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`;"
    " Debian and older kernels: `sudo sysctl -w kernel.unprivileged_userns_clone=1`; needs `unshare` and `setpriv` "
    "from util-linux)"
)

_SCOPES: contextvars.ContextVar[tuple[SandboxPolicy, ...]] = contextvars.ContextVar("ftkit_sandbox_scopes", default=())


class SandboxPolicy:
    """`with SandboxPolicy(allow_weak=...) as policy:` — whether code may run in the prelude sandbox inside the
    scope (any enclosing scope allowing it is enough), and what ran: `policy.record()` is None when no program ran,
    else {"isolation": the weakest level used, "programs": how many, "by_level": {level: count}}. A policy can be
    entered several times; its counts add up."""

    def __init__(self, allow_weak: bool = False):
        self.allow_weak = allow_weak
        self.runs: Counter[str] = Counter()
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> SandboxPolicy:
        self._tokens.append(_SCOPES.set((*_SCOPES.get(), self)))
        return self

    def __exit__(self, *exc) -> None:
        _SCOPES.reset(self._tokens.pop())

    def record(self) -> dict[str, Any] | None:
        if not self.runs:
            return None
        weakest = "prelude" if self.runs["prelude"] else "namespace"
        return {"isolation": weakest, "programs": sum(self.runs.values()), "by_level": dict(self.runs)}


def weak_allowed() -> bool:
    return any(scope.allow_weak for scope in _SCOPES.get())


def _count(level: str) -> None:
    for scope in _SCOPES.get():
        scope.runs[level] += 1


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 within the time limit
    returncode: int | None  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    isolation: str = ""  # the level that was used


# Runs inside the new namespaces, still privileged there: build a read-only root on a tmpfs holding the read-only
# binds (argument list up to "--"), the devices and the work dir; pivot into it and detach the old root; verify that
# only the work dir is writable; then drop every capability (and, as root, the uid) and exec the interpreter.
_NAMESPACE_SETUP = r"""
set -e
root="$1"; work="$2"; shift 2
mount -t tmpfs -o mode=755,size=1m ftkit-sandbox "$root"
while [ "$1" != "--" ]; do
  src="$1"; dst="$root$1"; shift
  mkdir -p "$(dirname "$dst")"
  if [ -L "$src" ]; then ln -s "$(readlink "$src")" "$dst"; continue; fi
  if [ -d "$src" ]; then mkdir -p "$dst"; else : > "$dst"; fi
  mount --bind "$src" "$dst"
  mount -o remount,bind,ro "$dst"
done
shift
mkdir -p "$root$work" "$root/proc" "$root/.old"
mount --bind "$work" "$root$work"
mount -t proc -o ro,nosuid,nodev,noexec proc "$root/proc"
cd "$root"
pivot_root . .old
cd /
umount -l /.old
rmdir /.old
mount -o remount,bind,ro /
# Every mount but the work dir must be read-only now (plain sh: awk may be a link into /etc, which is gone).
while read -r _ _ _ _ mp opts _; do
  [ "$mp" = "$work" ] && continue
  case "$opts" in ro|ro,*) ;; *) echo '@MARK@' >&2; exit 97 ;; esac
done < /proc/self/mountinfo
cd "$work"
exec setpriv "$@"
""".replace("@MARK@", SETUP_REFUSED_MARK)

_TOOL_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"  # unshare, setpriv, pivot_root, mount (sbin on some systems)
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
SYSTEM_DIRS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32")


# Installed before the sample in "prelude" mode. Audit events: https://docs.python.org/3/library/audit_events.html
_PRELUDE = r"""
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
_READABLE = tuple({_os.path.realpath(p) for p in (_sys.prefix, _sys.base_prefix, _sys.exec_prefix,
                                                  _sys.base_exec_prefix)}) + ("/dev",)
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.mkdir",
                "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_DENIED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.system", "os.exec",
           "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "ctypes.dlopen", "pty.spawn"}

def _inside(path):
    if isinstance(path, int):
        return True
    try:
        real = _os.path.realpath(_os.fsdecode(path))
    except Exception:
        return False
    return real == _ROOT or real.startswith(_ROOT + _os.sep)

def _readable(path):
    if _inside(path):
        return True
    try:
        real = _os.path.realpath(_os.fsdecode(path))
    except Exception:
        return False
    return any(real == r or real.startswith(r + _os.sep) for r in _READABLE)

def _hook(event, args):
    if event in _DENIED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the work dir")
        if path is not None and not _readable(path):
            raise PermissionError(f"sandbox: reading {path!r} outside the interpreter and the work dir")
    elif event in ("os.listdir", "os.scandir") and args and args[0] is not None and not _readable(args[0]):
        raise PermissionError(f"sandbox: listing {args[0]!r} outside the interpreter and the work dir")
    elif event in _PATH_EVENTS:
        for arg in args[:2]:
            if isinstance(arg, (str, bytes, _os.PathLike)) and not _inside(arg):
                raise PermissionError(f"sandbox: {event} on {arg!r} outside the work dir")

_sys.addaudithook(_hook)
del _hook
_sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
"""


def _reachable_by_others(path: str) -> bool:
    """Whether an unprivileged user can execute `path`: every parent searchable, the file readable+executable."""
    p = Path(path).resolve()
    try:
        if (p.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH)) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _interpreter() -> tuple[str, bool]:
    """(python to run, whether to drop to an unprivileged uid). Dropping only matters when we are root."""
    if os.geteuid() != 0:
        return sys.executable, False
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (
        os.path.realpath(sys.executable),
        shutil.which(minor, path="/usr/bin:/bin"),
        shutil.which("python3", path="/usr/bin:/bin"),
    ):
        if candidate and _reachable_by_others(candidate):
            return candidate, True
    return sys.executable, False  # root and no python another uid can run: keep root (weaker, see docstring)


def _unprivileged_uid() -> int:
    # A fresh unnamed uid per call: RLIMIT_NPROC counts processes per uid, so concurrent sandboxes don't share it.
    return random.SystemRandom().randrange(200_000, 1_000_000)


def _limits(memory_mb: int, cpu_s: int, max_processes: int, max_file_mb: int, max_files: int):
    def apply() -> None:
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL one second later
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        size = max_file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


@functools.lru_cache(maxsize=4)
def _prefixes(python: str) -> tuple[str, ...]:
    """The installation directories of `python` (a venv's and the one it was made from)."""
    if python == sys.executable:
        found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    else:
        code = "import sys; print(sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, sep=chr(10))"
        out = subprocess.run(
            [python, "-I", "-c", code], capture_output=True, text=True, timeout=30, env={}, stdin=subprocess.DEVNULL
        )
        found = set(out.stdout.split("\n")) - {""}
    found |= {os.path.realpath(p) for p in found}
    return tuple(sorted(found))


def visible_paths(python: str) -> list[str]:
    """What the sandboxed code sees besides its work dir (read-only): the interpreter's installation, the system
    library directories it links against, and a few devices. Paths inside another listed directory are left out."""
    wanted = [*_prefixes(python), os.path.dirname(python), *SYSTEM_DIRS]
    dirs: list[str] = []
    for path in sorted({os.path.abspath(p) for p in wanted if os.path.lexists(p)}, key=len):
        if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs if not os.path.islink(d)):
            dirs.append(path)
    return [*dirs, *(d for d in DEVICES if os.path.exists(d))]


def _namespace_command(root: str, work: str, python: str, argv: list[str], uid: int | None) -> list[str]:
    cmd = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        cmd.append("--map-root-user")  # a user namespace gives us the right to mount in it
    drop = ["--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]
    if uid is not None:
        drop = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *drop]
    return [
        *cmd,
        "--",
        "/bin/sh",
        "-c",
        _NAMESPACE_SETUP,
        "sh",
        root,
        work,
        *visible_paths(python),
        "--",
        *drop,
        "--",
        python,
        *argv,
    ]


@functools.lru_cache(maxsize=1)
def _namespace_probe() -> tuple[bool, str]:
    """(whether the namespace setup works here, why not), probed once with a trivial program."""
    missing = [tool for tool in ("unshare", "setpriv", "pivot_root") if not shutil.which(tool, path=_TOOL_PATH)]
    if missing or not os.path.exists("/bin/sh"):
        return False, f"missing {', '.join(missing) or '/bin/sh'}"
    try:
        result = _run("pass", 10.0, 256, 5, 16, 1, 64, 4096, "namespace")
    except (OSError, SandboxUnavailable) as e:
        return False, str(e)
    if result.ok:
        return True, ""
    lines = result.stderr.strip().splitlines()
    return False, lines[-1][:200] if lines else f"setup exited with {result.returncode}"


def namespaces_available() -> bool:
    """Whether the namespace setup works here (probed once with a trivial program)."""
    return _namespace_probe()[0]


def isolation_level() -> str:
    return "namespace" if namespaces_available() else "prelude"


def weak_sandbox_message() -> str:
    return (
        f"model-written code would run in the weak sandbox (a Python audit hook, not a security boundary): this "
        f"machine cannot create the namespaces of the real one ({_namespace_probe()[1]}). Either "
        f"{ENABLE_NAMESPACES}, or accept the weak sandbox with --allow-weak-sandbox (recipe: "
        "`eval.allow_weak_sandbox: true`), or do not run the tests (`task.options.run_tests=false`)"
    )


def run_python(
    code: str,
    timeout_s: float = 5,
    memory_mb: int = 512,
    cpu_s: int | None = None,
    max_processes: int = 32,
    max_file_mb: int = 16,
    max_files: int = 64,
    max_output_bytes: int = 1 << 16,
    isolation: Isolation = "auto",
) -> SandboxResult:
    """Run `code` as a script in the sandbox. `cpu_s` defaults to the wall-clock timeout rounded up, plus one.
    `isolation="auto"` uses namespaces, or the prelude inside a SandboxPolicy that allows it (else
    WeakSandboxRefused); naming a level explicitly is the caller's own choice."""
    if isolation == "auto":
        isolation = isolation_level()  # type: ignore[assignment]
        if isolation == "prelude" and not weak_allowed():
            raise WeakSandboxRefused(weak_sandbox_message())
    elif isolation == "namespace" and not namespaces_available():
        raise SandboxUnavailable(f"namespaces are not usable on this machine ({_namespace_probe()[1]})")
    if cpu_s is None:
        cpu_s = int(timeout_s) + 1
    result = _run(code, timeout_s, memory_mb, cpu_s, max_processes, max_file_mb, max_files, max_output_bytes, isolation)
    _count(isolation)
    return result


def _run(
    code: str,
    timeout_s: float,
    memory_mb: int,
    cpu_s: int,
    max_processes: int,
    max_file_mb: int,
    max_files: int,
    max_output_bytes: int,
    isolation: str,
) -> SandboxResult:
    python, drop_uid = _interpreter()
    uid = _unprivileged_uid() if drop_uid else None
    with tempfile.TemporaryDirectory(prefix="ftkit-sandbox-") as tmp:
        work, root = os.path.join(tmp, "work"), os.path.join(tmp, "root")
        os.mkdir(work, 0o700)
        os.mkdir(root, 0o700)
        Path(work, "main.py").write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chmod(tmp, 0o711)  # the sandbox uid must be able to reach its work dir
        if isolation == "namespace":
            cmd = _namespace_command(root, work, python, ["-I", "main.py"], uid)
        else:
            cmd = [python, "-I", "-c", _PRELUDE]
        env = {"PATH": _TOOL_PATH, "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        limits = _limits(memory_mb, cpu_s, max_processes, max_file_mb, max_files)

        def preexec() -> None:
            limits()
            if uid is not None and isolation != "namespace":  # namespace mode drops the uid after mounting
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=preexec,
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # stragglers too: children left running after a normal exit
                proc.wait()
        stdout, stderr = _read(out_path, max_output_bytes), _read(err_path, max_output_bytes)
        if isolation == "namespace" and proc.returncode == SETUP_REFUSED and SETUP_REFUSED_MARK in stderr:
            raise SandboxUnavailable("namespace setup could not make every mount read-only; refusing to run")
        return SandboxResult(
            ok=proc.returncode == 0 and not timed_out,
            returncode=proc.returncode,
            stdout=stdout,
            stderr=stderr,
            timed_out=timed_out,
            isolation=isolation,
        )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")
