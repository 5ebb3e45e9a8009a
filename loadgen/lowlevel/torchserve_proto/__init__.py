"""TorchServe's gRPC protocol: inference.proto and management.proto (TorchServe 0.12's packages, services,
messages and field numbers) and the Python stubs generated from them, committed; regenerate them with
`python -m loadgen.lowlevel.torchserve_proto.generate` after changing a .proto."""
