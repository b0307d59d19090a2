"""Runs the model's own code (verification, reference outputs, calibration) in a child process.

A SavedModel's signatures are programs: the allow-list of the scan keeps file, network and process
ops out, but pure ops can still loop forever (``while True``), ask for a 64 GiB tensor, or crash
TensorFlow. So graphrewrite never runs them in its own process: ``run`` hands a job (a function of
a graphrewrite module, named as ``"module:function"``) to a sandbox server, whose worker process
runs it under

* a wall-clock limit (``GRAPHREWRITE_RUN_TIMEOUT`` seconds, default 900), enforced by the server,
  which kills the worker when a job passes it;
* ``RLIMIT_CPU`` (what the worker used so far plus the same seconds times the CPUs, per job),
  ``RLIMIT_AS`` (``GRAPHREWRITE_RUN_MEMORY`` bytes of address space, default the machine's
  physical memory), ``RLIMIT_FSIZE`` 0 (a write to a regular file fails) and ``RLIMIT_CORE`` 0 (a
  crash leaves no core file);
* on Linux, a new network namespace when the process may make one (root or CAP_SYS_ADMIN): no
  interface but a loopback that is down, so nothing the model does reaches the network;
* ``PR_SET_PDEATHSIG`` on Linux, so a worker never outlives the server, nor the server the
  graphrewrite process (a SIGKILLed ``compress`` leaves no model running).

A hang, a crash or a limit becomes one ModelRunError (exit 10); an error the model's own ops raise
(an Assert, CheckNumerics, a shape mismatch) an InputModelError (exit 3).

The server is one process per graphrewrite process, started on first use: it imports TensorFlow
once, before any TensorFlow thread or runtime exists, and forks the worker from that state. The
worker is reused while its jobs succeed, so TensorFlow's runtime stays warm across jobs (the
models of one graphrewrite process share it, as they shared that process before), and replaced by
a fresh fork after any failure (a timeout, a crash, a limit, an error) or when a job asks for other
limits. The cost, measured by benchmarks/bench_sandbox.py, is in the README. On macOS the rlimits
other than ``RLIMIT_AS`` apply and there is no network namespace; where ``fork`` is missing
(Windows) the sandbox is not available and ``run`` raises ModelRunError.
"""

from __future__ import annotations

import atexit
import contextlib
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
from collections.abc import Sequence
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


@dataclasses.dataclass
class _Handle:
    """A running sandbox server: its pid (also its process group), and the pipes to and from it."""

    pid: int
    requests: Any
    replies: Any
    popen: subprocess.Popen | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pipe in (self.requests, self.replies):
            pipe.close()
        try:
            self.popen.wait() if self.popen is not None else os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _fork_server() -> _Handle:
    """The server as a fork of this process, which has imported TensorFlow but not started its
    runtime: nothing to import again (a fresh interpreter would spend 10 to 15 s of CPU on it)."""
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.close(requests_w)
            os.close(replies_r)
            os.dup2(requests_r, 0)
            os.dup2(replies_w, 1)
            serve()
        finally:
            os._exit(0)
    os.close(requests_r)
    os.close(replies_w)
    return _Handle(pid, os.fdopen(requests_w, "wb"), os.fdopen(replies_r, "rb"))


def _spawn_server() -> _Handle:
    """The server as a fresh interpreter (this process's TensorFlow runtime already runs, and a
    fork of a process with TensorFlow's threads would not be safe)."""
    code = "from graphrewrite.rewriting.sandbox import serve; serve()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return _Handle(proc.pid, proc.stdin, proc.stdout, proc)


def _runtime_started() -> bool:
    if "tensorflow" not in sys.modules:
        return True  # nothing to share: a fork would import it all the same
    from tensorflow.python.eager import context

    return context._context is not None  # noqa: SLF001 - set when TensorFlow's runtime starts


