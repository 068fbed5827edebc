"""multiprocessing's queues, pools and ProcessPoolExecutor on loopfast channels.

Two ways in, as uvloop offers for asyncio:

- ``loopfast.get_context(method)``: a multiprocessing context whose ``Pipe``, ``Queue``,
  ``SimpleQueue``, ``JoinableQueue`` and ``Pool`` run on loopfast channels, for explicit use::

      ProcessPoolExecutor(mp_context=loopfast.get_context("spawn"))
      loopfast.get_context().Pool(4)

  Everything else of the context (Process, Lock, Event, Manager, ...) is multiprocessing's own.
- ``loopfast.install()``: from then on, in this process and in the children it starts (spawn and
  forkserver included), ``multiprocessing.Pipe``, ``multiprocessing.connection.Pipe`` and the
  queues and pools of every context use loopfast. ``loopfast.uninstall()`` undoes it.

How: multiprocessing's queues create their pipes with ``multiprocessing.connection.Pipe``, and
their locks, processes and semaphores from the context they are given. This module

- gives ``Queue``/``JoinableQueue`` (through ``Queue.__init__``) and ``SimpleQueue`` an
  ``__init__`` that takes a loopfast pipe when the context is a loopfast one or install() is on
  (otherwise it does exactly what multiprocessing's does). With a loopfast pipe the write lock
  exists on every platform: multiprocessing leaves it out on Windows, where its named pipes keep
  each message whole, which a TCP stream does not;
- moves the objects of a queue on a loopfast pipe the loopfast way (``_queues.py``): pickle
  protocol 5 with large buffers out of band, a put() that writes at once when it can, a feeder
  that writes what piled up in one go, and get() through ``Channel.recv()``;
- has install() replace ``multiprocessing.connection.Pipe`` (every context's ``Pipe`` calls it)
  and pass itself on to spawned and forkserver children through their preparation data.

Queues made before install(), or with a stock context, stay multiprocessing's own; queues made
while it was on keep their loopfast pipes after uninstall().
"""

import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.queues
import multiprocessing.reduction
import multiprocessing.spawn
import os
import sys
import threading
import warnings
from typing import Any, Dict, Optional, Tuple

from . import _queues
from . import connection as _connection
from ._backend import CHANNEL_TYPES

# The parts of multiprocessing this module reads and replaces, untyped: several of the names are
# private (the same from 3.9 to 3.13), and typeshed does not declare them.
_mp_connection: Any = multiprocessing.connection
_mp_context: Any = multiprocessing.context
_mp_queues: Any = multiprocessing.queues
_mp_reduction: Any = multiprocessing.reduction
_mp_spawn: Any = multiprocessing.spawn

__all__ = ["get_context", "install", "installed", "uninstall"]

_lock = threading.Lock()
_installed = False
# multiprocessing's own, kept to restore them (uninstall) and to run them (stock contexts).
_stock_pipe = _mp_connection.Pipe
_stock_queue_init = _mp_queues.Queue.__init__
_stock_simple_queue_init = _mp_queues.SimpleQueue.__init__
_stock_preparation_data = _mp_spawn.get_preparation_data


def Pipe(duplex: bool = True) -> Tuple[Any, Any]:
    """multiprocessing.connection.Pipe's signature, on loopfast: two connected channels that,
    like multiprocessing's connections, may be left to the garbage collector without a
    ResourceWarning (multiprocessing's queues and pools leave theirs so)."""
    ends = _connection.Pipe(duplex)
    for end in ends:
        end._warn_unclosed = False
    return ends


# ---- contexts ------------------------------------------------------------------------------------

class _LoopfastContext:
    """Mixed into each of multiprocessing's concrete contexts (fork, spawn, forkserver): its
    Pipe is loopfast's, and so are the pipes of the queues and pools it makes (BaseContext's
    Queue, SimpleQueue, JoinableQueue and Pool hand them this context)."""

    _loopfast = True

    def Pipe(self, duplex: bool = True) -> Tuple[Any, Any]:
        return Pipe(duplex)

    def get_context(self, method: Optional[str] = None) -> Any:
        if method is None:
            return self
        return get_context(method)

    def __repr__(self) -> str:
        return f"<loopfast context {self._name!r}>"  # type: ignore[attr-defined]

    def __reduce__(self) -> Any:
        return get_context, (self._name,)  # type: ignore[attr-defined]


_contexts: Dict[str, Any] = {}


def _context_class(stock: Any) -> Any:
    return type(f"Loopfast{type(stock).__name__}", (_LoopfastContext, type(stock)),
                {"__module__": __name__})


def get_context(method: Optional[str] = None) -> Any:
    """A multiprocessing context for start `method` ("fork", "spawn", "forkserver"; None: the
    start method multiprocessing would use now, the platform default unless
    multiprocessing.set_start_method() chose another) whose Pipe, Queue, SimpleQueue,
    JoinableQueue and Pool run on loopfast channels. Everything else (Process, Lock, Manager,
    ...) is the stock context's. ValueError for a method this platform does not have."""
    if method is None:
        method = (multiprocessing.get_start_method(allow_none=True)
                  or _mp_context._default_context._default_context._name)
    stock = multiprocessing.get_context(method)  # ValueError for an unknown method
    with _lock:
        ctx = _contexts.get(method)
        if ctx is None:
            ctx = _contexts[method] = _context_class(stock)()
    return ctx


