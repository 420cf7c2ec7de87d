"""A stand-in for Hugging Face's `spaces` package (ZeroGPU), for the tests only.

Importable as `spaces` only while a test puts `tests/fake_spaces` on `sys.path` (see test_zerogpu.py);
the app never finds it otherwise.

It keeps what makes ZeroGPU different from running in-process, as `spaces` 0.51 does it
(spaces/zero/wrappers.py):
- each call runs in a worker process forked from the server, so the function sees a copy of the
  module state and nothing it changes comes back;
- the arguments go there, and the results (every yielded value of a generator) come back, through
  `multiprocessing.reduction.ForkingPickler.dumps` and `pickle.loads`: a closure, a lock or an Event
  among them fails as it would there;
- a `gr.Error` raised in the worker reaches the page as it is; any other exception becomes
  "ZeroGPU worker error" with the exception's class name, as spaces reports it;
- when the caller closes a generator early, the worker closes the function's generator after its next
  yield (spaces' stop event);
- a callable `duration` is called with the call's arguments, and must give a positive number of seconds
  within `MAX_DURATION_S`.
Stricter than spaces: a `torch.nn.Module` or a diffusers pipeline among the arguments is refused. spaces
would pickle it (gigabytes, on every call); the app must reach its pipeline through module state.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import pickle
import traceback
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

MAX_DURATION_S = 300  # the longest reservation ZeroGPU grants one call (not documented; see fastcomposer/ui/gpu.py)
calls: list[dict] = []  # one record per call: the function's name and the duration it asked for

_fork = multiprocessing.get_context("fork")


class RefusedArgument(TypeError):
    """A model or pipeline was passed to a @spaces.GPU function."""


def _heavy(value, depth: int = 0) -> str | None:
    """The type name of a module or pipeline inside `value` (containers, dataclasses, plain objects), or None."""
    import torch

    if isinstance(value, torch.nn.Module) or type(value).__name__.endswith("Pipeline"):
        return type(value).__name__
    if depth > 3 or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return None
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        items = list(getattr(value, "__dict__", {}).values())
    return next((found for item in items if (found := _heavy(item, depth + 1))), None)


def _check_call(fn, duration, args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        if (found := _heavy(value)) is not None:
            raise RefusedArgument(f"{fn.__name__}() got a {found} as an argument: a @spaces.GPU function must reach "
                                  "models through module state, not its arguments (ZeroGPU pickles every argument)")
    seconds = duration(*args, **kwargs) if callable(duration) else (60 if duration is None else duration)
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_DURATION_S:
        raise ValueError(f"duration must be a number of seconds in (0, {MAX_DURATION_S}], got {seconds!r}")
    calls.append({"function": fn.__name__, "duration": seconds})


def _error(exc: BaseException):
    import gradio as gr

    if isinstance(exc, gr.Error):
        return exc
    return gr.Error(type(exc).__name__, title="ZeroGPU worker error")  # what spaces shows for any other exception


def _send(conn, message) -> None:
    try:
        conn.send_bytes(bytes(ForkingPickler.dumps(message)))
    except Exception as e:  # noqa: BLE001 - an unpicklable result is reported, as spaces does
        conn.send_bytes(bytes(ForkingPickler.dumps(("error", _error(e), traceback.format_exc()))))


def _worker(fn, conn, stop) -> None:
    """The forked process: receive the arguments, run, send back what comes out."""
    import torch

    # GNU OpenMP's thread pool does not survive a fork: the first parallel CPU op would wait forever for
    # threads that exist only in the parent. (Real ZeroGPU workers compute on the GPU.)
    torch.set_num_threads(1)
    args, kwargs = pickle.loads(conn.recv_bytes())
    try:
        if inspect.isgeneratorfunction(fn):
            generator = fn(*args, **kwargs)
            for value in generator:
                if stop.is_set():
                    generator.close()
                    break
                _send(conn, ("yield", value))
        else:
            _send(conn, ("return", fn(*args, **kwargs)))
    except Exception as e:  # noqa: BLE001 - sent to the caller, like spaces' ExceptionResult
        _send(conn, ("error", _error(e), traceback.format_exc()))
    _send(conn, ("end", None))


def _start(fn, args, kwargs):
    payload = bytes(ForkingPickler.dumps((args, kwargs)))  # fails here, in the caller, like spaces' arg_queue.put
    parent, child = _fork.Pipe()
    stop = _fork.Event()
    process = _fork.Process(target=_worker, args=(fn, child, stop), daemon=True)
    process.start()
    child.close()
    parent.send_bytes(payload)
    return process, parent, stop


def _receive(conn):
    import gradio as gr

    try:
        return pickle.loads(conn.recv_bytes())
    except EOFError:
        raise gr.Error("GPU task aborted", title="ZeroGPU worker error") from None


def GPU(fn=None, *, duration=None, size=None):  # noqa: N802 - the real package's name
    """`@spaces.GPU`, `@spaces.GPU(duration=...)`: see the module docstring."""
    if fn is None:
        return functools.partial(GPU, duration=duration, size=size)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            _check_call(fn, duration, args, kwargs)
            process, conn, stop = _start(fn, args, kwargs)
            try:
                while True:
                    kind, value, *rest = _receive(conn)
                    if kind == "end":
                        return
                    if kind == "error":
                        raise value
                    try:
                        yield value
                    except GeneratorExit:
                        stop.set()
                        while _receive(conn)[0] != "end":  # the worker closes the function, then ends
                            pass
                        raise
            finally:
                conn.close()
                process.join(timeout=60)

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _check_call(fn, duration, args, kwargs)
        process, conn, _ = _start(fn, args, kwargs)
        try:
            kind, value, *rest = _receive(conn)
            if kind == "error":
                raise value
            return value
        finally:
            conn.close()
            process.join(timeout=60)

    return wrapper
