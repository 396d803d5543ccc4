"""The generated gRPC modules: importable under raylm.proto, up to date with the .proto file."""
from __future__ import annotations

import pickle

from raylm.proto import gen
from raylm.proto import generation_pb2 as pb
from raylm.proto import generation_pb2_grpc as pb_grpc


def test_generated_modules_are_up_to_date():
    stale = gen.stale_files()
    assert not stale, f"{stale} are stale: run `python -m raylm.proto.gen`"


def test_service_and_package_names():
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "raylm.v1.Generation"
    assert [m.name for m in service.methods] == ["Generate", "GenerateStream", "Tokenize", "GetModelInfo"]
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert callable(pb_grpc.add_GenerationServicer_to_server)


def test_messages_pickle_under_the_raylm_proto_module():
    # Serve ships requests between processes with pickle: the classes must import from raylm.proto
    request = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingOptions(temperature=0.0))
    assert type(request).__module__ == "raylm.proto.generation_pb2"
    assert pickle.loads(pickle.dumps(request)) == request


def test_one_input_and_optional_fields():
    request = pb.GenerateRequest(prompt="hi")
    request.token_ids.ids.extend([1, 2])
    assert request.WhichOneof("input") == "token_ids" and not request.prompt  # oneof: last one wins
    options = pb.SamplingOptions(temperature=0.0)
    assert options.HasField("temperature") and not options.HasField("top_p")  # unset != zero
