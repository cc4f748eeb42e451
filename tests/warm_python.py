"""A warm interpreter for the tests' single-process command-line runs.

`python -m trainer` spends about 9 of its 10 seconds on a tiny test model importing torch,
transformers, datasets and peft. This server imports them once, then forks a child for each
run: the child takes the run's working directory, environment, argv, stdout and stderr, and
executes the module as `python -m` would (runpy, as __main__), exiting with its exit code. Each
child starts from the same freshly imported state, so runs do not leak into each other.

It only serves runs whose environment is the one it was started with (variables read at import
time, e.g. OMP_NUM_THREADS or HF_HUB_OFFLINE, must agree), and only if the imports started no
thread that a fork would break; otherwise the caller starts a plain subprocess.

Protocol (JSON lines): the client sends {"module", "args", "cwd", "env", "stdout", "stderr"};
the server answers {"pid": ...} once the child runs, then {"returncode": ...}.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARM_MODULES = ("torch", "transformers", "datasets", "hydra", "peft", "trainer.run.loop", "trainer.mining.miner", "trainer.tools.evaluate")


# pyarrow's jemalloc starts a background purging thread; jemalloc registers fork handlers
# (pthread_atfork) that keep its state consistent in the child, which simply runs without it.
FORK_SAFE_THREADS = {"jemalloc_bg_thd"}


def _fork_unsafe_threads() -> list[str]:
    """Names of this process's threads other than the main one and those known to be fork-safe."""
    main = str(os.getpid())
    names = [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task") if tid != main]
    return [name for name in names if name not in FORK_SAFE_THREADS]


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _serve() -> dict | None:
    """Answer requests until stdin closes (returns None). In a forked child, returns its request."""
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("ping"):
            _reply({"unsafe_threads": _fork_unsafe_threads()})
            continue
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"returncode": os.waitstatus_to_exitcode(status)})
    return None


def _become(request: dict) -> None:
    """Turn this forked child into `cd cwd && env ... python -m module args > stdout 2> stderr`."""
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    sys.argv = [request["module"], *request["args"]]
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


class WarmPython:
    """The client: run(module, args, cwd, env, timeout) -> CompletedProcess, like subprocess.run
    with capture_output=True and text=True; a plain subprocess whenever the server cannot serve."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.outputs = Path(tempfile.mkdtemp(prefix="warm-python-"))  # the children's stdout and stderr
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.warm_python"], cwd=REPO, env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        self.pending = b""  # read from the server, not yet a whole line
        self.unsafe_threads = self._ask({"ping": True}, timeout=300)["unsafe_threads"]

    def _ask(self, message: dict, timeout: float) -> dict:
        self.server.stdin.write((json.dumps(message) + "\n").encode())
        return self._answer(timeout)

    def _answer(self, timeout: float | None) -> dict:
        """The server's next line. Read unbuffered: a buffered reader could hold the second of two
        lines that arrived together while select() waits on the pipe for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.server.stdout], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(self.server.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the warm interpreter exited ({self.server.wait()})")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def serves(self, env: dict[str, str]) -> bool:
        """Whether this server is up and was started with env (a run with another one needs another)."""
        return self.server.poll() is None and _comparable(env) == _comparable(self.env)

    def run(self, module: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float):
        cmd = [sys.executable, "-m", module, *args]
        if self.unsafe_threads or not self.serves(env):
            return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        out, err = self.outputs / "stdout", self.outputs / "stderr"
        pid = self._ask({"module": module, "args": list(args), "cwd": str(cwd), "env": env,
                         "stdout": str(out), "stderr": str(err)}, timeout=60)["pid"]
        try:
            returncode = self._answer(timeout)["returncode"]
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._answer(None)
            raise subprocess.TimeoutExpired(cmd, timeout) from None
        finally:
            stdout, stderr = _take(out), _take(err)
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.stdin.close()  # the server's loop ends
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
        shutil.rmtree(self.outputs, ignore_errors=True)


def _comparable(env: dict[str, str]) -> dict[str, str]:
    """env without pytest's PYTEST_CURRENT_TEST, which names the test and is read by nobody at import."""
    return {key: value for key, value in env.items() if key != "PYTEST_CURRENT_TEST"}


def _take(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    path.unlink(missing_ok=True)
    return text


if __name__ == "__main__":
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    child_request = _serve()
    if child_request is not None:
        _become(child_request)
