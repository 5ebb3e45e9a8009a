"""google.rpc.Status for the TorchServe stubs, where googleapis-common-protos is not installed."""
