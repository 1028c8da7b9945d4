"""Ray Data over vlmx engines: one `vlmx.LLM` per actor, across GPUs and machines.

```python
import ray
from vlmx.ray import vlmxEngineProcessorConfig, build_llm_processor

config = vlmxEngineProcessorConfig(model_source="Qwen/Qwen2.5-VL-3B-Instruct", concurrency=4)
processor = build_llm_processor(config, preprocess=lambda row: {"messages": ..., **row})
processor(ray.data.read_parquet("images.parquet")).write_parquet("results/")
```

`VlmxEngineProcessorConfig` is the same class under a CapWords name.

Ray is an optional extra (`pip install "vlmx[ray]"`); this package imports it only when a
processor is built or run.
"""

from vlmx.ray.config import VlmxEngineProcessorConfig, vlmxEngineProcessorConfig
from vlmx.ray.processor import Processor, build_llm_processor
from vlmx.ray.rows import RESULT_COLUMNS

# NOTE: ray.data.llm's newer name for the same builder.
build_processor = build_llm_processor

__all__ = [
    "RESULT_COLUMNS",
    "Processor",
    "VlmxEngineProcessorConfig",
    "build_llm_processor",
    "build_processor",
    "vlmxEngineProcessorConfig",
]
