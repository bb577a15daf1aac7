"""Serving: request → engine request, engine tokens → OpenAI responses (JSON or SSE chunks)."""
