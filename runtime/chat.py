"""A multi-turn chat that keeps its KV cache between turns: each turn prefills only its new tokens."""

from __future__ import annotations

from .generate import Generation
from .kv_cache import KVCache


class ChatSession:
    """Messages so far, and the cache holding them. `reply()` one turn, iterate it, then `finish()` it."""

    def __init__(self, model, system: str | None = None, max_context: int | None = None):
        self.model = model
        self.system = system
        self.max_context = max_context
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = KVCache(self.model.config)
        self.context: list[int] = []  # the token ids in the cache
        self.cached_text = ""  # the text those ids spell, as the template rendered it
        self._turn = None

    def reply(self, user_text: str, max_tokens: int = 256, stop=(), top: bool = False, draft: str | None = None,
              **sampling) -> Generation:
        """The assistant's reply to `user_text`, as a Generation to iterate; call `finish()` afterwards."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        prompt = self.model.render_chat(messages)
        if self.context and prompt.startswith(self.cached_text):
            new_ids = self.model.encode(prompt[len(self.cached_text):], add_bos=False)
        else:  # the template re-rendered history differently: start over from the whole prompt
            self.cache, self.context = KVCache(self.model.config), []
            new_ids = self.model.encode(prompt)
        generation = Generation(
            self.model, new_ids, self.model.default_sampling(**sampling), max_tokens,
            self.model.config.eos_token_ids, stop, cache=self.cache, context=self.context,
            max_context=self.max_context, top=top, draft=draft,
        )
        self._turn = (generation, messages, prompt, len(self.context) + len(new_ids))
        return generation

    def finish(self) -> None:
        """Record the reply (complete or interrupted) as the assistant's message."""
        generation, messages, prompt, prompt_length = self._turn
        self.messages = [*messages, {"role": "assistant", "content": generation.text}]
        self.context = generation.context
        if len(self.context) >= prompt_length:
            fed = self.context[prompt_length:]
            self.cached_text = prompt + self.model.decode(fed, skip_special_tokens=False)
        # else: interrupted before the prompt was in the cache, which still holds the earlier turns
        self._turn = None