def _wants_loopfast(ctx: Any) -> bool:
    return _installed or getattr(ctx, "_loopfast", False)


# ---- the queues' constructors ------------------------------------------------------------------
# multiprocessing's Queue.__init__ and SimpleQueue.__init__ (the same from 3.9 to 3.13), with
# the pipe chosen by _wants_loopfast and the write lock kept on Windows for a loopfast pipe.

def _mp_synchronize() -> Any:
    import multiprocessing.synchronize  # can raise ImportError (no sem_open), as multiprocessing's
    return multiprocessing.synchronize


def _queue_init(self: Any, maxsize: int = 0, *, ctx: Any) -> None:
    if not _wants_loopfast(ctx):
        _stock_queue_init(self, maxsize, ctx=ctx)
        return
    if maxsize <= 0:
        maxsize = _mp_synchronize().SEM_VALUE_MAX
    self._maxsize = maxsize
    self._reader, self._writer = Pipe(duplex=False)
    self._rlock = ctx.Lock()
    self._opid = os.getpid()
    self._wlock = ctx.Lock()
    self._sem = ctx.BoundedSemaphore(maxsize)
    self._ignore_epipe = False
    self._reset()
    if sys.platform != "win32":
        from multiprocessing.util import register_after_fork
        register_after_fork(self, _mp_queues.Queue._after_fork)


def _simple_queue_init(self: Any, *, ctx: Any) -> None:
    if not _wants_loopfast(ctx):
        _stock_simple_queue_init(self, ctx=ctx)
        return
    self._reader, self._writer = Pipe(duplex=False)
    self._rlock = ctx.Lock()
    self._poll = self._reader.poll
    self._wlock = ctx.Lock()


# ---- install -------------------------------------------------------------------------------------

class _PreparationData(dict):  # type: ignore[type-arg]
    """The preparation data of a child that install() was on for (spawn, forkserver): its
    unpickling, in the child, runs install() there before anything else is unpickled."""

    def __reduce__(self) -> Any:
        return _install_in_child, (dict(self),)


def _install_in_child(data: Dict[str, Any]) -> Dict[str, Any]:
    install()
    return data


def _preparation_data(name: str) -> Dict[str, Any]:
    data = _stock_preparation_data(name)
    return _PreparationData(data) if _installed else data


_stock_send_handle: Any = getattr(_mp_reduction, "send_handle", None)
_stock_recv_handle: Any = getattr(_mp_reduction, "recv_handle", None)
_NO_HANDLES = ("a file descriptor cannot be passed over a loopfast channel: TCP has no "
               "SCM_RIGHTS (multiprocessing.reduction.send_handle needs a Unix socket or, on "
               "Windows, a named pipe); pass it as a Process argument, or use "
               "multiprocessing's own Pipe for this connection")


def _send_handle(conn: Any, handle: int, destination_pid: int) -> None:
    if type(conn) in CHANNEL_TYPES:
        raise OSError(_NO_HANDLES)
    _stock_send_handle(conn, handle, destination_pid)


def _recv_handle(conn: Any) -> int:
    if type(conn) in CHANNEL_TYPES:
        raise OSError(_NO_HANDLES)
    handle: int = _stock_recv_handle(conn)
    return handle


def _hook_multiprocessing() -> None:
    """Give the queues their loopfast-aware constructors and transfer (a no-op for a queue on a
    stock context while install() is off), and make handle passing refuse a loopfast channel
    clearly (it would write raw bytes into the frame stream). At import: a child that unpickles
    a loopfast queue imports loopfast, and must then move its objects the loopfast way."""
    _mp_queues.Queue.__init__ = _queue_init
    _mp_queues.SimpleQueue.__init__ = _simple_queue_init
    _queues.hook()
    if _stock_send_handle is not None:
        _mp_reduction.send_handle = _send_handle
        _mp_reduction.recv_handle = _recv_handle


def install() -> None:
    """From now on, in this process and the children it starts (fork, spawn, forkserver),
    multiprocessing.Pipe, multiprocessing.connection.Pipe and the queues and pools of every
    context (Queue, SimpleQueue, JoinableQueue, Pool, concurrent.futures.ProcessPoolExecutor)
    run on loopfast channels. Calling it again does nothing.

    What exists already is not switched: pipes, queues, pools and executors made before
    install() keep multiprocessing's pipes (and keep working). When child processes are running
    already (a pool's workers, say), install() says so with a RuntimeWarning."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        _mp_connection.Pipe = Pipe
        _mp_spawn.get_preparation_data = _preparation_data
    children = multiprocessing.active_children()
    if children:
        warnings.warn(
            f"loopfast.install() with {len(children)} child process(es) running: the pipes, "
            "queues, pools and executors made before it are not switched and keep "
            "multiprocessing's pipes; those made from now on (in this process and in the "
            "children it starts) use loopfast", RuntimeWarning, stacklevel=2)


def uninstall() -> None:
    """Undo install(): new pipes, queues and pools are multiprocessing's own again. Those made
    while it was on keep their loopfast channels (and keep working). Calling it when install()
    is off does nothing."""
    global _installed
    with _lock:
        if not _installed:
            return
        _installed = False
        _mp_connection.Pipe = _stock_pipe
        _mp_spawn.get_preparation_data = _stock_preparation_data


def installed() -> bool:
    """True while install() is on."""
    return _installed


_hook_multiprocessing()
