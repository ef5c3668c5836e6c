"""A fork server for tests that start many short-lived Python processes.

    python tests/forkserver.py MODULE...     # imports the modules once, then answers requests on stdin

Each process it starts is a real, separate process forked from an interpreter that only imported modules
(no torch computation, no thread): its own pid and memory, the request's argv, environment, working folder
and output files, and signals, ``kill -9`` and exit statuses as a fresh ``python -c CODE ARGV`` would have.
What it is spared is the ~2.5 s of CPU of importing torch, torch._dynamo and TensorBoard.

The environment the server starts with is the one those imports saw (``OMP_NUM_THREADS`` is read when torch
loads): :class:`ForkServer` starts one server per preload list and values of those variables. The tests of
tests/test_training_cli.py and the ranks of tests/test_training_distributed.py (and test_distributed.py's)
start their processes here.

Requests and answers, one JSON line each (answers on the server's stdout, its own output goes to stderr):
  {"op": "spawn", "code", "argv", "env", "cwd", "stdout", "stderr"}  ->  {"pid": int}
  {"op": "poll", "pid"}  ->  {"returncode": int or null}   (subprocess's convention: -N after signal N)
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

#: Variables read while the preloaded modules import: a server only forks processes that agree with it on them.
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONPATH")


def serve(modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name)
    if os.path.isdir("/proc/self/task"):  # forking is safe: no thread could hold a lock
        assert len(os.listdir("/proc/self/task")) == 1, os.listdir("/proc/self/task")
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing but the answers on the answer channel
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "poll":
            done, status = os.waitpid(request["pid"], os.WNOHANG)
            reply = {"returncode": os.waitstatus_to_exitcode(status) if done else None}
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                answer.close()
                _become(request)  # returns only in the child, to run its code
                code = compile(request["code"], "<string>", "exec")
                exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
                raise SystemExit(0)  # as the end of a script: the interpreter's own exit (threads, atexit)
            reply = {"pid": pid}
        answer.write(json.dumps(reply) + "\n")
        answer.flush()


def _become(request: Mapping) -> None:
    """The child's process state, as ``python -c`` would start it (after the imports)."""
    import ctypes

    try:  # a process left running (a failed test's) ends with the server, which ends with the test process
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out = os.open(request["stdout"], flags, 0o644)
    err = out if request["stderr"] == request["stdout"] else os.open(request["stderr"], flags, 0o644)  # 2>&1
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {out, err}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["-c", *request["argv"]]
    sys.path[0] = ""  # python -c's first entry: the working folder, not this script's
    signal.signal(signal.SIGINT, signal.default_int_handler)


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a process the server forked (its stdout and
    stderr go to files, read by :meth:`communicate` and :meth:`stderr_text`)."""

    def __init__(self, server: "ForkServer", pid: int, stdout: Path, stderr: Path) -> None:
        self._server, self.pid, self._stdout, self._stderr = server, pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def stderr_text(self) -> str:
        return self._stderr.read_text(errors="replace")

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return self._stdout.read_text(errors="replace"), self.stderr_text()


class ForkServer:
    """One server process per preload list and import-time environment, started at the first spawn and
    stopped when the test process exits."""

    _servers: dict[tuple, "ForkServer"] = {}

    def __init__(self, modules: Sequence[str], env: Mapping[str, str]) -> None:
        self._proc = subprocess.Popen([sys.executable, __file__, *modules], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=dict(env))

    @classmethod
    def spawn(cls, code: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, stdout: Path,
              stderr: Path | None = None, preload: Sequence[str]) -> ForkedProcess:
        """Start ``python -c code *argv`` (forked) with ``env`` in ``cwd``, its output in the file ``stdout``
        and its errors in ``stderr`` (``None``: in ``stdout`` too, as ``2>&1``)."""
        key = (tuple(preload), tuple((k, env.get(k)) for k in IMPORT_TIME_ENV))
        server = cls._servers.get(key)
        if server is None or server._proc.poll() is not None:
            server = cls._servers[key] = cls(preload, env)
        stderr = stdout if stderr is None else stderr
        pid = server.ask({"op": "spawn", "code": code, "argv": list(argv), "env": dict(env), "cwd": str(cwd),
                          "stdout": str(stdout), "stderr": str(stderr)})["pid"]
        return ForkedProcess(server, pid, Path(stdout), Path(stderr))

    def ask(self, request: Mapping, timeout: float = 300) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)  # the first answer waits for imports
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            self._proc.kill()
            raise AssertionError(f"the fork server did not answer {request['op']} "
                                 f"({'it exited' if ready else f'in {timeout} s'})")
        return json.loads(line)


if __name__ == "__main__":
    serve(sys.argv[1:])
