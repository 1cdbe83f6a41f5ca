"""The coordinator: OpenAI-compatible API, miner sessions, routing and the web page."""
