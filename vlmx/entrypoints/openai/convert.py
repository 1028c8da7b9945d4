"""OpenAI request bodies -> engine inputs (a vLLM-style prompt dict and `SamplingParams`), and
engine outputs -> OpenAI response bodies. Shared by the server and `run-batch` (and any other
driver of the OpenAI shapes), so that each reads a body the same way.

```
ChatCompletionRequest --chat_prompt------> {"prompt_token_ids", "prompt", "multi_modal_data"}
                      --sampling_params--> SamplingParams
RequestOutput --chat_response-------------> ChatCompletionResponse (one choice per completion)
```
Chat prompts go through `vlmx.multimodal.chat` (parse the parts, render the model's template),
exactly as `LLM.chat` renders them; every problem is a ValueError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmx.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from vlmx.multimodal.chat import parse_chat_messages, render_chat, resolve_chat_template
from vlmx.outputs import Logprob, RequestOutput
from vlmx.sampling_params import SamplingParams

# The fields both request kinds pass to SamplingParams under the same name.
_SAME_NAME_FIELDS = (
    "n",
    "seed",
    "stop",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
)
# Sampling fields whose None means "the checkpoint's default, else SamplingParams' default".
_DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True, slots=True)
class PromptContext:
    """What turning a body into a prompt needs of the engine: its tokenizer, the chat template
    (the server's --chat-template or the model's), the checkpoint's sampling defaults."""

    tokenizer: Any
    chat_template: str | None  # None: the model has none; chat requests fail with the reason
    default_sampling: dict[str, Any]
    mm_processor_kwargs: dict[str, Any] | None = None
    no_template_reason: str = "the model has no chat template"


def prompt_context(engine: Any, chat_template: str | None = None) -> PromptContext:
    """An `LLMEngine`'s tokenizer, chat template (`chat_template`, a text or file, else the
    model's; or why it has none) and sampling defaults."""
    mc = engine.config.model_config
    try:
        template = resolve_chat_template(chat_template, mc.model_path, engine.tokenizer)
        reason = ""
    except ValueError as e:
        if chat_template is not None:
            raise  # NOTE: a bad --chat-template is the operator's mistake: fail at start
        template, reason = None, str(e)
    return PromptContext(
        engine.tokenizer,
        template,
        dict(engine.default_sampling_kwargs),
        mm_processor_kwargs=None,
        no_template_reason=reason,
    )


def _check_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.logit_bias:
        raise ValueError("logit_bias is not supported by vlmx; leave it out")
    if isinstance(body, ChatCompletionRequest):
        if body.tools or body.tool_choice not in (None, "none"):
            raise ValueError("tools / tool_choice are not supported by vlmx; leave them out")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ValueError(
                f"response_format {body.response_format.get('type')!r} is not supported by vlmx "
                "(structured output); leave it out or use {'type': 'text'}"
            )
    else:
        if body.echo:
            raise ValueError("echo=true is not supported by vlmx; leave it out")
        if body.suffix:
            raise ValueError("suffix is not supported by vlmx; leave it out")
        if body.best_of not in (None, body.n):
            raise ValueError(f"best_of must equal n ({body.n}) or be left out in vlmx")


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest, defaults: dict[str, Any]
) -> SamplingParams:
    """The body's SamplingParams; fields it leaves out take the checkpoint's defaults
    (`generation_config.json`), as vLLM's server does. Raises ValueError naming a bad value."""
    _check_unsupported(body)
    kwargs: dict[str, Any] = {name: getattr(body, name) for name in _SAME_NAME_FIELDS}
    for name in _DEFAULTED_FIELDS:
        value = getattr(body, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            kwargs[name] = value
    kwargs["presence_penalty"] = body.presence_penalty or 0.0
    kwargs["frequency_penalty"] = body.frequency_penalty or 0.0
    if isinstance(body, ChatCompletionRequest):
        max_tokens = body.max_completion_tokens or body.max_tokens
        if body.logprobs:
            kwargs["logprobs"] = body.top_logprobs or 0
        elif body.top_logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
    else:
        max_tokens = body.max_tokens
        kwargs["logprobs"] = body.logprobs
    kwargs["max_tokens"] = max_tokens if max_tokens is not None else defaults.get("max_tokens")
    return SamplingParams(**kwargs)


def chat_prompt(context: PromptContext, body: ChatCompletionRequest) -> dict[str, Any]:
    """The body's messages rendered with the chat template, as `LLM.chat` renders them, as a
    prompt dict for `LLMEngine.process_prompt` (images as their URL strings, not loaded)."""
    messages, images = parse_chat_messages(body.messages)
    template = body.chat_template or context.chat_template
    if template is None:
        raise ValueError(context.no_template_reason)
    text = render_chat(
        context.tokenizer,
        messages,
        template,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template_kwargs=body.chat_template_kwargs,
    )
    prompt: dict[str, Any] = {
        "prompt_token_ids": context.tokenizer.encode(text, add_special_tokens=False),
        "prompt": text,
    }
    if images:
        prompt["multi_modal_data"] = {"image": images}
    kwargs = {**(context.mm_processor_kwargs or {}), **(body.mm_processor_kwargs or {})}
    if kwargs:
        prompt["mm_processor_kwargs"] = kwargs
    return prompt


def completion_prompt(body: CompletionRequest) -> dict[str, Any]:
    """The body's one prompt (text or token ids) as a prompt dict."""
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if prompt and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": list(prompt)}
    raise ValueError(
        "prompt must be one string or one list of token ids; vlmx takes one prompt per "
        "completion request (send several requests; they are batched together)"
    )


# -- outputs ----------------------------------------------------------------------------------


def _top(entry: dict[int, Logprob], num_top: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank or 1 << 30, -kv[1].logprob))
    return ranked[:num_top]


