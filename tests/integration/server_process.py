"""The integration tests' server harness is the benchmark's: bench/rerank_bench/harness.py."""

from rerank_bench.harness import SERVER_SCRIPT, ServerProcess, _alive, free_port, wait_until

__all__ = ["SERVER_SCRIPT", "ServerProcess", "_alive", "free_port", "wait_until"]