class _Server:
    """The sandbox server of this process: started on first use, restarted after it died."""

    def __init__(self) -> None:
        self._handle: _Handle | None = None
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def start(self) -> None:
        """Starts the server now (a fork, or a fresh interpreter that imports TensorFlow while
        the caller does other work)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> _Handle:
        if self._handle is None or not self._handle.alive():
            if not hasattr(os, "fork"):
                raise errors.ModelRunError("running the model: no sandbox on this system (no fork)")
            self._handle = _spawn_server() if _runtime_started() else _fork_server()
        return self._handle

    def call(self, request: tuple) -> tuple:
        with self._lock:
            handle = self._ensure()
            try:
                pickle.dump(request, handle.requests)
                handle.requests.flush()
                return pickle.load(handle.replies)
            except BaseException as exc:  # the server died, or the caller was interrupted
                self._kill()
                if isinstance(exc, (EOFError, OSError, pickle.UnpicklingError)):
                    return ("crash", "the sandbox server stopped")
                raise

    def _kill(self) -> None:
        if self._handle is not None:
            self._handle.kill()
            self._handle = None

    def stop(self) -> None:
        """Ends the server (and its worker)."""
        with self._lock:
            self._kill()


_SERVER = _Server()
start = _SERVER.start


# -- the server side -------------------------------------------------------------------------------


def serve() -> None:
    """The server loop: one request in, one reply out, until the parent closes stdin.

    TensorFlow is imported before the first fork; the protocol runs on a private copy of stdout,
    and fds 1 and 2 point at /dev/null, so nothing TensorFlow prints can break it. Jobs run in one
    worker forked from here, reused while its jobs succeed (TensorFlow stays warm in it), replaced
    after any failure or when a job asks for other limits."""
    _linux_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL)  # the server dies with graphrewrite
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow  # noqa: F401 - loaded once, shared by every forked worker

    requests = os.fdopen(0, "rb")
    worker: _Worker | None = None
    while True:
        try:
            target, args, seconds, memory, allow_io = pickle.load(requests)
        except (EOFError, OSError, pickle.UnpicklingError):
            return
        if worker is not None and worker.limits != (memory, allow_io):
            worker = worker.stop()
        if worker is None:
            # The job's module (graphrewrite's own code, no model's) is imported here once, so every
            # worker forked later has it; named by the request, so this module imports none above it.
            with contextlib.suppress(ImportError):  # else the worker reports it, as a bug
                importlib.import_module(target.partition(":")[0])
        worker = worker or _Worker.start(memory, allow_io)
        reply = worker.ask((target, args, seconds), seconds)
        if reply[0] != "ok":
            worker = worker.stop()
        pickle.dump(reply, replies)
        replies.flush()


@dataclasses.dataclass
class _Worker:
    """The server's handle on its worker: its pid, the pipes to and from it, and its limits."""

    pid: int
    jobs: int
    replies: int
    limits: tuple[int | None, bool]

    @classmethod
    def start(cls, memory: int | None, allow_io: bool) -> _Worker:
        job_r, job_w = os.pipe()
        reply_r, reply_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(job_w)
            os.close(reply_r)
            try:
                _work(job_r, reply_w, memory, allow_io)
            finally:
                os._exit(0)
        os.close(job_r)
        os.close(reply_w)
        return cls(pid, job_w, reply_r, (memory, allow_io))

    def ask(self, job: tuple, seconds: float) -> tuple:
        """The worker's reply to ``job``, or a timeout or crash reply (the worker is then gone)."""
        try:
            _write_frame(self.jobs, pickle.dumps(job))
            data, timed_out = _read_frame(self.replies, time.monotonic() + seconds)
        except OSError:
            data, timed_out = None, False
        if timed_out:
            os.kill(self.pid, signal.SIGKILL)
        if data is None or timed_out:
            _, status = os.waitpid(self.pid, 0)
            self.pid = 0
            return ("timeout", None) if timed_out else ("crash", _describe(status))
        return pickle.loads(data)

    def stop(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
        os.close(self.jobs)
        os.close(self.replies)


def _write_frame(fd: int, payload: bytes) -> None:
    """An 8-byte length, then the payload, written through views (a reply of Grams can be
    hundreds of MB: slicing bytes per pipe-sized write would copy it quadratically)."""
    for part in (len(payload).to_bytes(8, "big"), payload):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def _read_frame(fd: int, deadline: float | None = None) -> tuple[bytes | bytearray | None, bool]:
    """(one frame, False); (None, False) at end of file; (None, True) once ``deadline`` passed."""
    header, timed_out = _read_exactly(fd, 8, deadline)
    if header is None:
        return None, timed_out
    return _read_exactly(fd, int.from_bytes(header, "big"), deadline)


def _read_exactly(fd: int, size: int, deadline: float | None) -> tuple[bytearray | None, bool]:
    """``size`` bytes read into one preallocated buffer (no copy per pipe-sized chunk)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None, True
        count = os.readv(fd, [view[got:]])
        if not count:
            return None, False
        got += count
    return buffer, False


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        return f"signal {name}" + (", its CPU time limit" if number == signal.SIGXCPU else "")
    return f"exit status {os.WEXITSTATUS(status)}"


def _work(jobs: int, replies: int, memory: int | None, allow_io: bool) -> None:
    """The worker: limits first, then jobs until the server closes the pipe."""
    _confine(memory, allow_io)
    while True:
        frame, _ = _read_frame(jobs)
        if frame is None:
            return
        target, args, seconds = pickle.loads(frame)
        _cpu_budget(seconds)
        reply = _job(target, args)
        try:
            payload = pickle.dumps(reply)
        except Exception as exc:  # noqa: BLE001 - a job returned something that does not pickle
            payload = pickle.dumps(("bug", f"the job's result does not pickle ({type(exc).__name__})"))
        _write_frame(replies, payload)


def _job(target: str, args: tuple) -> tuple:
    """Runs one job in the worker; returns the reply to send."""
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


def _cpu_budget(seconds: float) -> None:
    """RLIMIT_CPU: what the worker used so far plus this job's seconds on every CPU."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds * (os.cpu_count() or 1)) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    except (ValueError, OSError):
        pass


def op_error_text(exc: BaseException) -> str:
    """One line for a TensorFlow op error: its type, what it says and the node that raised it
    (TensorFlow's own first line is only "Graph execution error:")."""
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines() if ln.strip()]
    node = next((ln.split("Detected at node", 1)[1].split()[0].strip("'") for ln in lines
                 if ln.startswith("Detected at node") and len(ln.split()) > 3), None)
    noise = ("Graph execution error", "Detected at node", "<stack trace", "File ", "[[")
    text = next((ln for ln in lines if not ln.startswith(noise)), "no message")
    return f"{type(exc).__name__}: {text[:300]}" + (f" (node {node})" if node else "")


