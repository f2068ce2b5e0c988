"""Chat messages rendered with the model's own chat template, as transformers' apply_chat_template
does (jinja2's ImmutableSandboxedEnvironment, `raise_exception`, bos_token, eos_token,
add_generation_prompt=True).

The template came with a tenant's model, so it is hostile until proven otherwise: the sandbox
refuses attribute access to internals, multiplications and powers that would build huge values
are refused before they run, the rendering stops once it runs past a time budget or its text
past a size budget, and every failure is a TemplateFailed the caller sees as invalid input.
Ships beside llm.py: imports nothing of the platform.
"""

from __future__ import annotations

import json
import sys
import time

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_RENDERED_CHARS = 256 * 1024
RENDER_SECONDS = 1.0
# The largest sequence a template's `*` may build, and the largest integer (in bits) of its `**`.
MAX_PRODUCT = 100_000
MAX_POWER_BITS = 4096
MAX_MESSAGES = 1024


class TemplateFailed(Exception):
    """The messages or the model's chat template are at fault."""


class _Budget(Exception):
    pass


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj, attribute):
        # The sandbox would hand back an undefined value and render on; a template that reaches
        # for internals fails instead.
        raise SecurityError(f"the chat template reached for {attribute!r} of a {type(obj).__name__}")

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and (
            right > 0 and abs(left).bit_length() * right > MAX_POWER_BITS
        ):
            raise SecurityError("the chat template raises a number to a huge power")
        if operator == "*":
            for value, times in ((left, right), (right, left)):
                if isinstance(value, str | list | tuple) and isinstance(times, int) and len(value) * times > MAX_PRODUCT:
                    raise SecurityError("the chat template builds a huge sequence")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message):
    raise TemplateFailed(f"the chat template refused the messages: {message}")


def _to_json(value, indent=None):
    return json.dumps(value, indent=indent, ensure_ascii=False)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        environment = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: time.strftime(str(fmt)[:64])
        environment.filters["tojson"] = _to_json
        try:
            self.template = environment.from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateFailed(f"the model's chat template does not compile: {exc}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict]) -> str:
        """The prompt for these messages, with the assistant's turn opened."""
        deadline = time.monotonic() + RENDER_SECONDS
        pieces, size = [], 0

        def watch(frame, event, argument):
            # Called on every line the template's compiled code runs: a loop that yields
            # nothing is stopped too.
            if time.monotonic() > deadline:
                raise _Budget(f"the chat template ran longer than {RENDER_SECONDS:g} s")
            return watch

        previous = sys.gettrace()
        sys.settrace(watch)
        try:
            for piece in self.template.generate(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
                documents=None,
            ):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise _Budget(f"the chat template rendered more than {MAX_RENDERED_CHARS} characters")
                pieces.append(piece)
        except TemplateFailed:
            raise
        except (_Budget, SecurityError) as exc:
            raise TemplateFailed(f"the model's chat template was stopped: {exc}") from None
        except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError,
                RecursionError, MemoryError) as exc:
            raise TemplateFailed(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.settrace(previous)
        return "".join(pieces)


def messages_of(text: str) -> list[dict]:
    """The prompt element of a `chat` request: a JSON list of {"role", "content"} strings."""
    try:
        messages = json.loads(text)
    except ValueError:
        raise TemplateFailed("with chat=1 the prompt must be a JSON list of {\"role\", \"content\"} messages") from None
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise TemplateFailed(f"send 1 to {MAX_MESSAGES} messages as a JSON list")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or not all(isinstance(value, str) for value in message.values())
        ):
            raise TemplateFailed(f"message {index} must be an object with exactly a string role and a string content")
    return messages
