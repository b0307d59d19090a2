"""Runs the model's own code (verification, reference outputs, calibration) in a child process.

A SavedModel's signatures are programs: the allow-list of the scan keeps file, network and process
ops out, but pure ops can still loop forever (``while True``), ask for a 64 GiB tensor, or crash
TensorFlow. So graphrewrite never runs them in its own process: ``run`` hands a job (a function of
a graphrewrite module, named as ``"module:function"``) to a sandbox server, which forks one fresh
child per job with

* a wall-clock limit (``GRAPHREWRITE_RUN_TIMEOUT`` seconds, default 900), enforced by the server,
  which kills the child when it passes;
* ``RLIMIT_CPU`` (the same seconds times the CPUs), ``RLIMIT_AS`` (``GRAPHREWRITE_RUN_MEMORY``
  bytes of address space, default the machine's physical memory), ``RLIMIT_FSIZE`` 0 (a write to a
  regular file fails) and ``RLIMIT_CORE`` 0 (a crash leaves no core file);
* on Linux, a new network namespace when the process may make one (root or CAP_SYS_ADMIN): no
  interface but a loopback that is down, so nothing the model does reaches the network;
* ``PR_SET_PDEATHSIG`` on Linux, so a child never outlives the server.

A hang, a crash or a limit becomes one ModelRunError (exit 10); an error the model's own ops raise
(an Assert, CheckNumerics, a shape mismatch) an InputModelError (exit 3).

The server is one process per graphrewrite process, started on first use: it imports TensorFlow
once, before any TensorFlow thread or runtime exists, and forks each child from that state, so a
job costs a fork and the model's load (about 0.3 s for the digits MLP) instead of a fresh
interpreter importing TensorFlow (10 to 15 s). On macOS the rlimits other than ``RLIMIT_AS`` apply
and there is no network namespace; where ``fork`` is missing (Windows) the sandbox is not available
and ``run`` raises ModelRunError.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from graphrewrite import errors

TIMEOUT_ENV = "GRAPHREWRITE_RUN_TIMEOUT"
MEMORY_ENV = "GRAPHREWRITE_RUN_MEMORY"
DEFAULT_TIMEOUT = 900.0
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a child may use: wall-clock seconds, bytes of address space (None: no limit), and
    whether it may write files and reach the network (``--allow-unsafe-ops`` only)."""

    seconds: float
    memory: int | None
    allow_io: bool = False

    @classmethod
    def from_env(cls, allow_io: bool = False) -> Limits:
        """The limits from ``GRAPHREWRITE_RUN_TIMEOUT`` and ``GRAPHREWRITE_RUN_MEMORY``."""
        try:
            seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
            memory = int(os.environ[MEMORY_ENV]) if MEMORY_ENV in os.environ else _physical_memory()
        except ValueError:
            raise errors.UsageError(f"{TIMEOUT_ENV} and {MEMORY_ENV} must be numbers") from None
        if seconds <= 0 or (memory is not None and memory <= 0):
            raise errors.UsageError(f"{TIMEOUT_ENV} and {MEMORY_ENV} must be positive")
        return cls(seconds, memory, allow_io)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def run(target: str, *args: Any, what: str = "running the model", limits: Limits | None = None) -> Any:
    """Runs ``target`` (``"graphrewrite.module:function"``) on ``args`` in a sandboxed child and
    returns its result (which must pickle).

    Raises:
      ModelRunError: the child hung past its time, crashed, or ran out of memory; the message
        starts with ``what``.
      InputModelError: the model's own ops raised an error.
      GraphrewriteError: whatever graphrewrite error the job raised, as raised.
    """
    if not target.startswith("graphrewrite."):
        raise ValueError(f"sandbox jobs are graphrewrite functions, not {target!r}")
    limits = limits or Limits.from_env()
    reply = _SERVER.call((target, args, limits.seconds, limits.memory, limits.allow_io))
    return _unpack(reply, what, limits)


def _unpack(reply: tuple, what: str, limits: Limits) -> Any:
    kind, detail = reply
    if kind == "ok":
        return detail
    if kind == "error":
        name, message = detail
        raise getattr(errors, name, errors.GraphrewriteError)(message)
    if kind == "timeout":
        raise errors.ModelRunError(f"{what}: did not finish within {limits.seconds:g} s ({TIMEOUT_ENV})")
    if kind == "memory":
        limit = "" if limits.memory is None else f" of {limits.memory / 2**30:.1f} GiB ({MEMORY_ENV})"
        raise errors.ModelRunError(f"{what}: ran out of memory{limit}")
    if kind == "crash":
        raise errors.ModelRunError(f"{what}: the process running it crashed ({detail})")
    raise RuntimeError(f"{what}: {detail}")  # a bug in graphrewrite, reported as one (exit 70)


