"""`rerank`: rank the lines of a file, or of standard input, against a query from the shell.

`rerank models` lists the served models and `rerank health` prints the server's health. Only the
standard library, grpcio, protobuf and rerank_client's public API are imported, so the command starts
fast and needs no torch. Its parts: options (flags over RERANK_CLI_* variables, the connection),
documents (reading the input), output (tables, JSON, progress) and commands (the parser and the
commands).
"""

from rerank_client.cli.commands import main

__all__ = ["main"]
