"""OpenAI-compatible HTTP server with continuous batching, and a chat page (``hizli serve``)."""
