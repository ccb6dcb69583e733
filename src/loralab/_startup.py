"""Ctrl-C while loralab starts up: held until the heavy imports are done, then raised where it can be handled.

torch's C++ start-up calls back into Python, and a KeyboardInterrupt raised inside such a callback can abort the
process (``terminate called after throwing an instance of 'pybind11::error_already_set'``, exit -6) or print a
traceback from deep inside an import. So while loralab's imports run, a Ctrl-C is recorded instead of raised, and
:func:`resume` raises it afterwards as an ordinary KeyboardInterrupt. ``import loralab`` resumes at its end; the
``loralab`` command (``python -m loralab`` or the installed script, which import the package first) resumes in
``cli.main`` once its own imports are done, inside the ``try`` that turns a KeyboardInterrupt into one line and exit
130. Between the two the handler raises at once, as Python's own does.

Importing this module holds Ctrl-C (the package imports it first, before torch). Only Python's default handler, in the
main thread, is replaced, and only while a start-up runs: an application's own SIGINT handler is left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

_state = {"holding": False, "pending": False}


def _handler(signum, frame) -> None:
    if not _state["holding"]:
        raise KeyboardInterrupt
    _state["pending"] = True


def hold() -> None:
    """Record Ctrl-C instead of raising it, until :func:`resume`."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _handler):
        signal.signal(signal.SIGINT, _handler)
        _state["holding"] = True


def pause() -> None:
    """Raise a new Ctrl-C at once again, but keep one that came while held for :func:`resume`."""
    _state["holding"] = False


def resume() -> None:
    """Give Ctrl-C back to Python and raise one that came while held, as KeyboardInterrupt."""
    _state["holding"] = False
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _state["pending"]:
        _state["pending"] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Ctrl-C held for the block, raised at its end (see :func:`hold`, :func:`resume`)."""
    hold()
    try:
        yield
    finally:
        resume()


def started_as_command() -> bool:
    """Whether this process is the ``loralab`` command: ``python -m loralab ...`` or the installed ``loralab``."""
    argv = list(getattr(sys, "orig_argv", ()))  # the interpreter's own arguments, e.g. [python, -m, loralab, sweep]
    as_module = any(a == "-m" and b == "loralab" for a, b in zip(argv, argv[1:])) or "-mloralab" in argv
    return as_module or os.path.basename(sys.argv[0]) == "loralab"


hold()  # on import: the package imports this module before torch, so its heavy imports are covered
