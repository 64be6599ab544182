"""Read the records of an offline W&B run file (`run-*.wandb`), for tests.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks
of chunks, each `crc32 (4) | length (2) | type (1) | data`, where a record is one FULL chunk or a
FIRST, MIDDLE..., LAST sequence. Each record is a protobuf `wandb.proto.wandb_internal_pb2.Record`.

W&B's writer runs in a separate process, so the file can still be growing right after
`wandb.finish()` returns; `read_run` re-reads until the run's exit record is there and every chunk's
checksum holds, and fails with the reason when that does not happen in time.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7
_ZERO, _FULL, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3, 4


class TornFile(Exception):
    """The file ends in (or contains) a chunk that is not completely written."""


def _payloads(raw: bytes):
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(raw):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + _HEADER])
        if kind == _ZERO:  # zero padding up to the end of the block
            pos += left_in_block
            continue
        data = raw[pos + _HEADER : pos + _HEADER + length]
        if len(data) < length or zlib.crc32(bytes([kind]) + data) != crc:
            raise TornFile(f"chunk at byte {pos} of {len(raw)} is incomplete or fails its checksum")
        pos += _HEADER + length
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            pending = data
        elif kind == _MIDDLE:
            pending += data
        elif kind == _LAST:
            yield pending + data


def _parse(raw: bytes) -> tuple[dict, bool]:
    history, summary, config, meta, exited = [], {}, {}, {}, False
    axes = {}  # metric name (or glob) -> the metric it is charted against
    for payload in _payloads(raw):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
            run = record.run
            meta = {"group": run.run_group, "job_type": run.job_type, "tags": list(run.tags)}
        elif kind == "metric":
            axes[record.metric.name or record.metric.glob_name] = record.metric.step_metric
        elif kind == "exit":
            exited = True
    found = {"history": history, "summary": summary, "config": config, "run": meta, "axes": axes}
    return found, exited


def read_run(path: str | Path, timeout_s: float = 60.0) -> dict:
    """{"history": [{key: value}...], "summary": {key: value}, "config": {...}, "run": {group,
    job_type, tags}, "axes": {metric: its x-axis metric}} of one run file."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run, exited = _parse(Path(path).read_bytes())
            problem = None if exited else "the run's exit record is not written"
        except TornFile as torn:
            problem = str(torn)
        if problem is None:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} is not a complete W&B run after {timeout_s} s: {problem}")
        time.sleep(0.5)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
