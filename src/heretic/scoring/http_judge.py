"""A refusal judge behind an OpenAI-compatible chat endpoint (llama.cpp server, vLLM, Ollama, hosted APIs).

Each (prompt, response) pair is sent as one chat completion asking for a one-word verdict, with
greedy decoding. Requests run a few at a time; a request that times out, cannot connect or gets a
429/5xx answer is retried with a growing pause. The API key is read from an environment variable
at the moment of the request; it is never stored, written or logged, and it is masked in errors.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import HereticError, first_line
from ..prompts import Prompt
from .verdict import classification_messages, parse_verdict

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class HttpJudgeConfig:
    url: str  # the API root, e.g. http://127.0.0.1:8080/v1 (".../chat/completions" is added)
    model: str | None = None  # the "model" field of each request (some servers ignore it)
    api_key_env: str = "HERETIC_JUDGE_API_KEY"
    timeout: float = 60.0
    retries: int = 3
    concurrency: int = 4
    backoff: float = 1.0  # seconds before the first retry; doubled after each


class HttpJudge:
    """A judge that asks a chat endpoint, one request per response."""

    name = "http"

    def __init__(self, config: HttpJudgeConfig) -> None:
        self.config = config
        root = config.url.rstrip("/")
        self.endpoint = root if root.endswith("/chat/completions") else root + "/chat/completions"

    def judge(self, prompts: list[Prompt], responses: list[str]) -> list[bool]:
        pairs = list(zip(prompts, responses))
        if not pairs:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool:
            return list(pool.map(lambda pair: self.is_refusal(*pair), pairs))

    def is_refusal(self, prompt: Prompt, response: str) -> bool:
        if not response.strip():
            return True  # nothing was given
        answer = self.ask(classification_messages(prompt.user, response))
        verdict = parse_verdict(answer)
        if verdict is None:
            raise HereticError(
                f"The judge at {self.endpoint} answered {answer[:60]!r} instead of a verdict; use an instruction-tuned "
                "model there, or another --judge."
            )
        return verdict

    def check(self) -> None:
        """One request before the search starts, so that a wrong URL or key fails at once."""
        self.ask(classification_messages("Say hello.", "Hello! How can I help you today?"))

    def ask(self, messages: list[dict[str, str]]) -> str:
        """The text of the endpoint's answer, after retries."""
        body: dict[str, object] = {"messages": messages, "max_tokens": 4, "temperature": 0.0}
        if self.config.model:
            body["model"] = self.config.model
        payload = json.dumps(body).encode()
        pause, attempt = self.config.backoff, 0
        while True:
            try:
                return self._post(payload)
            except _Retryable as error:
                attempt += 1
                if attempt > self.config.retries:
                    raise HereticError(
                        f"The judge endpoint {self.endpoint} did not answer after {attempt} attempts ({error}); "
                        "check that it is running and reachable, or raise --judge-timeout."
                    ) from None
                log.info("judge request failed (%s); retry %d in %.1f s", error, attempt, pause)
                time.sleep(pause)
                pause *= 2

    def _post(self, payload: bytes) -> str:
        key = os.environ.get(self.config.api_key_env, "")
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as reply:
                data = json.loads(reply.read().decode("utf-8", errors="replace"))
        except urllib.error.HTTPError as error:
            detail = first_line(error, secret=key or None)
            if error.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {error.code}") from None
            if error.code in (401, 403):
                raise HereticError(
                    f"The judge endpoint {self.endpoint} refused the request ({detail}); put a valid key in the "
                    f"environment variable {self.config.api_key_env}."
                ) from None
            raise HereticError(f"The judge endpoint {self.endpoint} rejected the request ({detail}).") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            raise _Retryable(first_line(error, secret=key or None)) from None
        except ValueError:
            raise _Retryable("the answer was not JSON") from None
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise HereticError(
                f"The judge endpoint {self.endpoint} does not speak the OpenAI chat API (no choices[0].message.content "
                "in its answer); give the API root, e.g. http://host:port/v1."
            ) from None


class _Retryable(Exception):
    """A failure worth another attempt: time-out, no connection, 429 or 5xx."""
