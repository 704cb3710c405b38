"""``peftkit serve``: one base model, many adapters, behind an OpenAI-compatible HTTP API.

engine (the scheduler thread: iteration-level batching, one forward per decoding step, rows routed
to their adapters), batch_cache (the batched KV cache: rows joining and leaving), sampling (pure
functions: next token, stop strings), adapters (the registry: loading, LRU eviction, path checks),
protocol (OpenAI request parsing and response shapes), api (the FastAPI app), metrics (Prometheus),
server (model loading and uvicorn), vllm (would vLLM accept this adapter?). Nothing is imported here:
torch and FastAPI load when a server is built.
"""
