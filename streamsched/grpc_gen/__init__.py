"""The gRPC interface's messages and service stubs, generated from
``proto/streamsched/v1/scheduler.proto`` by ``scripts/gen-grpc`` (every module here but this
one): do not edit them, regenerate them. They need the ``grpc`` extra (grpcio, protobuf)."""
