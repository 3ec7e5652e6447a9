"""Chat templates rendered as transformers renders them (``transformers.utils.chat_template_utils``), for
every format: the runtimes render prompts with it and the MLC converter derives its conversation template
with it, so one template gives one prompt text everywhere.

The Jinja environment is transformers': sandboxed, ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols``
extension, a pass-through ``{% generation %}`` tag, its ``tojson`` (``json.dumps`` with
``ensure_ascii=False``, not Jinja's HTML-safe one), ``raise_exception``, ``strftime_now`` and its guarded
``dict``/``namespace``. Imported by the llama.cpp worker: nothing heavy (jinja2 lazily).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any

from edgekit.errors import InputError, require

Render = Callable[[list[dict[str, Any]]], str]
# Every backend refuses chat messages with this line when the model ships no chat template: a guessed
# format (llama.cpp falls back to ChatML) would prompt the model in a way it was never trained on.
NO_CHAT_TEMPLATE = "this model has no chat template; pass raw text (--raw)"



@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Refusal(jinja2.exceptions.TemplateError):
        """The template's own ``raise_exception``: it refuses these messages."""

    class Generation(jinja2.ext.Extension):
        # transformers' AssistantTracker renders the block as is when no assistant mask is asked for
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class TemplateDict:  # transformers' dict(): no attribute access to the builtin
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # transformers' namespace(): no underscore attributes
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    def raise_exception(message: str) -> None:
        raise Refusal(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template), Refusal
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise InputError(f"the chat template could not be read ({exc.message}, line {exc.lineno}); fix the model's "
                         "chat template or pass raw text (--raw)") from exc


def make_renderer(template: str | None, special_tokens: dict[str, str | None],
                  strftime_now: Callable[[str], str] | None = None) -> Render:
    """The chat template as a function of the messages, rendered as ``apply_chat_template(...,
    add_generation_prompt=True)`` renders it: ``special_tokens`` (``bos_token``, ``eos_token``, ...) are the
    template's variables of those names; ``strftime_now`` replaces today's date (a converter fixing the
    moment). Raises InputError for a missing or unreadable template, and when rendering fails (the template's
    ``raise_exception`` is a refusal of the messages, and its ``__cause__`` is the template's error)."""
    if not template:
        raise InputError(NO_CHAT_TEMPLATE)
    jinja2: Any = require("jinja2", "onnx")  # the extra that lists it (llama-cpp-python brings its own)

    compiled, refusal = _compile(template)
    tokens: dict[str, Any] = {k: v for k, v in special_tokens.items() if v is not None}
    if strftime_now is not None:
        tokens["strftime_now"] = strftime_now  # a variable of the render shadows the environment's global

    def render(messages: list[dict[str, Any]]) -> str:
        # transformers drops None values: templates test for a missing key, not for None
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return compiled.render(messages=msgs, tools=None, documents=None, add_generation_prompt=True, **tokens)
        except refusal as exc:
            raise InputError(f"the chat template refused these messages: {exc}") from exc
        except (jinja2.exceptions.TemplateError, TypeError, ValueError) as exc:
            raise InputError(f"the chat template could not render these messages ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); fix the model's chat template or pass raw text (--raw)") from exc

    return render
