"""A small byte-level BPE tokenizer with a family's special tokens, for tiny test checkpoints.

Real vocabularies are not needed to check an engine against its reference: what matters is that
the family's special tokens (image placeholders, turn markers, bos/eos) are single tokens with the
ids the model config names, and that the chat template is the family's.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "What is the content of each image? Describe the picture in detail.",
    "The duck swims in the water. A lion rests in the grass of the national park.",
    "You are a helpful assistant. Answer the question about the images.",
    "Image 1 shows a red square; image 2 shows a blue circle on a gradient background.",
    "0123456789 +-*/=()[]{}<>.,;:!?'\"\n\t",
] * 4


def build_small_tokenizer(
    vocab_size: int,
    special_tokens: list[str],
    chat_template: str | None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a fixed corpus to `vocab_size - len(special_tokens)` entries;
    the special tokens come next, in order, so their ids are `base + index` (see `.vocab`).
    `add_bos` prepends the bos token when encoding with special tokens (Llama / Gemma style)."""
    num_regular = vocab_size - len(special_tokens)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_regular,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    assert tokenizer.get_vocab_size() <= num_regular, tokenizer.get_vocab_size()
    # Pad the regular vocabulary up to num_regular so special ids land where the config says.
    filler = [f"<unused{i}>" for i in range(num_regular - tokenizer.get_vocab_size())]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in filler])
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special_tokens]
    )
    if add_bos and bos_token:
        from tokenizers import processors

        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A $B",
            special_tokens=[(bos_token, bos_id)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
