"""Read back the records of an offline W&B run (``run-*.wandb``), for tests.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic ``0xBEE1``
little-endian, version ``0``), then 32 KiB blocks. Each block holds chunks,
each prefixed by ``crc32`` (uint32), ``length`` (uint16) and ``type`` (uint8:
1 full, 2 first, 3 middle, 4 last of a record split across blocks); a block's
tail shorter than a chunk header is zero padding. The header counts towards
the first block. Each reassembled record is a serialised
``wandb.proto.wandb_internal_pb2.Record``.

The run must be finished (``wandb.finish()``) before reading. Even then the
W&B service may still be writing the file when ``finish`` returns (observed
with wandb 0.31 offline: about every other run the file held only its header
at that moment), so :func:`read_run` waits until the run's ``exit`` record,
always the last one, has arrived.

>>> import io, struct, zlib
>>> def chunk(kind, data):
...     crc = zlib.crc32(data, zlib.crc32(bytes([kind])))
...     return struct.pack("<IHB", crc, len(data), kind) + data
>>> blob = b":W&B" + struct.pack("<HB", 0xBEE1, 0) + chunk(1, b"abc")
>>> list(iter_chunks(io.BytesIO(blob)))
[b'abc']
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["RunRecords", "find_run_file", "iter_chunks", "read_run"]

_IDENT = b":W&B"
_MAGIC = 0xBEE1
_VERSION = 0
_HEADER_LEN = 7  # file header and chunk header happen to have the same length
_BLOCK_LEN = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """Yield the payload of every record in a ``.wandb`` stream, reassembled, CRC-checked."""
    head = stream.read(_HEADER_LEN)
    ident, magic, version = head[:4], *struct.unpack("<HB", head[4:7])
    if ident != _IDENT or magic != _MAGIC or version != _VERSION:
        raise ValueError(f"not a W&B run file: header {head!r}")
    offset = _HEADER_LEN  # position in the file; blocks are counted from the file start
    pending: bytearray | None = None
    while True:
        left_in_block = _BLOCK_LEN - offset % _BLOCK_LEN
        if left_in_block < _HEADER_LEN:  # zero padding up to the next block
            stream.read(left_in_block)
            offset += left_in_block
            continue
        header = stream.read(_HEADER_LEN)
        if len(header) < _HEADER_LEN:
            return  # end of file (a partial header is an unflushed tail)
        crc, length, kind = struct.unpack("<IHB", header)
        data = stream.read(length)
        offset += _HEADER_LEN + len(data)
        if len(data) < length:
            return
        if kind == 0 and length == 0:  # trailing zeros inside a block
            continue
        if zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"CRC mismatch in chunk at offset {offset - length - _HEADER_LEN}")
        if kind == _FULL:
            yield bytes(data)
        elif kind == _FIRST:
            pending = bytearray(data)
        elif kind == _MIDDLE and pending is not None:
            pending += data
        elif kind == _LAST and pending is not None:
            pending += data
            yield bytes(pending)
            pending = None
        else:
            raise ValueError(f"unexpected chunk type {kind} at offset {offset - length - _HEADER_LEN}")


@dataclass
class RunRecords:
    """The records of one run, decoded into what tests assert on.

    Attributes:
        records: every ``Record`` in file order.
        history: one dict per history row (``{key: value}``, JSON-decoded; ``_step`` included;
            media and histograms as dicts, e.g. ``{"_type": "image-file", "path": ...}``).
        alerts: ``(title, text, level, wait_duration)`` of each alert record.
        summary: the last value of each summary key (JSON-decoded).
        files: paths of the files the run saved (media included).
    """

    records: list[Any] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        """History rows that contain ``key``."""
        return [row for row in self.history if key in row]


def _put(target: dict[str, Any], item: Any) -> None:
    """Store one history/summary item; media and histograms arrive split by ``nested_key``, rebuilt as dicts."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


def _decode(path: str) -> RunRecords:
    from wandb.proto import wandb_internal_pb2 as pb

    out = RunRecords()
    with open(path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size < _HEADER_LEN:
            return out
        for payload in iter_chunks(stream):
            record = pb.Record()
            record.ParseFromString(payload)
            out.records.append(record)
            which = record.WhichOneof("record_type")
            if which == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _put(row, item)
                out.history.append(row)
            elif which == "alert":
                a = record.alert
                out.alerts.append(dict(title=a.title, text=a.text, level=a.level, wait_duration=a.wait_duration))
            elif which == "summary":
                for item in record.summary.update:
                    _put(out.summary, item)
                for item in record.summary.remove:
                    out.summary.pop(item.key or item.nested_key[0], None)
            elif which == "files":
                out.files.extend(f.path for f in record.files.files)
    return out


def read_run(path: str, timeout_s: float = 30.0) -> RunRecords:
    """Decode a ``run-*.wandb`` file (see :func:`find_run_file`), once its ``exit`` record is written."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = _decode(path)
        if out.records and out.records[-1].WhichOneof("record_type") == "exit":
            return out
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{path} has no exit record after {timeout_s:g} s ({len(out.records)} records): "
                "was wandb.finish() called?"
            )
        time.sleep(0.05)


def find_run_file(root: str) -> str:
    """The one ``run-*.wandb`` file under ``root`` (the ``save_dir`` / ``WANDB_DIR`` of a test)."""
    found = sorted(
        p for p in glob.glob(os.path.join(root, "**", "run-*.wandb"), recursive=True) if "latest-run" not in p
    )
    if len(found) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {root}, found {found}")
    return found[0]
