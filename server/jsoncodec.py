"""JSON for the wire and the bus: orjson where it gives the stdlib's answer, the stdlib where it would not.

orjson encodes and decodes several times faster than the json module (docs/perf/), but differs at
the edges, and an edge reached by a client must not change what it gets back:
- it reads an integer too large for 64 bits as a float (the contract keeps `attributes` exactly),
  so text holding a run of 20 or more digits goes to the stdlib, with python-engineio's bound on
  integer length (a 100-digit limit against quadratic int parsing);
- it refuses NaN, Infinity and lone surrogates, which the stdlib reads: those go to the stdlib too,
  and the parsers of domain/protocol.py refuse them as before;
- it cannot write integers past 64 bits or non-string keys: those are written by the stdlib.
It writes non-ASCII characters as UTF-8 where the stdlib writes \\u escapes: the same JSON value.
Validated payloads hold no NaN, so the one output that would differ (orjson writes NaN as null)
cannot occur; `loads` and `dumps` take and ignore the stdlib's keyword arguments, which is what
python-socketio's and python-engineio's `json=` hook passes (compact separators, orjson's own).
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_INTEGER = re.compile(r"\d{20}")
_LONG_INTEGER_BYTES = re.compile(rb"\d{20}")
INTEGER_DIGITS_MAX = 100  # python-engineio's own bound (engineio/json.py)


def _bounded_int(text: str) -> int:
    if len(text) > INTEGER_DIGITS_MAX:
        raise ValueError("Integer is too large")
    return int(text)


def _stdlib_loads(text: str | bytes) -> Any:
    return json.loads(text, parse_int=_bounded_int)


def loads(text: str | bytes, **_stdlib_options: Any) -> Any:
    """The JSON value of `text`, exactly as json.loads (with python-engineio's integer bound) reads it."""
    long_integer = _LONG_INTEGER_BYTES if isinstance(text, bytes) else _LONG_INTEGER
    if long_integer.search(text):  # type: ignore[arg-type]
        return _stdlib_loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _stdlib_loads(text)


def dumps_bytes(value: Any) -> bytes:
    """`value` as compact JSON, UTF-8."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an integer past 64 bits, a non-string key, a lone surrogate
        # ensure_ascii, as stdlib json's default: a lone surrogate has no UTF-8 form, only an escape.
        return json.dumps(value, separators=(",", ":")).encode()


def dumps(value: Any, **_stdlib_options: Any) -> str:
    """`value` as compact JSON text (python-socketio's and python-engineio's `json.dumps`)."""
    return dumps_bytes(value).decode()
