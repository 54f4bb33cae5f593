"""JSON logs: one object per line, with the FineTuneJob's namespace and name where there is one.

Our own messages are ``key=value`` lines (``event=status namespace=ns name=job
phase=Training``); the formatter lifts those pairs into JSON fields so that log
tools can filter on them.  kopf's messages carry the object they concern in
``record.k8s_ref``, which becomes the same fields.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys

_PAIR = re.compile(r"""(\w+)=('[^']*'|"(?:[^"\\]|\\.)*"|\S+)""")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            if ref.get("namespace"):
                entry["namespace"] = ref["namespace"]
            if ref.get("name"):
                entry["name"] = ref["name"]
        if message.startswith("event="):
            for key, value in _PAIR.findall(message):
                if value.startswith('"'):
                    try:
                        entry[key] = json.loads(value)
                        continue
                    except ValueError:
                        pass
                entry[key] = value.strip("'\"")
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: int = logging.INFO, *, json_output: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("kubernetes", "urllib3", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kopf logs every watch event at DEBUG and every handler at INFO: keep ours readable.
    logging.getLogger("kopf").setLevel(logging.WARNING)
