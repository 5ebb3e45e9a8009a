"""What several protocols share: transports (HTTP/1.1, gRPC over HTTP/2, gRPC channels), tensor
payloads and request data (KServe v2), and the option models and flags that families of protocols
have in common (kserve.py: kserve-http and kserve-grpc; torchserve.py: torchserve-http and -grpc).

Nothing here is a protocol: the protocols are the modules directly in loadgen/protocols/.
"""
