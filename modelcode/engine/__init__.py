"""Continuous batching in small nouns: a request with its own settings, a scheduler, a paged KV pool with a
prefix cache, a runner and the engine that steps them (after nano-vllm's engine/ and vLLM)."""

from modelcode.engine.engine import Engine, EngineStats
from modelcode.engine.request import InvalidRequest, RequestOutput, SamplingParams

__all__ = ["Engine", "EngineStats", "InvalidRequest", "RequestOutput", "SamplingParams"]
