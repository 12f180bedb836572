"""The client's and the server's dataclasses carry exactly the proto's fields.

Both sides convert protobuf to their own types by hand: a field added to the proto and forgotten
in either set of dataclasses would silently never reach the caller (or never leave the server).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import pytest
import rerank_client.types as client_types
import rerank_server.types as server_types
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from rerank.v1 import reranker_pb2 as pb

#: Each dataclass and the proto message it mirrors (a rerank call's result is a RerankResponse).
MESSAGES = {
    "RankedDocument": pb.RankedDocument.DESCRIPTOR,
    "Usage": pb.Usage.DESCRIPTOR,
    "Timings": pb.Timings.DESCRIPTOR,
    "RerankResult": pb.RerankResponse.DESCRIPTOR,
    "ModelInfo": pb.ModelInfo.DESCRIPTOR,
}
SIDES = pytest.mark.parametrize("types", [client_types, server_types], ids=["client", "server"])


def is_optional_scalar(field: FieldDescriptor) -> bool:
    """A proto3 `optional` scalar: unset is not the same as its zero value."""
    return field.has_presence and field.message_type is None


@SIDES
@pytest.mark.parametrize(("name", "message"), MESSAGES.items(), ids=MESSAGES)
def test_dataclass_has_exactly_the_message_fields(types: ModuleType, name: str, message: Descriptor) -> None:
    dataclass = getattr(types, name)
    fields = {f.name: f for f in dataclasses.fields(dataclass)}
    assert set(fields) == set(message.fields_by_name), f"{types.__name__}.{name} vs {message.full_name}"
    for field in message.fields:
        if is_optional_scalar(field):
            # An unset optional field must stay tellable from "" or 0 (RankedDocument.document).
            assert fields[field.name].default is None, f"{types.__name__}.{name}.{field.name}"


def test_the_optional_fields_are_checked() -> None:
    """Guards the check above: RankedDocument.document is the proto's optional field today."""
    document = pb.RankedDocument.DESCRIPTOR.fields_by_name["document"]
    assert is_optional_scalar(document)


@SIDES
def test_truncation_covers_the_proto_enum(types: ModuleType) -> None:
    proto = {
        value.name.removeprefix("TRUNCATION_")
        for value in pb.Truncation.DESCRIPTOR.values
        if value.number != pb.TRUNCATION_UNSPECIFIED
    }
    assert proto == {"END", "NONE", "CHUNK"}
    assert {member.name for member in types.Truncation} == proto


def test_client_and_server_spell_truncation_the_same() -> None:
    client = {member.name: member.value for member in client_types.Truncation}
    server = {member.name: member.value for member in server_types.Truncation}
    assert client == server
