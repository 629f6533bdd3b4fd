"""MPI helpers: collective error checks, reductions, and an abort-on-error hook.

Every check that may fail on some ranks only goes through :func:`raise_on_any`, so
that all ranks raise the same error together instead of deadlocking in the next
collective call.

**No hangs on uncaught exceptions or Ctrl-C.** Under ``mpiexec -n N`` an exception that
escapes on one rank only (in a user ``build(comm)`` module, a callback, code after
``run()``) would print its traceback and leave the other ranks waiting forever in their
next collective call; mpi4py's ``python -m mpi4py`` does not help once petsc4py is
loaded. ``import nngf_fem`` therefore installs :func:`install_excepthook` on
``MPI.COMM_WORLD`` whenever ``MPI.COMM_WORLD.size > 1``: an uncaught exception prints its
traceback to stderr, every line prefixed with ``[rank r/N]``, and then calls
``MPI_Abort`` (exit code 1; 130 for ``KeyboardInterrupt``), which ends all ranks --
also those blocked inside an MPI call, which never run Python code again. An
exception raised by :func:`raise_on_any` is raised on every rank at once; then rank 0
alone prints it and aborts, the other ranks stay quiet (they print and abort
themselves only if rank 0 has not ended the job within a few seconds).

Ctrl-C on ``mpiexec -n N`` (mpich's hydra forwards SIGINT to every rank, each of them
in its own session): a rank running Python code gets ``KeyboardInterrupt`` and the hook
aborts the job with exit code 130. A rank blocked in C code (an MPI collective waiting
for a rank that was interrupted) cannot run Python signal handlers; the interrupted
rank's abort takes it down. As a last resort, a watchdog thread woken by the signal
(``signal.set_wakeup_fd``) aborts the job if the process is still alive
``NNGF_FEM_SIGINT_GRACE`` seconds (default 10) after a SIGINT, e.g. when every rank is
stuck in C code or a program swallowed the ``KeyboardInterrupt``.

User scripts get all this by importing ``nngf_fem``. Set the environment variable
``NNGF_FEM_NO_ABORT_HOOK=1`` to keep Python's default behaviour (then an error on one
rank may hang the job). Serial runs (``COMM_WORLD.size == 1``) are unchanged: the
hook only chains to the previous one.
"""

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType

import numpy as np
from mpi4py import MPI

__all__ = ["raise_on_any", "allreduce_sum", "is_root", "install_excepthook", "run_on_root"]

#: attribute set on exceptions raised by :func:`raise_on_any` (raised on all ranks at once)
COLLECTIVE_ATTR = "nngf_fem_collective"

_HOOK_MARK = "_nngf_fem_abort_hook"
_installed_comm: MPI.Comm | None = None


def raise_on_any(
    comm: MPI.Comm, failed: bool, message: str = "", exc: Callable[[str], Exception] = ValueError
) -> None:
    """Raise ``exc`` on every rank if ``failed`` is true on at least one rank.

    The raised exception carries the attribute ``nngf_fem_collective = True`` so that
    the abort hook (see the module docstring) lets rank 0 report it alone.

    Args:
        comm: communicator shared by all ranks that must agree.
        failed: whether this rank found a problem.
        message: this rank's description of the problem (used if it failed).
        exc: exception type to raise on all ranks.
    """
    msgs = comm.allgather(message if failed else None)
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        first = bad[0][1]
        if comm.size > 1:
            first = f"{first} (on rank(s) {', '.join(str(r) for r, _ in bad)})"
        err = exc(first)
        try:
            setattr(err, COLLECTIVE_ATTR, True)
        except AttributeError:  # exception types with __slots__
            pass
        raise err


def run_on_root(comm: MPI.Comm, fn: Callable[[], object], describe: str,
                exc: Callable[[str], Exception] = OSError) -> None:
    """Run ``fn()`` on rank 0; if it raises, raise ``exc`` on every rank (collective).

    Every ``Exception`` is caught (``torch.save`` reports a full disk as ``RuntimeError``,
    matplotlib raises its own types), so that the other ranks never wait for a rank that
    failed.

    Args:
        comm: communicator of the ranks that wait for the result.
        fn: the work of rank 0 (e.g. writing a file).
        describe: what failed, e.g. ``"cannot write checkpoint out/c.pt"``; the
            original error is appended (unless its message already starts with
            ``describe``). Empty: the error's own message.
        exc: exception type raised on all ranks.
    """
    err = ""
    if comm.rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure must reach every rank
            detail = str(e)
            if describe and not detail.startswith(describe):
                err = f"{describe}: {type(e).__name__}: {detail}"
            elif describe or (isinstance(e, OSError) and detail):
                err = detail
            else:
                err = f"{type(e).__name__}: {detail}"
    raise_on_any(comm, bool(err), err, exc)


