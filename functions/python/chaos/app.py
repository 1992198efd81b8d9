"""chaos in Python: misbehaves on request, for testing how the gateway
handles a Python function. Not an example to copy.

The payload, read as text, selects what it does: the first of these words it
contains wins.

| word        | what the invocation does                                         | outcome |
|-------------|------------------------------------------------------------------|---------|
| `spin`      | loops forever                                                    | timeout |
| `sleep`     | `time.sleep(3600)` (a WASI wait)                                 | timeout |
| `oom`       | keeps 1 MiB blocks until memory runs out                         | failure |
| `fail`      | emits `attempted` to `chaos/fail`, then raises `ValueError("asked to fail")` | failure, `ValueError: asked to fail` |
| `count`     | emits `{"count":N,"init":I}` to `chaos/count`: this instance's `count` calls and `init` runs | ok |
| `env`       | emits env var `GREETING` to `chaos/env`                          | ok |
| `context`   | emits the message's context as JSON to `chaos/context`           | ok |
| `forbidden` | emits to `forbidden/x`; then emits the refusal's name (or `accepted`) to `chaos/forbidden` | ok |
| `hoard`     | sets state `hoard` to 2 MiB; then emits the refusal's name (or `accepted`) to `chaos/hoard` | ok |
| `flood`     | prints 1 MiB to stdout in 1 KiB lines                            | ok |
| `file`      | opens `/etc/hostname`; emits the error (or `opened`) to `chaos/file` | ok |
| otherwise   | emits the payload unchanged to `echo/<input topic>`              | ok |
"""

import json
import os
import time

import edgefn
from edgefn import WitWorld  # noqa: F401

COMMANDS = ["spin", "sleep", "oom", "fail", "count", "env", "context", "forbidden", "hoard", "flood", "file"]

count = 0
inits = 0


@edgefn.init
def init():
    global inits
    inits += 1


@edgefn.handler
def handle(msg):
    global count
    text = msg.payload.decode(errors="replace")
    cmd = next((c for c in COMMANDS if c in text), None)
    if cmd == "spin":
        while True:
            pass
    elif cmd == "sleep":
        time.sleep(3600)
    elif cmd == "oom":
        blocks = []
        while True:
            blocks.append(bytearray(1 << 20))
    elif cmd == "fail":
        edgefn.emit("chaos/fail", "attempted")
        raise ValueError("asked to fail")
    elif cmd == "count":
        count += 1
        edgefn.emit("chaos/count", {"count": count, "init": inits})
    elif cmd == "env":
        edgefn.emit("chaos/env", os.environ["GREETING"])
    elif cmd == "context":
        c = msg.context
        edgefn.emit("chaos/context", {"function": c.function, "attempt": c.attempt, "trigger": c.trigger.name.lower()})
    elif cmd == "forbidden":
        edgefn.emit("chaos/forbidden", _try(lambda: edgefn.emit("forbidden/x", "x")))
    elif cmd == "hoard":
        edgefn.emit("chaos/hoard", _try(lambda: edgefn.state.set("hoard", bytes(2 << 20))))
    elif cmd == "flood":
        line = "x" * 1023
        for _ in range(1024):
            print(line)
    elif cmd == "file":
        try:
            open("/etc/hostname").close()
            result = "opened"
        except OSError as e:
            result = type(e).__name__
        edgefn.emit("chaos/file", result)
    else:
        edgefn.emit("echo/" + msg.topic, msg.payload)


def _try(call):
    try:
        call()
        return "accepted"
    except edgefn.Refused as e:
        return e.error.name.lower().replace("_", "-")
