"""gRPC options shared by the local server (:mod:`serving.server`) and the client
(:mod:`serving.client`, :mod:`serving.bench`): the message-size limit, defined once.

gRPC's default receive limit is 4 MiB; a ranking request with 100 candidates and a
100,000-long int64 history per candidate is 80 MB per feature. TF Serving itself allows up to
2 GiB. gRPC keeps the limit in a signed 32-bit int, so the largest valid limit is
:data:`MAX_MESSAGE_MB_LIMIT` MiB (2 GiB would overflow it); below 1 MiB even metadata calls
fail.
"""

from __future__ import annotations

_MIB = 1024 * 1024
#: gRPC send and receive limit of the server and of client channels.
MAX_MESSAGE_BYTES = 512 * _MIB
#: The range ``--max_message_mb`` takes: 1 MiB .. 2047 MiB (gRPC's int32 limit, rounded down).
MIN_MESSAGE_MB_LIMIT = 1
MAX_MESSAGE_MB_LIMIT = (2**31 - 1) // _MIB


def check_message_bytes(max_message_bytes: int, name: str = "max_message_bytes") -> int:
    """``max_message_bytes`` when it is a valid gRPC message limit (1 MiB .. 2047 MiB), else a
    ``ValueError`` naming ``name`` and the value."""
    low, high = MIN_MESSAGE_MB_LIMIT * _MIB, MAX_MESSAGE_MB_LIMIT * _MIB
    if (isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int)
            or not low <= max_message_bytes <= high):
        raise ValueError(f"{name} must be in [{low}, {high}] bytes ({MIN_MESSAGE_MB_LIMIT} .. "
                         f"{MAX_MESSAGE_MB_LIMIT} MiB), got {max_message_bytes!r}")
    return max_message_bytes


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the send and receive limits to
    ``max_message_bytes`` (checked by :func:`check_message_bytes`)."""
    check_message_bytes(max_message_bytes)
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]