class _Server:
    """The sandbox server of this process: started on first use, restarted after it died."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def start(self) -> None:
        """Starts the server now (it imports TensorFlow while the caller does other work)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            if not hasattr(os, "fork"):
                raise errors.ModelRunError("running the model: no sandbox on this system (no fork)")
            code = "from graphrewrite.sandbox import serve; serve()"
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
        return self._proc

    def call(self, request: tuple) -> tuple:
        with self._lock:
            proc = self._ensure()
            try:
                pickle.dump(request, proc.stdin)
                proc.stdin.flush()
                return pickle.load(proc.stdout)
            except BaseException as exc:  # the server died, or the caller was interrupted
                self._kill()
                if isinstance(exc, (EOFError, OSError, pickle.UnpicklingError)):
                    return ("crash", "the sandbox server stopped")
                raise

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """Ends the server (and any child it runs)."""
        with self._lock:
            self._kill()


_SERVER = _Server()
start = _SERVER.start


# -- the server side -------------------------------------------------------------------------------


def serve() -> None:
    """The server loop: one request in, one fork, one reply out, until the parent closes stdin.

    TensorFlow is imported before the first fork; the protocol runs on a private copy of stdout,
    and fds 1 and 2 point at /dev/null, so nothing TensorFlow prints can break it."""
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow  # noqa: F401 - loaded once, shared by every forked child

    requests = os.fdopen(0, "rb")
    while True:
        try:
            request = pickle.load(requests)
        except (EOFError, OSError, pickle.UnpicklingError):
            return
        pickle.dump(_run_child(*request), replies)
        replies.flush()


def _run_child(target: str, args: tuple, seconds: float, memory: int | None, allow_io: bool) -> tuple:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            reply = _child(target, args, seconds, memory, allow_io)
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(reply, out)
        finally:
            os._exit(0)
    os.close(write_end)
    data, timed_out = _read_until(read_end, time.monotonic() + seconds)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return ("timeout", None)
    try:
        return pickle.loads(data)
    except (EOFError, pickle.UnpicklingError, ValueError):
        return ("crash", _describe(status))


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything the child writes, or (what came, True) once the deadline passed."""
    chunks = []
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                return b"".join(chunks), True
            chunk = pipe.read(1 << 20)
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        return f"signal {name}" + (", its CPU time limit" if number == signal.SIGXCPU else "")
    return f"exit status {os.WEXITSTATUS(status)}"


def _child(target: str, args: tuple, seconds: float, memory: int | None, allow_io: bool) -> tuple:
    """In the forked child: limits first, then the job; returns the reply to send."""
    _confine(seconds, memory, allow_io)
    import tensorflow as tf

    module, _, name = target.partition(":")
    try:
        return ("ok", getattr(importlib.import_module(module), name)(*args))
    except errors.GraphrewriteError as exc:
        return ("error", (type(exc).__name__, str(exc)))
    except (MemoryError, tf.errors.ResourceExhaustedError):
        return ("memory", None)
    except tf.errors.OpError as exc:
        return ("error", ("InputModelError", f"the model's own ops failed: {op_error_text(exc)}"))
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which reports it as a bug
        return ("bug", f"{type(exc).__name__}: {errors.first_line(exc)}")


def op_error_text(exc: BaseException) -> str:
    """One line for a TensorFlow op error: its type, what it says and the node that raised it
    (TensorFlow's own first line is only "Graph execution error:")."""
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines() if ln.strip()]
    node = next((ln.split("Detected at node", 1)[1].split()[0].strip("'") for ln in lines
                 if ln.startswith("Detected at node") and len(ln.split()) > 3), None)
    noise = ("Graph execution error", "Detected at node", "<stack trace", "File ", "[[")
    text = next((ln for ln in lines if not ln.startswith(noise)), "no message")
    return f"{type(exc).__name__}: {text[:300]}" + (f" (node {node})" if node else "")


def _confine(seconds: float, memory: int | None, allow_io: bool) -> None:
    """Network namespace, parent-death signal and resource limits of the child."""
    import resource

    _linux_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL)
    limits = [(resource.RLIMIT_CPU, math.ceil(seconds * (os.cpu_count() or 1)) + 1), (resource.RLIMIT_CORE, 0),
              (getattr(resource, "RLIMIT_AS", None), memory)]
    if not allow_io:
        _linux_call("unshare", _CLONE_NEWNET)  # refused without CAP_SYS_ADMIN: the network stays
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file write then fails with EFBIG
        limits.append((resource.RLIMIT_FSIZE, 0))
    for limit, value in limits:
        if limit is not None and value is not None:
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass  # a hard limit already lower than ours stays


def _linux_call(name: str, *args: int) -> bool:
    """Calls a libc function by name (Linux only); False where it is missing or refused."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return False
    return function(*args) == 0


def network_isolated() -> bool:
    """Whether a sandboxed child sees no network interface but loopback (for the tests)."""
    return run("graphrewrite.sandbox:interfaces", what="probing the sandbox", limits=Limits(60.0, None)) == []


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace, loopback aside."""
    with open("/proc/self/net/dev", encoding="ascii") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:] if line.split(":")[0].strip() != "lo"]
