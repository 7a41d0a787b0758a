"""The server's parts that need no model: chat templates against transformers, text streamed token by token,
nucleus sampling and OpenAI's penalties (the server itself: tests/e2e/test_server.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def cases():
    return json.loads((FIXTURES / "chat" / "cases.json").read_text())


def test_chat_templates_render_and_encode_as_transformers_does(cases, tmp_path):
    """Five published templates (line breaks trimmed as Jinja's trim_blocks and lstrip_blocks do, bos_token,
    raise_exception, a namespace, tojson, loop controls): the text and token ids of transformers'
    apply_chat_template, and its refusal where the template refuses."""
    from hvdtrain.data import tokenizer as T
    from hvdtrain.serving import chat

    hf = FIXTURES / "hf" / "llama-gqa"
    tok = T.BPE.from_json((hf / "tokenizer.json").read_text())
    config = json.loads((hf / "tokenizer_config.json").read_text())
    checked = 0
    for name, source in cases["templates"].items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": source}))
        template = chat.load(str(tmp_path / name))
        assert template.from_model and template.special["bos_token"] == cases["special"]["bos_token"]
        for case in [c for c in cases["cases"] if c["template"] == name]:
            if "error" in case:
                with pytest.raises(chat.TemplateError, match="roles must alternate"):
                    template.render(case["messages"])
                continue
            assert template.render(case["messages"]) == case["text"], name
            assert template.encode(case["messages"], tok) == case["ids"], name
            checked += 1
    assert checked == 14


def test_a_model_without_a_template_gets_plain_lines_and_a_bad_template_is_one_line(tmp_path):
    from hvdtrain.data import tokenizer as T
    from hvdtrain.serving import chat

    plain = chat.load(str(tmp_path))
    assert not plain.from_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert plain.render(messages) == "system: Be brief.\nuser: Hi\nassistant:"
    tok = T.BPE.from_json((FIXTURES / "hf" / "llama-gqa" / "tokenizer.json").read_text())
    assert plain.encode(messages, tok) == tok.encode(plain.render(messages), special=True)  # with its begin-of-text
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(chat.TemplateError, match="the chat template cannot be read: .*endfor"):
        chat.load(str(tmp_path), str(tmp_path / "bad.jinja"))


def test_text_streamed_token_by_token_is_the_whole_decoding_with_stop_strings_held_back():
    """Characters split across byte tokens wait for their last byte; text that may begin a stop string is held
    back until it cannot; a stop string ends the text before it, even across tokens."""
    from hvdtrain.data.tokenizer import Bytes
    from hvdtrain.serving.engine import TextStream

    tok = Bytes()
    text = "héllo → wörld, the end"
    stream = TextStream(tok)
    pieces = []
    for t in tok.encode(text):
        stream.add(t)
        pieces.append(stream.flush(final=False))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    stream = TextStream(tok, ("wörld", "zzz"))
    out, stopped = [], False
    for t in tok.encode(text):
        stopped = stream.add(t)
        out.append(stream.flush(final=stopped))
        if stopped:
            break
    assert stopped and "".join(out) == "héllo → "
    assert all(not p.endswith("w") for p in out[:-1])  # "w" might have begun the stop string: held back


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p_and_penalties_follow_openai():
    from hvdtrain.serving.sampling import penalized, transform

    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    assert np.allclose(transform(logits, 1.0, 0, 0.7), [2 / 3, 1 / 3, 0, 0])  # 0.5 + 0.25 reach 0.7
    assert np.allclose(transform(logits, 1.0, 0, 0.75), [2 / 3, 1 / 3, 0, 0])  # exactly reached: no more
    assert np.allclose(transform(logits, 1.0, 0, 1.0), [0.5, 0.25, 0.15, 0.1])
    # top-k first (0.5, 0.25, 0.15 renormalised), then top-p over what it kept
    assert np.allclose(transform(logits, 1.0, 3, 0.9), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0])
    assert np.allclose(transform(logits, 1.0, 3, 0.8), [2 / 3, 1 / 3, 0, 0])
    rng = np.random.default_rng(0)
    draws = [int(rng.choice(4, p=transform(logits, 1.0, 0, 0.7))) for _ in range(2000)]
    assert set(draws) == {0, 1} and abs(draws.count(0) / 2000 - 2 / 3) < 0.04
    base = np.zeros(4)
    got = penalized(base, {1: 3, 2: 1}, presence=0.5, frequency=0.25, bias={3: 2.0})
    assert np.allclose(got, [0, -(0.5 + 0.75), -(0.5 + 0.25), 2.0])
    assert penalized(base, {1: 3}) is base  # no penalties: the logits themselves
