"""The options of the clients' channels: balancing across replicas, health checking, message limits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rerank.v1 import reranker_pb2 as pb

# What the server may send and take by default (its --max-message-mb): gRPC's own 4 MiB receive
# limit would fail a large reply (return_documents) only after the server did all the work.
MESSAGE_LIMIT = 64 * 1024 * 1024

#: The health service the server sets SERVING only while it has a ready replica of every model.
HEALTH_SERVICE = pb.DESCRIPTOR.services_by_name["Reranker"].full_name

SERVICE_CONFIG = "grpc.service_config"

#: Each call goes to the next of the target's addresses whose HEALTH_SERVICE is SERVING (gRPC
#: core watches it over Health/Watch): a replica loading or draining gets no new calls.
BALANCED = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": HEALTH_SERVICE}}
)

#: One server, whatever it reports: health() must reach a NOT_SERVING server too.
UNBALANCED = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel options over the client's defaults: balanced, message limits as the server's."""
    merged: dict[str, Any] = {
        "grpc.max_receive_message_length": MESSAGE_LIMIT,
        "grpc.max_send_message_length": MESSAGE_LIMIT,
        SERVICE_CONFIG: BALANCED,
    }
    merged.update(dict(options))
    return list(merged.items())


def health_channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The options of the channel health() asks on: the caller's, but never balanced or health checked."""
    return list({**dict(options), SERVICE_CONFIG: UNBALANCED}.items())
