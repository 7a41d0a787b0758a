"""Chat messages to a prompt, as transformers' ``apply_chat_template`` makes it.

A model's chat template is the Jinja template its ``tokenizer_config.json`` holds (``chat_template``: a string, or
a list of named templates of which ``default`` is used), or a file given with ``--chat-template``. It is rendered in
the environment transformers uses (a sandbox, ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML) with ``messages``,
``add_generation_prompt=True`` and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...), and the text
is encoded without adding special tokens (the template writes them). Checked against transformers on four
published templates (tests/fixtures/chat, made by scripts/reference/make_chat_fixtures.py).

A model without a template gets :data:`PLAIN`: one ``role: content`` line per message, then ``assistant:``, encoded
with the tokenizer's special tokens (a Llama's begin-of-text first), as ``hvdtrain generate`` encodes a prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

PLAIN = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """A template that cannot be read, or that refused the messages (its ``raise_exception``)."""


@dataclass
class ChatTemplate:
    source: str
    special: dict[str, str]
    from_model: bool  # the model's own template (its special tokens written by it) or PLAIN

    def render(self, messages: list[dict]) -> str:
        import jinja2

        try:
            return _compiled(self.source).render(messages=messages, tools=None, documents=None,
                                                 add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template refused the messages: {exc}") from None

    def encode(self, messages: list[dict], tokenizer) -> list[int]:
        """The prompt's token ids."""
        return tokenizer.encode(self.render(messages), special=not self.from_model)


def load(folder: str | None, override: str | None = None) -> ChatTemplate:
    """The chat template of the model in ``folder`` (its ``tokenizer_config.json``), or ``override`` (a file), or
    :data:`PLAIN`."""
    from hvdtrain import storage

    config = {}
    if folder and storage.exists(storage.join(folder, "tokenizer_config.json")):
        config = json.loads(storage.read_text(storage.join(folder, "tokenizer_config.json")))
    special = {}
    for key in SPECIAL_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    if override:
        if not storage.exists(override):
            raise TemplateError(f"--chat-template {override} does not exist")
        source, from_model = storage.read_text(override), True
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None and folder and storage.exists(storage.join(folder, "chat_template.jinja")):
            source = storage.read_text(storage.join(folder, "chat_template.jinja"))  # transformers 4.43+ saves it so
        from_model = source is not None
        source = source if from_model else PLAIN
    try:
        _compiled(source)
    except Exception as exc:  # noqa: BLE001 - any Jinja syntax error, one line
        raise TemplateError(f"the chat template cannot be read: {exc}") from None
    return ChatTemplate(source, special, from_model)


_CACHE: dict[str, object] = {}


def _compiled(source: str):
    """``source`` compiled in transformers' environment (``_compile_jinja_template``)."""
    if source in _CACHE:
        return _CACHE[source]
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):  # noqa: A002 - transformers' name
        return datetime.now().strftime(format)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks the assistant's tokens with it): its
        body, as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    _CACHE[source] = compiled = env.from_string(source)
    return compiled
