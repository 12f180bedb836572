"""rerank-server: a gRPC model server for rerankers."""
