"""Generation: sampling, prefill + decode for batches, streaming text."""

from modelcode.generation.detokenize import IncrementalDetokenizer
from modelcode.generation.generate import ContextLengthError, GenerationOutput, decode, generate, prefill
from modelcode.generation.sampling import SamplingParams, probabilities, sample, token_logprobs
from modelcode.generation.stream import TextStream

__all__ = [
    "ContextLengthError", "GenerationOutput", "IncrementalDetokenizer", "SamplingParams", "TextStream", "decode",
    "generate", "prefill", "probabilities", "sample", "token_logprobs",
]