def _token_text(lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else ""


def chat_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int
) -> ChatLogprobs:
    """OpenAI's chat `logprobs.content`: per token its text, logprob, bytes and top list."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        lp = entry[token_id]
        text = _token_text(lp)
        content.append(
            TokenLogprob(
                token=text,
                logprob=max(lp.logprob, -9999.0),
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(
                        token=_token_text(t),
                        logprob=max(t.logprob, -9999.0),
                        bytes=list(_token_text(t).encode()),
                    )
                    for _, t in _top(entry, num_top)
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int, offset: int = 0
) -> CompletionLogprobs:
    """The legacy completions `logprobs`: tokens, their logprobs, top dicts, text offsets."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs):
        lp = entry[token_id]
        text = _token_text(lp)
        out.tokens.append(text)
        out.token_logprobs.append(max(lp.logprob, -9999.0))
        out.top_logprobs.append(
            {_token_text(t): max(t.logprob, -9999.0) for _, t in _top(entry, num_top)}
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out


def usage(output: RequestOutput) -> UsageInfo:
    num_prompt = len(output.prompt_token_ids or [])
    num_completion = sum(len(c.token_ids) for c in output.outputs)
    return UsageInfo(
        prompt_tokens=num_prompt,
        completion_tokens=num_completion,
        total_tokens=num_prompt + num_completion,
    )


def chat_response(
    output: RequestOutput, body: ChatCompletionRequest, model: str, response_id: str
) -> ChatCompletionResponse:
    choices = []
    for c in output.outputs:
        logprobs = None
        if body.logprobs and c.logprobs is not None:
            logprobs = chat_logprobs(c.token_ids, c.logprobs, body.top_logprobs or 0)
        choices.append(
            ChatChoice(
                index=c.index,
                message=ChatMessage(content=c.text),
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    return ChatCompletionResponse(id=response_id, model=model, choices=choices, usage=usage(output))


def completion_response(
    output: RequestOutput, body: CompletionRequest, model: str, response_id: str
) -> CompletionResponse:
    choices = []
    for c in output.outputs:
        logprobs = None
        if body.logprobs is not None and c.logprobs is not None:
            logprobs = completion_logprobs(c.token_ids, c.logprobs, body.logprobs)
        choices.append(
            CompletionChoice(
                index=c.index,
                text=c.text,
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    return CompletionResponse(id=response_id, model=model, choices=choices, usage=usage(output))