def _confine(memory: int | None, allow_io: bool) -> None:
    """Network namespace, parent-death signal and resource limits of the worker."""
    import resource

    _linux_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL)
    limits = [(resource.RLIMIT_CORE, 0), (getattr(resource, "RLIMIT_AS", None), memory)]
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


def probe_load(path: str, tags: Sequence[str], limits: Limits | None = None) -> None:
    """Loads the SavedModel once in the sandbox (its restore and init ops run there), before the
    caller loads it in its own process: a load that hangs or crashes stops here (exit 10)."""
    run("graphrewrite.rewriting.sandbox:load_job", path, list(tags), what=f"{path}: loading the model", limits=limits)


def load_job(path: str, tags: Sequence[str]) -> None:
    """Sandbox job: loads the model, nothing more."""
    load_for_run(path, tags)


def load_for_run(path: str, tags: Sequence[str]) -> Any:
    """``tf.saved_model.load`` with its failures as one-line input errors (in the worker)."""
    import tensorflow as tf

    try:
        return tf.saved_model.load(path, tags=list(tags))
    except Exception as exc:  # noqa: BLE001 - whatever a damaged model makes TensorFlow raise
        raise errors.InputModelError(f"{path}: cannot load the SavedModel ({errors.first_line(exc)})") from None


def network_isolated() -> bool:
    """Whether a sandboxed child sees no network interface but loopback (for the tests)."""
    return run("graphrewrite.rewriting.sandbox:interfaces", what="probing the sandbox", limits=Limits(60.0, None)) == []


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace, loopback aside."""
    with open("/proc/self/net/dev", encoding="ascii") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:] if line.split(":")[0].strip() != "lo"]
