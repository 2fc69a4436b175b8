"""Torch-free prompt tokenizer for engines: `tokenizer.json` (the `tokenizers` library) + the manifest's
prompt template, system prompt and special ids.

Mirrors `blip3v.model.tokenizer` (encode without special tokens, no BOS, as in the release;
decode skipping special tokens, stripped). `blip3v export` checks on probe strings that this
gives the same ids and text as the checkpoint's transformers tokenizer, so the two never drift.
"""

from __future__ import annotations

from pathlib import Path

from blip3v.errors import EngineError, InputError


class PromptTokenizer:
    def __init__(self, path: str | Path, template: str, system: str, special_token_ids: dict[str, int],
                 add_special_tokens: bool = False):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception for unreadable JSON)
            raise EngineError(f"{path}: cannot load the tokenizer ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        self.template = template
        self.system = system
        self.special_token_ids = dict(special_token_ids)
        self.add_special_tokens = add_special_tokens

    @classmethod
    def from_manifest(cls, manifest) -> PromptTokenizer:
        tok = cls(manifest.path("tokenizer"), manifest["prompt"]["template"], manifest["prompt"]["system"],
                  manifest["special_token_ids"], bool(manifest["tokenizer"].get("add_special_tokens", False)))
        image_token = manifest["prompt"].get("image_token")
        if image_token is not None:
            found = tok.tokenizer.token_to_id(image_token)
            if found != tok.special_token_ids.get("image"):
                raise EngineError(f"{manifest.path('tokenizer')}: {image_token} is id {found}, "
                                  f"the manifest says {tok.special_token_ids.get('image')}")
        return tok

    def format_prompt(self, question: str) -> str:
        question = question.strip()
        if not question:
            raise InputError("the question is empty")
        return self.template.format(system=self.system, question=question)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids)

    def encode_prompt(self, question: str) -> list[int]:
        return self.encode(self.format_prompt(question))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()
