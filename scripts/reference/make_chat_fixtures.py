#!/usr/bin/env python3
"""Chat prompts rendered by transformers, for hvdtrain's chat templates (hvdtrain/serving/chat.py).

A one-off generator, run in the reference venv (scripts/reference/setup.sh makes it):

    .venv-reference/bin/python scripts/reference/make_chat_fixtures.py [--output tests/fixtures/chat/cases.json]

For five chat templates as their models publish them (ChatML as Qwen2.5 writes it, Llama 3's, Mistral Instruct's
with its role check, Zephyr's with its line breaks, and one with a namespace, ``tojson`` and ``loop`` controls) and
several conversations, it records what ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``
gives: the text, and the token ids of the llama-gqa fixture's tokenizer (tests/fixtures/hf/llama-gqa), or the
error the template raised. hvdtrain's test renders the same and compares.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]

TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
        "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
        "{% endfor %}"),
    "namespace": (
        "{%- set ns = namespace(system='') -%}\n"
        "{%- for message in messages -%}\n"
        "  {%- if message.role == 'system' -%}{%- set ns.system = message.content -%}{%- continue -%}{%- endif -%}\n"
        "  {%- if loop.index0 > 6 -%}{%- break -%}{%- endif -%}\n"
        "  {{ message.role | upper }}: {{ message.content | tojson }}\n"
        "{% endfor -%}\n"
        "{%- if ns.system %}SYSTEM: {{ ns.system }}\n{% endif -%}\n"
        "{%- if add_generation_prompt %}ASSISTANT:{% endif -%}"),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What does a for statement do?"}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Define a list."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! <ok> \"quoted\" é"},
     {"role": "user", "content": "  spaces around  "}],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "tests" / "fixtures" / "chat" / "cases.json"))
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "hf" / "llama-gqa")
    cases = []
    for name, template in TEMPLATES.items():
        for messages in CONVERSATIONS:
            case = {"template": name, "messages": messages}
            try:
                case["text"] = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                       add_generation_prompt=True)
                ids = tok.apply_chat_template(messages, chat_template=template, tokenize=True,
                                              add_generation_prompt=True, return_dict=False)
                case["ids"] = [int(i) for i in (ids["input_ids"] if isinstance(ids, dict) else ids)]
            except Exception as exc:  # noqa: BLE001 - the template's own error, recorded
                case["error"] = f"{type(exc).__name__}: {exc}"
            cases.append(case)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"made_by": f"transformers {transformers.__version__}, apply_chat_template",
                               "tokenizer": "tests/fixtures/hf/llama-gqa",
                               "special": {"bos_token": tok.bos_token, "eos_token": tok.eos_token},
                               "templates": TEMPLATES, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"{out}: {len(cases)} cases, {sum('error' in c for c in cases)} refused by their template")


if __name__ == "__main__":
    main()
