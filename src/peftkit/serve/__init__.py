"""``peftkit serve``: one base model, many adapters, behind an OpenAI-compatible HTTP API.

host (the model, its tokenizer and the one lock held while it runs) │ bank (the adapters: registry,
CPU tier, slots; loading off the engine's thread) > slots (the device tier: stacked adapters per layer,
the layers' route) > resident (an adapter checked and in memory) > adapter_files (reading a directory
once, inside the root) │ engine (the scheduler thread: iteration-level batching, failure isolation,
draining) > rows (a request's life: its lease, sampling, text, events) > text (incremental decoding,
stop strings) │ sampling │ batch_cache (the batched KV cache) │ api (the FastAPI app) > generation
(the completions endpoints) > guard (key, size and time limits, the h11 protocol with a header
timeout) > protocol (OpenAI request checks and response shapes) > limits │ metrics (Prometheus) │
server (building and running it). Nothing is imported here: torch and FastAPI load when a server is
built.
"""
