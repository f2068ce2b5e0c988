"""The gateway's HTTP port (MAAS_GATEWAY_HTTP_ADDR): an OpenAI-compatible API (/v1) and the Open
Inference Protocol's REST form (KServe v2, /v2), served by FastAPI and uvicorn in the gateway
process, on the gRPC server's event loop. Every HTTP request becomes a call of the gateway's own
gRPC methods, made in process (dispatch.py): the HTTP layer translates, nothing more."""
