"""Tokenizers in the released special-token scheme, and the chat prompt.

The released tokenizer is Phi-3's SentencePiece Llama tokenizer: 32000 pieces, then the Phi-3
specials (32000..32011) and xGen-MM's `<image>`, `<image placeholder>`, `<|endofchunk|>`
(32012..32014). Small task models get a word-level tokenizer laid out the same way: base words,
then the same 15 special tokens in the same order. Token ids are read from the tokenizer and
checked against the config, never hard-coded.
"""

from __future__ import annotations

from collections.abc import Iterable

from blip3v.errors import CheckpointError, InputError
from blip3v.model.config import PHI3_SPECIAL_TOKENS, XGENMM_EXTRA_TOKENS, XGenMMConfig

BASE_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama's SentencePiece model
SPECIAL_NAMES = {
    "eos": "<|endoftext|>", "assistant": "<|assistant|>", "system": "<|system|>", "end": "<|end|>",
    "user": "<|user|>", "pad": "<pad>", "image": "<image>", "image_placeholder": "<image placeholder>",
    "endofchunk": "<|endofchunk|>", "bos": "<s>",
}


def build_word_tokenizer(words: Iterable[str]):
    """A word-level fast tokenizer: `<unk> <s> </s>`, the words, then the 15 released specials.

    Lower-cases, splits on whitespace and punctuation; decoding joins words with spaces.
    Returns a transformers `PreTrainedTokenizerFast` (saved as tokenizer.json, loadable by
    `AutoTokenizer` and by the `tokenizers` library alone in the torch-free runtime).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(BASE_SPECIALS)}
    for w in sorted({w.lower() for w in words}):
        if w and w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in PHI3_SPECIAL_TOKENS + XGENMM_EXTRA_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", padding_side="left", add_bos_token=False,
        extra_special_tokens={"image_token": "<image>"},
    )
    return fast


def base_vocab_size(tokenizer) -> int:
    """Number of ordinary tokens before the first special of the released scheme."""
    return tokenizer.convert_tokens_to_ids(PHI3_SPECIAL_TOKENS[0])


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for name, token in SPECIAL_NAMES.items():
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id:
            raise CheckpointError(f"tokenizer lacks the special token {token}")
        ids[name] = int(i)
    return ids


def check_tokenizer(cfg: XGenMMConfig, tokenizer) -> None:
    """The tokenizer and the config must agree on every special id the model relies on."""
    found = special_token_ids(tokenizer)
    differ = [f"{k}: config {v} vs tokenizer {found[k]}" for k, v in cfg.special_token_ids.items()
              if k in found and found[k] != v]
    if differ:
        raise CheckpointError("tokenizer and config disagree on special tokens: " + "; ".join(differ))
    if found["image"] != cfg.additional_vocab_start:
        raise CheckpointError(
            f"<image> is id {found['image']} but the extra embeddings start at {cfg.additional_vocab_start}"
        )


def format_prompt(cfg: XGenMMConfig, question: str) -> str:
    question = question.strip()
    if not question:
        raise InputError("the question is empty")
    return cfg.prompt_template.format(system=cfg.system_prompt, question=question)


def encode_prompt(cfg: XGenMMConfig, tokenizer, question: str) -> list[int]:
    """Prompt ids without BOS (`add_bos_token` false in the release)."""
    return list(tokenizer(format_prompt(cfg, question), add_special_tokens=False)["input_ids"])


def stop_token_ids(cfg: XGenMMConfig) -> tuple[int, ...]:
    """Generation stops at `<|end|>` and at eos (docs/MODEL.md, 'Prompt and generation')."""
    ids = cfg.special_token_ids
    return tuple(dict.fromkeys(i for i in (ids.get("end"), ids.get("eos")) if i is not None))
