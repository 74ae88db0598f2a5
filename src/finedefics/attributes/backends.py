"""Model backends of attribute construction: local transformers models and OpenAI-compatible servers.

Text backends (discover, summarize) complete chat prompts; VQA backends (extract) answer
questions about an image, or without one for tag-based construction.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from finedefics.config import BackendConfig

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class BackendError(RuntimeError):
    """A request that failed for good (after retries, or not retryable)."""


class MalformedReply(ValueError):
    """A reply that holds no usable answer: not JSON, no choices, or a message without text."""


class TextBackend(Protocol):
    def complete(self, prompts: list[str], temperature: float = 0.0) -> list[str]: ...


class VQABackend(Protocol):
    def answer(self, image: Image.Image, questions: list[str]) -> list[str | BackendError]: ...

    def answer_text(self, questions: list[str]) -> list[str | BackendError]: ...


def _require_model(cfg: BackendConfig, step: str) -> str:
    if not cfg.model:
        raise ValueError(f"attributes.{step}.model must name a model for the {getattr(cfg, 'backend', '')} backend")
    return cfg.model


# --------------------------------------------------------------------------- OpenAI-compatible HTTP

_JSON_KIND = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _kind(value: object) -> str:
    return _JSON_KIND.get(type(value), type(value).__name__)


def reply_text(raw: bytes | str) -> str:
    """The answer in the body of a /chat/completions reply; `MalformedReply`, and nothing else,
    for any body that is not one (a pure function: the client retries and records that error)."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MalformedReply(f"the reply is not JSON ({type(err).__name__})") from None
    return reply_content(payload)


def reply_content(payload: object) -> str:
    """The stripped text of the first choice's message in a decoded reply, else `MalformedReply`.
    The content is a string, or a list of text parts (joined)."""
    if not isinstance(payload, dict):
        raise MalformedReply(f"the reply is {_kind(payload)}, not an object")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            raise MalformedReply(f"the reply is an error: {error['message'][:200]!r}")
        raise MalformedReply(
            "the reply has no choices" if choices in (None, []) else f"its choices are {_kind(choices)}"
        )
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise MalformedReply("the reply's first choice has no message")
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise MalformedReply(f"the reply's message content is {_kind(content)}, not text")
    return content.strip()


@dataclass
class OpenAIChat:
    """POST /chat/completions with retries and exponential back-off on network and server errors."""

    base_url: str
    model: str
    api_key: str | None
    timeout_s: float
    retries: int
    max_tokens: int
    backoff_s: float = 0.5

    @classmethod
    def from_config(cls, cfg: BackendConfig, step: str) -> OpenAIChat:
        return cls(
            cfg.base_url.rstrip("/"),
            _require_model(cfg, step),
            os.environ.get(cfg.api_key_env),
            cfg.timeout_s,
            cfg.retries,
            cfg.max_new_tokens,
        )

    def chat(self, content: str | list[dict], temperature: float = 0.0) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return reply_text(response.read())
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code} from {self.base_url}"
                if err.code not in RETRY_STATUS:
                    break
            except MalformedReply as err:  # a 200 without a usable answer: retried like a server error
                last = f"malformed reply from {self.base_url}: {err}"
            except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, cut-off bodies
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)} ({self.base_url})"
        raise BackendError(f"{last} after {attempt + 1} attempt(s)")


def image_part(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
    }


@dataclass
class OpenAIText:
    client: OpenAIChat

    def complete(self, prompts: list[str], temperature: float = 0.0) -> list[str]:
        return [self.client.chat(p, temperature) for p in prompts]


@dataclass
class OpenAIVQA:
    """The questions of one image go out concurrently (the server batches them)."""

    client: OpenAIChat
    concurrency: int

    def _ask(self, content: str | list[dict]) -> str | BackendError:
        try:
            return self.client.chat(content)
        except BackendError as err:
            return err

    def answer(self, image: Image.Image, questions: list[str]) -> list[str | BackendError]:
        picture = image_part(image)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._ask, [[picture, {"type": "text", "text": q}] for q in questions]))

    def answer_text(self, questions: list[str]) -> list[str | BackendError]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._ask, questions))


# --------------------------------------------------------------------------- local transformers models


@dataclass
class HFText:
    """A local causal LM through its chat template; greedy unless a temperature is given."""

    model: object
    tokenizer: object
    max_new_tokens: int

    @classmethod
    def from_config(cls, cfg: BackendConfig, step: str) -> HFText:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _require_model(cfg, step)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        model.eval()
        return cls(model, tokenizer, cfg.max_new_tokens)

    def complete(self, prompts: list[str], temperature: float = 0.0) -> list[str]:
        import torch

        self.tokenizer.padding_side = "left"
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        return [
            t.strip()
            for t in self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]


@dataclass
class HFVQA:
    """A local image-text-to-text model: the questions of an image in one batch, image encoded once."""

    mllm: object  # finedefics.models.mllm.MLLM
    max_new_tokens: int

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> HFVQA:
        from finedefics.models.mllm import MLLM

        return cls(MLLM.load(_require_model(cfg, "extract")), cfg.max_new_tokens)

    def answer(self, image: Image.Image, questions: list[str]) -> list[str | BackendError]:
        prompts = [self.mllm.prompt(q, image=True) for q in questions]
        return list(self.mllm.generate_shared_image(prompts, image.convert("RGB"), self.max_new_tokens))

    def answer_text(self, questions: list[str]) -> list[str | BackendError]:
        prompts = [self.mllm.prompt(q, image=False) for q in questions]
        return list(self.mllm.generate(prompts, None, self.max_new_tokens))


def text_backend(cfg: BackendConfig, step: str) -> TextBackend:
    backend = cfg.backend
    if backend == "hf":
        return HFText.from_config(cfg, step)
    if backend == "openai":
        return OpenAIText(OpenAIChat.from_config(cfg, step))
    raise ValueError(f"attributes.{step}.backend {backend!r} is not a model backend")


def vqa_backend(cfg) -> VQABackend:
    if cfg.backend == "hf":
        return HFVQA.from_config(cfg)
    if cfg.backend == "openai":
        return OpenAIVQA(OpenAIChat.from_config(cfg, "extract"), cfg.concurrency)
    raise ValueError(f"attributes.extract.backend {cfg.backend!r} is not a model backend")
