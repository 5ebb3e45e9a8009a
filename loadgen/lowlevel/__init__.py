"""Low-level primitives shared by the load generator and the reference servers (servers/).

Precise wake-ups (timerfd, precise_timer), CPU keep-awake spinners (keepawake), children that end
with their parent (children), the KServe v2 datatype -> numpy dtype table (dtypes) and TorchServe's
gRPC protocol with its generated stubs (torchserve_proto). Nothing here imports the rest of loadgen or anything from servers, so a server
that imports one of these modules does not pull in the generator (pydantic, hdrhistogram, locust).
"""
