"""The chunk messages of the registry's upload and download streams, as the bytes on the wire,
for the SDK and the registry alike.

Each such message is a oneof of a header (or record) and `bytes chunk`. Through protobuf, a
1 MiB chunk is copied into a message and out of it again on each side; here a received chunk is
a view into the bytes gRPC delivered, and a sent one is framed in front of its bytes in one copy.
Any message that is not exactly one chunk field goes through protobuf as before.
"""

from __future__ import annotations

from google.protobuf.message import Message

LENGTH_DELIMITED = 2
MAX_VARINT_BYTES = 10


def chunk_tag(message_class: type[Message]) -> bytes:
    """The key that starts the `chunk` field of `message_class` on the wire."""
    number = message_class.DESCRIPTOR.fields_by_name["chunk"].number
    return _varint(number << 3 | LENGTH_DELIMITED)


def frame(tag: bytes, chunk: bytes | memoryview) -> bytes:
    """The serialized message that holds only `chunk` in the field `tag` starts."""
    return b"".join((tag, _varint(len(chunk)), chunk))


def unframe(tag: bytes, message: bytes) -> memoryview | None:
    """The chunk of a serialized message that holds exactly one field, the chunk `tag` starts,
    as a view into `message`; None for any other message (parse it)."""
    if not message.startswith(tag):
        return None
    length, offset, shift = 0, len(tag), 0
    while offset < len(message) and shift < 7 * MAX_VARINT_BYTES:
        byte = message[offset]
        offset += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return memoryview(message)[offset:] if offset + length == len(message) else None
    return None


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)
