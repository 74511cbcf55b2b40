"""A worker never outlives the launcher that started it.

Under ``accelerate launch --multi_gpu`` (and ``torchrun``) the launcher process runs torch's elastic agent
in itself, and the agent starts each worker as its child in a new session, so a signal sent to the
launcher's process group (a terminal's Ctrl-C) does not reach the workers::

    accelerate launch (elastic agent, in-process) ─┬─ worker rank 0   (own session)
                                                   └─ worker rank 1   (own session)

- SIGTERM / SIGINT to the launcher: the agent sends the same signal to every worker, waits up to 30 s,
  then kills them.
- SIGKILL to the launcher: nothing runs in it any more, so nothing tells the workers: they are re-parented
  to init and keep running (a worker waiting in a collective for a peer can wait for the collective
  timeout, 30 minutes by default).

:func:`install`, called first thing in a worker, closes both gaps:

1. **Parent-death signal.** On Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (through ``ctypes``) makes the
   kernel send SIGTERM to the worker when its parent dies, however it dies. The launcher may already
   have died before that call, so the worker then compares ``os.getppid()`` with the parent recorded when
   this module was imported, and stops at once if they differ. (The kernel signals on the death of the
   parent *thread* that started the worker; torch's agent starts workers from its main thread.) Where
   ``prctl`` is unavailable (not Linux) or refused, a daemon thread polls ``os.getppid()`` every second
   and sends SIGTERM to its own process when the parent changes.
2. **Prompt, clean stop.** SIGTERM and SIGINT raise ``SystemExit(128 + signum)`` (143, 130) in the main
   thread after one line on stderr, so Python unwinds (``finally`` blocks, context managers, the progress
   bar) without a traceback per worker (a worker has no terminal: its SIGINT is the launcher's Ctrl-C,
   forwarded by the agent). A checkpoint being written is atomic, so an interrupted one is never taken
   for a complete one. The at-exit callbacks then run (trackers finish) and the process ends with
   ``os._exit(128 + signum)``, skipping the interpreter's teardown after them (module and process-group
   destructors), which took 5–7 s per worker here while a peer blocked in a collective waited for it.
3. **A deadline.** A Python signal handler runs only when the main thread returns to the interpreter,
   and the main thread may be blocked in C (a collective waiting for a peer that has gone) or may hang
   while unwinding. The C-level handler also writes the signal number to ``signal.set_wakeup_fd``, which
   a daemon thread reads whatever the main thread does; if the process still runs ``grace`` seconds after
   SIGTERM/SIGINT, that thread ends it with ``os._exit(128 + signum)``.

Only workers started by a launcher are touched (see :func:`launched_by_a_launcher`); a plain ``bilevel
run`` keeps Python's default signal handling. Limit: a launcher SIGKILLed in the first moments of a worker's
start-up, before this module is imported (interpreter start and ``import torch``), is not seen by the
``getppid`` check; the elastic agent's own handling covers SIGTERM/SIGINT there.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional

PR_SET_PDEATHSIG = 1            # <linux/prctl.h>
DEFAULT_GRACE = 5.0             # seconds from SIGTERM/SIGINT to os._exit when unwinding does not finish
POLL_SECONDS = 1.0              # the getppid watchdog's period (where prctl is unavailable)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Set by every launcher whose workers this module should tie to it: torchrun / torch elastic (accelerate's
# multi-process launcher, deepspeed) and accelerate's single-process launcher (ACCELERATE_DYNAMO_MODE).
LAUNCHER_VARIABLES = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_MODE")

PARENT_AT_IMPORT = os.getppid()  # as early as this module can record the launcher's pid
_installed: Optional["Lifetime"] = None
_stopping = False
_exiting = False
_wakeup: list[socket.socket] = []  # keeps the wakeup socket pair open for the life of the process


@dataclass(frozen=True)
class Lifetime:
    """What :func:`install` set up.

    Attributes:
        parent: the launcher's pid (the parent this worker is tied to).
        mechanism: ``"prctl"`` (the kernel's parent-death signal) or ``"watchdog"`` (a thread polling
            ``os.getppid()``).
        handlers: whether the SIGTERM/SIGINT handlers were installed (main thread only).
        deadline: whether the deadline thread was armed (it needs the signal wakeup fd, which an event loop
            may already hold).
        grace: seconds from SIGTERM/SIGINT to a forced exit.
    """

    parent: int
    mechanism: str
    handlers: bool
    deadline: bool
    grace: float


def launched_by_a_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started by ``accelerate launch`` / ``torchrun`` (their environment variables)."""
    return any(name in environ for name in LAUNCHER_VARIABLES)


