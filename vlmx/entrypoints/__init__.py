"""Ways in to the engine other than the offline `LLM`: the OpenAI-compatible server
(`vlmx serve`) and the batch-file runner (`vlmx run-batch`)."""
