"""Serving: continuous batching of any seqblocks language model (``Engine``) and an HTTP server with
an OpenAI-compatible API (``seqblocks.serving.server``, needs the ``serve`` extra)."""

from seqblocks.serving.engine import Engine, Request, SamplingParams

__all__ = ["Engine", "Request", "SamplingParams"]
