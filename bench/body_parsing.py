"""CPU cost of parsing crafted request bodies: email.parser (before issue 13) vs now.

Not a test (numbers, no assertions); the numbers go to ``docs/performance.md``::

    python -m bench.body_parsing [--repeat 5]

Each body is parsed ``--repeat`` times by :func:`authz.core.input.parse_body` and by the
multipart parser authz used before (``email.parser`` with ``email.policy.HTTP``, kept
below verbatim as the baseline); the table gives the median CPU seconds
(``time.process_time``) of one parse and what came out (a value, "not parsed" for a
body over the size cap, or the error class).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import statistics
import time
from collections.abc import Callable
from typing import Any

from authz.core.input import MAX_BODY_BYTES, parse_body

CONTENT_TYPE = "multipart/form-data; boundary=foo"


def _before(content_type: str, payload: bytes) -> Any:
    """authz.core.input._multipart before issue 13 (without its JSON branch)."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    document = b"Content-Type: " + content_type.encode("latin-1", errors="replace") + b"\r\n\r\n"
    message = parser.parsebytes(document + payload)
    values: dict[str, list[Any]] = {}
    for part in message.iter_parts():
        if part.get_content_disposition() != "form-data":
            continue
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name:
            raw = part.get_payload(decode=True)
            data = raw if isinstance(raw, bytes) else b""
            values.setdefault(name, []).append(data.decode("utf-8", errors="replace"))
    return values


def _now(content_type: str, payload: bytes) -> Any:
    parsed, truncated = parse_body({"content-type": content_type}, "", payload)
    return "not parsed" if truncated else parsed


def _multipart(*parts: bytes) -> bytes:
    return b"".join(b"--foo\r\n" + part + b"\r\n" for part in parts) + b"--foo--\r\n"


def _field(header: bytes = b"") -> bytes:
    return b'Content-Disposition: form-data; name="a"' + header + b"\r\n\r\nx"


def _bodies() -> dict[str, bytes]:
    return {
        "normal (3 fields)": _multipart(_field(), _field(), _field()),
        "Content-Type with 8,000 params": _multipart(
            _field(b"\r\nContent-Type: text/plain" + b";a=b" * 8000)
        ),
        "Content-Type with 16,000 params": _multipart(
            _field(b"\r\nContent-Type: text/plain" + b";a=b" * 16000)
        ),
        "filename of 4,000 encoded words": _multipart(
            _field(b'; filename="' + b"=?utf-8?q?a?= " * 4000 + b'"')
        ),
        "header folded 10,000 times": _multipart(_field(b"\r\n x" * 10000)),
        "1,000 parts": _multipart(*[_field()] * 1000),
        "one 64,000-byte field": _multipart(_field() + b"x" * 64000),
        "100 parts (the cap)": _multipart(*[_field()] * 100),
        # The slowest shape within the caps: 17 Content-Dispositions of 965 bytes, most
        # of them a quoted run of ";" (python-multipart's parameter parser is linear
        # but costs about 0.4 us per such byte), up to MAX_MULTIPART_HEADER_BYTES.
        "17 parts, 965-byte quoted Content-Disposition": _multipart(
            *[_field(b'; x="' + b";" * 918 + b'"')] * 17
        ),
    }


def _cpu(parse: Callable[[str, bytes], Any], body: bytes, repeat: int) -> tuple[float, str]:
    times, outcome = [], ""
    for _ in range(repeat):
        started = time.process_time()
        try:
            result = parse(CONTENT_TYPE, body)
            outcome = result if isinstance(result, str) else "parsed"
        except Exception as exc:  # the outcome is part of the report
            outcome = type(exc).__name__
        times.append(time.process_time() - started)
    return statistics.median(times), outcome


def main() -> None:
    """Print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"MAX_BODY_BYTES = {MAX_BODY_BYTES}")
    print("| body | bytes | email.parser CPU s | outcome | now CPU s | outcome |")
    print("|---|---|---|---|---|---|")
    for name, body in _bodies().items():
        before, before_outcome = _cpu(_before, body, args.repeat)
        now, now_outcome = _cpu(_now, body, args.repeat)
        print(
            f"| {name} | {len(body)} | {before:.4f} | {before_outcome} | {now:.5f} "
            f"| {now_outcome} |"
        )


if __name__ == "__main__":
    main()
