"""The OpenAI API over a vlmx engine: request and response shapes (`protocol`), their
conversion to and from engine inputs and outputs (`convert`), one engine loop for all
connections (`async_engine`), the HTTP server (`api_server`) and the batch runner (`run_batch`).
"""
