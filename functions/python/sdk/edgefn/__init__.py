"""edgefn for Python functions.

The WIT world `edgefn:function` (wit/edgefn.wit) with Python types: a
function registers its handler with `@edgefn.handler` (and, optionally, an
initialiser with `@edgefn.init`) and exposes `WitWorld`, which
componentize-py builds into the component's exports:

    import edgefn
    from edgefn import WitWorld

    @edgefn.handler
    def handle(msg):
        edgefn.emit("telemetry/" + msg.topic, msg.payload)

A handler that returns succeeds: what it emitted, published and wrote to
state is kept. One that raises fails the invocation: the gateway retries
it and then dead-letters the message with the exception's text.
"""

import json as _json
import sys as _sys
import traceback as _traceback
from typing import Callable, Optional, Union

import wit_world as _wit_world
from componentize_py_types import Err as _Err
from wit_world.imports import host as _host
from wit_world.imports import state as _state
from wit_world.imports import types as _types

Message = _types.Message
Context = _types.Context
Trigger = _types.Trigger
Error = _types.Error
Level = _types.Level

Payload = Union[bytes, bytearray, str, dict, list]


class Refused(Exception):
    """The gateway refused a call. `error` says why (an `Error`: NOT_ALLOWED,
    TOO_LARGE, STATE_LIMIT, ...); the call did nothing."""

    def __init__(self, call: str, error: Error):
        super().__init__(f"{call} refused: {error.name.lower().replace('_', '-')}")
        self.error = error


def _payload(payload: Payload) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return _json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def emit(topic: str, payload: Payload) -> None:
    """Queues a record for upstream (str is sent as UTF-8, dict and list as
    compact JSON). Raises `Refused`."""
    try:
        _host.emit(topic, _payload(payload))
    except _Err as e:
        raise Refused("emit", e.value) from None


def publish(topic: str, payload: Payload) -> None:
    """Queues a message for the local broker (topics in `publish_allow`
    only). Raises `Refused`."""
    try:
        _host.publish(topic, _payload(payload))
    except _Err as e:
        raise Refused("publish", e.value) from None


def log(level: Level, message: str) -> None:
    """Writes a line to the function's log."""
    _host.log(level, message)


def debug(message: str) -> None:
    _host.log(Level.DEBUG, message)


def info(message: str) -> None:
    _host.log(Level.INFO, message)


def warn(message: str) -> None:
    _host.log(Level.WARN, message)


def error(message: str) -> None:
    _host.log(Level.ERROR, message)


class state:
    """The function's durable state: kept only if the invocation succeeds."""

    @staticmethod
    def get(key: str) -> Optional[bytes]:
        """The value of `key`, or None. Raises `Refused` (INVALID_KEY)."""
        try:
            return _state.get(key)
        except _Err as e:
            raise Refused("state.get", e.value) from None

    @staticmethod
    def set(key: str, value: Payload) -> None:
        """Sets `key`. Raises `Refused` (STATE_LIMIT, INVALID_KEY, ...)."""
        try:
            _state.set(key, _payload(value))
        except _Err as e:
            raise Refused("state.set", e.value) from None

    @staticmethod
    def delete(key: str) -> None:
        """Removes `key`. Raises `Refused`."""
        try:
            _state.delete(key)
        except _Err as e:
            raise Refused("state.delete", e.value) from None


_handler: Optional[Callable[[Message], None]] = None
_init: Optional[Callable[[], None]] = None


def handler(fn: Callable[[Message], None]) -> Callable[[Message], None]:
    """Registers the function's handler."""
    global _handler
    _handler = fn
    return fn


def init(fn: Callable[[], None]) -> Callable[[], None]:
    """Registers an initialiser, run once per instance before its first
    message; raising fails the instance's start."""
    global _init
    _init = fn
    return fn


def _failed(e: BaseException) -> _Err:
    # The traceback goes to the function's log (stderr); the text is what
    # the dead letter keeps.
    _traceback.print_exception(e, file=_sys.stderr)
    text = str(e)
    return _Err(f"{type(e).__name__}: {text}" if text else type(e).__name__)


class WitWorld(_wit_world.WitWorld):
    """The component's exports; expose it from the app module."""

    def init(self) -> None:
        if _init is not None:
            try:
                _init()
            except Exception as e:
                raise _failed(e) from None

    def handle(self, message: Message) -> None:
        if _handler is None:
            raise _Err("no handler: decorate one with @edgefn.handler")
        try:
            _handler(message)
        except Exception as e:
            raise _failed(e) from None
