"""vlmx: fast offline inference for vision-language models with several images per prompt."""

from vlmx.engine.engine_args import EngineArgs
from vlmx.llm import LLM, InvalidPromptsError
from vlmx.lora.request import LoRARequest
from vlmx.outputs import CompletionOutput, RequestOutput
from vlmx.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "InvalidPromptsError",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
