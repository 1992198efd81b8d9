"""{{name}}: an edgefn function in Python (a WebAssembly component).

Each MQTT message on the function's triggers arrives in `handle`. What it
emits goes upstream once the invocation succeeds; raising fails the
invocation (retried, then a dead letter with the exception's text).
"""

import json
import os

import edgefn
from edgefn import WitWorld  # noqa: F401  (the component's exports)


@edgefn.handler
def handle(msg):
    reading = json.loads(msg.payload)
    reading["device"] = msg.topic.split("/")[1] if "/" in msg.topic else msg.topic
    if os.environ.get("VERBOSE") == "1":
        edgefn.info(f"{msg.topic}: {reading}")
    edgefn.emit(f"processed/{msg.topic}", reading)