def allreduce_sum(comm: MPI.Comm, a: np.ndarray) -> np.ndarray:
    """Sum a numpy array over all ranks (returns a new array on every rank)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty_like(a)
    comm.Allreduce(a, out, op=MPI.SUM)
    return out


def is_root(comm: MPI.Comm = MPI.COMM_WORLD) -> bool:
    """True on rank 0 of ``comm``."""
    return comm.rank == 0


# ----------------------------------------------------------------- abort hook
def _write_stderr(text: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001, S110 - a closed stdout must not stop the abort
        pass
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - fall back to the raw file descriptor
        try:
            os.write(2, text.encode(errors="replace"))
        except OSError:
            pass


def _wait_output_read(timeout: float = 5.0) -> None:
    """Wait until the reader of stdout/stderr pipes (mpiexec's proxy) took our output.

    ``MPI_Abort`` makes hydra kill every rank at once; output still sitting in the pipe to
    the proxy is then lost (the traceback would vanish). Pipes only; ``FIONREAD`` tells
    how many bytes are still unread.
    """
    import fcntl
    import stat
    import struct
    import termios

    deadline = time.monotonic() + timeout
    for fd in (1, 2):
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            while time.monotonic() < deadline:
                left = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
                if left <= 0:
                    break
                time.sleep(0.01)
        except (OSError, ValueError):
            continue


def _abort(comm: MPI.Comm, code: int) -> None:
    try:
        _wait_output_read()
        comm.Abort(code)
    finally:  # Abort does not return; if it ever does, end this process at least
        os._exit(code)


def _report(comm: MPI.Comm, exc_type: type[BaseException], exc: BaseException | None,
            tb: TracebackType | None, code: int) -> str:
    prefix = f"[rank {comm.rank}/{comm.size}] "
    lines = traceback.format_exception(exc_type, exc, tb)
    text = "".join(prefix + line for chunk in lines for line in chunk.splitlines(True))
    return (f"{text}{prefix}nngf_fem: uncaught {exc_type.__name__} on rank {comm.rank}; "
            f"aborting all {comm.size} MPI ranks (MPI_Abort, exit code {code})\n")


def install_excepthook(comm: MPI.Comm = MPI.COMM_WORLD) -> bool:
    """Abort the whole MPI job on an uncaught exception instead of hanging (idempotent).

    Replaces ``sys.excepthook``: when ``comm.size > 1`` the traceback is printed to
    stderr with every line prefixed by ``[rank r/N]``, streams are flushed and
    ``comm.Abort`` ends all ranks (exit code 130 for ``KeyboardInterrupt``, 1 otherwise).
    A collective error (raised by :func:`raise_on_any` on every rank) is printed by rank
    0 only. When ``comm.size == 1`` (or MPI is already finalized) the previous hook is
    called. With more than one rank a SIGINT watchdog is started as well (see the module
    docstring). Called automatically by ``import nngf_fem`` when
    ``MPI.COMM_WORLD.size > 1`` unless ``NNGF_FEM_NO_ABORT_HOOK=1``.

    Args:
        comm: the communicator to abort (normally ``MPI.COMM_WORLD``).

    Returns:
        True if the hook was installed now, False if it was installed before (then the
        first call's communicator stays in effect).
    """
    global _installed_comm
    if _installed_comm is not None or getattr(sys.excepthook, _HOOK_MARK, False):
        return False
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException | None,
             tb: TracebackType | None) -> None:
        if comm.size == 1 or MPI.Is_finalized() or not MPI.Is_initialized():
            previous(exc_type, exc, tb)
            return
        code = 130 if issubclass(exc_type, KeyboardInterrupt) else 1
        try:
            if getattr(exc, COLLECTIVE_ATTR, False) and comm.rank != 0:
                time.sleep(_float_env("NNGF_FEM_COLLECTIVE_ERROR_GRACE", 5.0))  # rank 0 reports
            _write_stderr(_report(comm, exc_type, exc, tb, code))
        finally:
            _abort(comm, code)

    setattr(hook, _HOOK_MARK, True)
    sys.excepthook = hook
    _installed_comm = comm
    if comm.size > 1:
        _start_sigint_watchdog(comm)
    return True


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _start_sigint_watchdog(comm: MPI.Comm) -> bool:
    """Abort the job if the process survives a SIGINT by the grace period (see docstring).

    Uses ``signal.set_wakeup_fd`` (written by the C-level signal handler even while the
    main thread is blocked in C code). Skipped when not on the main thread or when a
    wakeup fd is already in use (e.g. by an asyncio loop).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(r)
        os.close(w)
        return False
    if old != -1:  # somebody else listens: leave theirs in place
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
        return False
    grace = _float_env("NNGF_FEM_SIGINT_GRACE", 10.0)

    def watch() -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT in data:
                time.sleep(grace)
                _write_stderr(f"[rank {comm.rank}/{comm.size}] nngf_fem: still running "
                              f"{grace:g} s after SIGINT (blocked in C/MPI code?); aborting "
                              f"all {comm.size} MPI ranks (exit code 130)\n")
                _abort(comm, 130)

    threading.Thread(target=watch, name="nngf_fem-sigint-watchdog", daemon=True).start()
    return True


def _auto_install() -> None:
    """Install the hook on ``import nngf_fem`` for MPI runs (opt-out by environment)."""
    if os.environ.get("NNGF_FEM_NO_ABORT_HOOK", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if MPI.COMM_WORLD.size > 1:
        install_excepthook(MPI.COMM_WORLD)