def _say(text: str) -> None:
    """Write to stderr without Python's buffered streams (safe inside a signal handler)."""
    try:
        os.write(2, f"bilevel (pid {os.getpid()}): {text}\n".encode())
    except OSError:
        pass


def _set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)``; False when there is no prctl (not Linux) or it is refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Fallback for the parent-death signal: poll ``os.getppid()``; SIGTERM to ourselves when it changes."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        _say(f"the launcher (pid {parent}) has ended; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bilevel-parent-watchdog", daemon=True).start()


def _exit_after_other_exit_callbacks(code: int) -> None:
    """Registered when a stop signal arrives, so it is the first at-exit callback to run: it runs the others
    (trackers finish, logs flush), then ends the process without the interpreter's slow teardown."""
    global _exiting
    if _exiting:  # called again by the run of the other callbacks below
        return
    _exiting = True
    run_exit_callbacks = getattr(atexit, "_run_exitfuncs", None)  # CPython; elsewhere they are skipped
    if run_exit_callbacks is not None:
        try:
            run_exit_callbacks()
        except BaseException:  # noqa: BLE001 — a failing callback must not keep the process alive
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)


def _on_stop_signal(signum: int, frame) -> None:
    """SIGTERM/SIGINT → SystemExit(128 + signum), once: Python unwinds under the deadline."""
    global _stopping
    if _stopping:  # already unwinding; the deadline thread ends the process if unwinding hangs
        return
    _stopping = True
    atexit.register(_exit_after_other_exit_callbacks, 128 + signum)
    name = signal.Signals(signum).name
    parent = _installed.parent if _installed is not None else PARENT_AT_IMPORT
    why = "the launcher has ended" if os.getppid() != parent else "from the launcher, which is stopping the workers"
    _say(f"received {name} ({why}); stopping")
    raise SystemExit(128 + signum)


def _arm_deadline(grace: float) -> bool:
    """A daemon thread that learns of SIGTERM/SIGINT through the wakeup fd (even while the main thread is
    blocked in C) and calls ``os._exit`` when the process still runs ``grace`` seconds later."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    if previous != -1:  # someone else (an event loop) reads the wakeup fd: leave theirs in place
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
        return False
    _wakeup[:] = [reader, writer]

    def wait_then_exit() -> None:
        while True:
            data = reader.recv(64)
            hits = [b for b in data if b in STOP_SIGNALS]
            if hits:
                break
        time.sleep(grace)
        _say(f"still running {grace:g} s after {signal.Signals(hits[0]).name}; exiting now")
        os._exit(128 + hits[0])

    threading.Thread(target=wait_then_exit, name="bilevel-stop-deadline", daemon=True).start()
    return True


def install(*, grace: float = DEFAULT_GRACE, force: bool = False, parent: Optional[int] = None,
            mechanism: Optional[str] = None) -> Optional[Lifetime]:
    """Tie this worker's life to its launcher (see the module docstring). Call it first thing in a worker.

    Args:
        grace: seconds from SIGTERM/SIGINT to a forced ``os._exit`` when unwinding does not finish.
        force: install even when no launcher's environment variables are set.
        parent: the launcher's pid (default: the parent recorded when this module was imported).
        mechanism: ``"prctl"`` or ``"watchdog"`` (default: prctl where available, else the watchdog).

    Returns:
        What was installed, or None when this process was not started by a launcher (nothing is changed).
        A second call returns the first call's result.
    """
    global _installed
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace > 0:
        raise ValueError(f"grace must be a positive number of seconds, got {grace!r}")
    if mechanism not in (None, "prctl", "watchdog"):
        raise ValueError(f"mechanism must be 'prctl', 'watchdog' or None (the best available), got {mechanism!r}")
    if _installed is not None:
        return _installed
    if not force and not launched_by_a_launcher():
        return None
    parent = PARENT_AT_IMPORT if parent is None else parent
    # the parent-death signal first: if it fires before the handlers below exist, SIGTERM's default action
    # still ends the worker (without unwinding)
    use_prctl = mechanism != "watchdog" and _set_parent_death_signal(signal.SIGTERM)
    if mechanism == "prctl" and not use_prctl:
        raise OSError("prctl(PR_SET_PDEATHSIG) is unavailable here (it is Linux-only); use mechanism='watchdog'")
    handlers = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    deadline = False
    if handlers:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_stop_signal)
        deadline = _arm_deadline(grace)
    _installed = Lifetime(parent=parent, mechanism="prctl" if use_prctl else "watchdog", handlers=handlers,
                          deadline=deadline, grace=grace)
    if os.getppid() != parent:  # the launcher died before the parent-death signal was set: nothing will send it
        _say(f"the launcher (pid {parent}) ended before this worker started; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
    elif not use_prctl:
        _watch_parent(parent)
    return _installed
