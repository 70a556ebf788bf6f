"""gRPC options shared by the local server (:mod:`serving.server`) and the client
(:mod:`serving.client`, :mod:`serving.bench`): the message-size limit, defined once.

gRPC's default receive limit is 4 MiB; a ranking request with 100 candidates and a
100,000-long int64 history per candidate is 80 MB per feature. TF Serving itself allows up to
2 GiB.
"""

from __future__ import annotations

#: gRPC send and receive limit of the server and of client channels.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the send and receive limits to
    ``max_message_bytes``."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]
