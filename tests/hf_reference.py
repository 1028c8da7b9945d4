"""Run the Hugging Face reference model on the same prompts vlmx runs."""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

# Where vlmx runs in the parity tests: float32 on the CPU unless set (e.g. cuda + bfloat16 for
# the GPU parity run, with a bf16-sized VLMX_TEST_ATOL). The reference stays float32 on the CPU.
TEST_DEVICE = os.environ.get("VLMX_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("VLMX_TEST_DTYPE", "float32")
TEST_ATOL = float(os.environ.get("VLMX_TEST_ATOL", "2e-3"))
MAX_LOGPROB_DIFFS: dict[str, float] = {}  # test id -> largest logprob difference it saw

HF_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


class HFReference:
    """The transformers model and processor of a checkpoint folder, in float32 on the CPU.

    `family` names a Qwen-VL family, or pass `model_cls` (any transformers model class)."""

    def __init__(self, path: str, family: str | None = None, model_cls: type | None = None) -> None:
        model_cls = model_cls or HF_CLASSES[family]
        self.model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(path)

    def chat_prompt(self, num_images: int, question: str) -> str:
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def inputs(self, prompt: str, images: list) -> dict:
        return self.processor(text=[prompt], images=images or None, return_tensors="pt")

    @torch.inference_mode()
    def logprobs(
        self, prompt: str, images: list, output_ids: list[int]
    ) -> tuple[list[int], torch.Tensor]:
        """Teacher-forced: log-softmax at each position that predicts output_ids[i].

        Returns the expanded prompt ids and a [len(output_ids), vocab] tensor."""
        inputs = self.inputs(prompt, images)
        prompt_ids = inputs["input_ids"][0].tolist()
        ids = torch.tensor([prompt_ids + output_ids[:-1]])
        kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in kwargs:  # extend the per-token type ids over the outputs
            types = kwargs["mm_token_type_ids"]
            kwargs["mm_token_type_ids"] = torch.cat(
                [types, types.new_zeros(1, ids.shape[1] - types.shape[1])], dim=1
            )
        if "cross_attention_mask" in kwargs:  # Mllama: outputs see what the last prompt token
            mask = kwargs["cross_attention_mask"]  # does (HF's generate repeats its row)
            extra = mask[:, -1:].expand(-1, ids.shape[1] - mask.shape[1], -1, -1)
            kwargs["cross_attention_mask"] = torch.cat([mask, extra], dim=1)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0]
        n = len(prompt_ids)
        return prompt_ids, torch.log_softmax(logits[n - 1 :].float(), dim=-1)

    @torch.inference_mode()
    def greedy(self, prompt: str, images: list, max_new_tokens: int) -> list[int]:
        inputs = self.inputs(prompt, images)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()


def compare_with_reference(
    ref: HFReference, prompt: str, images: list, output, atol: float | None = None
) -> float:
    """Check one vlmx RequestOutput (greedy; logprobs optional) against the reference.

    - prompt ids equal the reference processor's (same placeholder expansion);
    - every logprob vlmx reports equals the reference's teacher-forced log-softmax;
    - each greedy token is the reference's argmax wherever the reference's top-1/top-2 margin
      is clear (random tiny models have near-ties that float noise may flip).

    Returns the largest logprob difference seen.
    """
    atol = TEST_ATOL if atol is None else max(atol, TEST_ATOL)
    completion = output.outputs[0]
    prompt_ids, ref_lp = ref.logprobs(prompt, images, completion.token_ids)
    assert output.prompt_token_ids == prompt_ids
    max_diff = 0.0
    entries = completion.logprobs or [{}] * len(completion.token_ids)
    for step, (token, entry) in enumerate(zip(completion.token_ids, entries)):
        for token_id, lp in entry.items():
            ref_value = ref_lp[step, token_id].item()
            max_diff = max(max_diff, abs(lp.logprob - ref_value))
            assert abs(lp.logprob - ref_value) < atol, (step, token_id, lp.logprob, ref_value)
        top2 = torch.topk(ref_lp[step], 2)
        margin = (top2.values[0] - top2.values[1]).item()
        if margin > 10 * atol:
            assert token == top2.indices[0].item(), (step, token, top2)
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    MAX_LOGPROB_DIFFS[test_id] = max(MAX_LOGPROB_DIFFS.get(test_id, 0.0), max_diff)
    return max_diff
