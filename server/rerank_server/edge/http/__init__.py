"""The HTTP/JSON edge: Cohere- and Jina-compatible rerank routes beside gRPC, on the same event loop
and data plane (`convert` JSON <-> the server's types, `routes` the Starlette app, `server` uvicorn)."""
