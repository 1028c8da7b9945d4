"""Sampled tokens -> text and `RequestOutput`s: one detokenizer per request, stop strings, the
children of an `n > 1` request merged into one output."""

from __future__ import annotations

from vlmx.engine.detokenizer import IncrementalDetokenizer
from vlmx.engine.request import Request, RequestStatus
from vlmx.outputs import CompletionOutput, Logprob, RequestOutput
from vlmx.sampling_params import SamplingParams


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.prompts: dict[str, str | None] = {}
        self.parents: dict[str, list[str]] = {}  # request id -> child ids (n > 1)
        self._child_parent: dict[str, str] = {}
        # (detokenizer, token id, stop_terminated) not decoded yet; see `update`
        self._deferred: list[tuple[IncrementalDetokenizer, int, bool]] = []
        self._token_texts: dict[tuple[int, bool, bool], str] = {}  # for IncrementalDetokenizer

    def add(self, request_id: str, text: str | None, prompt_ids: list[int], params: SamplingParams):
        self.prompts[request_id] = text
        self.detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer,
            params,
            prompt_ids,
            self._token_texts,
            whole_text=True,  # NOTE: the text is read when the request finishes, not streamed
        )

    def add_parent(self, request_id: str, child_ids: list[str]) -> None:
        self.parents[request_id] = child_ids
        for child in child_ids:
            self._child_parent[child] = request_id

    def has_stop_strings(self, request_id: str) -> bool:
        detokenizer = self.detokenizers.get(request_id)
        return detokenizer is not None and bool(detokenizer.stop)

    def update(self, request: Request) -> str | None:
        """Detokenize `request`'s newest token; the stop string it completes, if any.

        Without stop strings the text cannot end the request, so decoding waits (`flush`, at
        the next step's launch: it overlaps that step's device work)."""
        detokenizer = self.detokenizers[request.request_id]
        token = request.output_token_ids[-1]
        stop_terminated = request.status == RequestStatus.FINISHED_STOPPED
        if not detokenizer.stop:
            self._deferred.append((detokenizer, token, stop_terminated))
            return None
        return detokenizer.update([token], stop_terminated=stop_terminated)

    def flush(self) -> None:
        """Decode the tokens `update` deferred."""
        for detokenizer, token, stop_terminated in self._deferred:
            detokenizer.update([token], stop_terminated=stop_terminated)
        self._deferred = []

    def decode_logprobs(self, entry: dict[int, Logprob]) -> dict[int, Logprob]:
        for token_id, logprob in entry.items():
            logprob.decoded_token = self.tokenizer.decode([token_id])
        return entry

    def collect(
        self, finished: list[Request], requests: dict[str, Request]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Outputs of the finished requests (an n > 1 parent once all its children are done),
        and the ids of the requests they cover, which the engine then forgets."""
        self.flush()
        outputs, done = [], []
        done_parents = []
        for request in finished:
            parent = self._child_parent.get(request.request_id)
            if parent is None:
                outputs.append(self._request_output(request.request_id, [request]))
                done.append(request.request_id)
            elif all(requests[c].status.finished for c in self.parents[parent]):
                done_parents.append(parent)
        for parent in dict.fromkeys(done_parents):
            children = [requests[c] for c in self.parents[parent]]
            outputs.append(self._request_output(parent, children))
            done.extend(c.request_id for c in children)
            self.forget_parent(parent)
        for request_id in done:
            self.forget(request_id)
        return outputs, done

    def forget(self, request_id: str) -> None:
        self.detokenizers.pop(request_id, None)
        self.prompts.pop(request_id, None)

    def forget_parent(self, request_id: str) -> list[str]:
        """Drop an n > 1 parent; returns its children's ids ([request_id] if it is none)."""
        children = self.parents.pop(request_id, None)
        if children is None:
            return [request_id]
        for child in children:
            self._child_parent.pop(child, None)
        return children

    def _request_output(self, request_id: str, requests: list[Request]) -> RequestOutput:
        first = requests[0]
        completions = []
        for i, request in enumerate(requests):
            params = request.sampling_params
            completions.append(
                CompletionOutput(
                    index=i,
                    text=self.detokenizers[request.request_id].output_text,
                    token_ids=list(request.output_token_ids),
                    cumulative_logprob=(
                        sum(
                            lp[t].logprob
                            for lp, t in zip(request.output_logprobs, request.output_token_ids)
                        )
                        if params.logprobs is not None
                        else None
                    ),
                    logprobs=request.output_logprobs if params.logprobs is not None else None,
                    finish_reason=request.status.finish_reason,
                    stop_reason=request.stop_reason,
                )
            )
        return RequestOutput(
            request_id=request_id,
            prompt=self.prompts[first.request_id],
            prompt_token_ids=list(first.prompt_token_ids),
            prompt_logprobs=None,
            outputs=completions,
            finished=True,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            metrics=first.metrics,
        )
