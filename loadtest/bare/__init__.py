"""The bare reference pipeline: ztbank's request path with nothing but mutual TLS.

Three processes, as in ztbank: a FastAPI gateway under uvicorn (HTTPS, client certificate
required) -> a grpc.aio "engine" -> a grpc.aio "risk" server, mutual TLS on both gRPC hops, the
same protobuf messages, and transfers posted durably in SQLite.  No SPIFFE, no authorization, no
policy, no audit, no revocation, no telemetry: ``make bench-bank`` puts ztbank next to it to show
what those cost.  ``BarePipeline`` (``loadtest.bare.pipeline``) starts and stops it.
"""
