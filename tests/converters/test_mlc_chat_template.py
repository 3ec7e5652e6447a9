"""MLC's conversation template, derived from the checkpoint's Jinja chat template: the pieces cut from it,
the templates MLC's protocol cannot express (refused) or only in part (named), and reasoning templates
(Qwen3's) as plain ChatML with past replies as the model wrote them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_conversation_template_is_derived_from_the_chat_template(template):
    from edgekit.converters.formats.mlc.chat_config import derive, jinja_render, render

    conv = derive(template, "<|begin_of_text|>", "", [7])
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]
    with_system = [{"role": "system", "content": "S"}, *msgs]
    assert render(conv, with_system) == jinja_render(template, with_system, "<|begin_of_text|>")
    assert conv["stop_token_ids"] == [7] and conv["stop_str"] and len(conv["seps"]) == 1
    if template is CHATML:
        assert conv["system_message"] == "You are helpful." and render(conv, msgs) == jinja_render(template, msgs)
        assert conv["roles"] == {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant",
                                 "tool": "<|im_start|>user"}
        assert (conv["seps"], conv["role_content_sep"], conv["stop_str"]) == (["<|im_end|>\n"], "\n", ["<|im_end|>"])


def test_a_template_mlc_cannot_express_is_refused():
    from edgekit.converters.formats.mlc.chat_config import derive
    from edgekit.errors import InputError

    odd = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q' ~ loop.index ~ ': ' + m['content'] }}"
           "{% else %}{{ m['role'] + '> ' + m['content'] }}{% endif %}\n{% endfor %}A:")
    with pytest.raises(InputError, match="MLC"):
        derive(odd)


PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_loop_controls_render_as_in_transformers():
    from edgekit.converters.formats.mlc.chat_config import derive, jinja_render, render

    skip_empty = PLAIN_CHATML.replace("{% for message in messages %}", "{% for message in messages %}"
                                      "{% if not message['content'] %}{% continue %}{% endif %}")
    conv = derive(skip_empty)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}]
    assert render(conv, msgs) == jinja_render(skip_empty, msgs) == jinja_render(PLAIN_CHATML, msgs)


def test_a_template_that_refuses_mlcs_conversation_is_not_blamed():
    from edgekit.converters.formats.mlc.chat_config import derive
    from edgekit.errors import InputError

    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + PLAIN_CHATML)
    with pytest.raises(InputError, match="which this chat template refuses .System role not supported.; convert "
                                         "--to gguf or --to onnx") as e:
        derive(no_system)
    assert "fix" not in str(e.value)
    with pytest.raises(InputError, match="does not parse .* fix it in"):
        derive("{% for m in messages %}{{ m['content'] }")


DATED = ("{{ '<|im_start|>system\nToday: ' + strftime_now('%Y-%m-%d') + '\n' }}{% if messages[0]['role'] == "
         "'system' %}{{ messages[0]['content'] }}{% set msgs = messages[1:] %}{% else %}{% set msgs = messages %}"
         "{% endif %}{{ '<|im_end|>\n' }}{% for message in msgs %}{{ '<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template, bos, warned", [
    (CHATML, "", []),
    (PLAIN_CHATML, "", ["chats without a system message start '<|im_start|>system\\n<|im_end|>\\n' where the chat "
                        "template writes ''"]),
    (LLAMA3, "<B>", ["chats without a system message start '<B><|start_header_id|>system<|end_header_id|>\\n\\n"
                     "<|eot_id|>' where the chat template writes '<B>'", "trims whitespace around each message"]),
    (DATED, "", ["holds the date of this conversion, {today}, in every chat"]),
], ids=["default-system", "no-default-system", "trim", "date"])
def test_chats_the_conversation_template_cannot_reproduce_are_named(template, bos, warned):
    from datetime import date

    from edgekit.converters.formats.mlc.chat_config import Clock, derive, differences, jinja_render, render

    clock = Clock()
    conv = derive(template, bos, "", [7], clock)
    notes = differences(conv, template, bos, "", clock)
    assert len(notes) == len(warned) and all(n.startswith("warning: ") for n in notes), notes
    for note, want in zip(notes, warned, strict=True):
        assert want.format(today=date.today().isoformat()) in note, note
    chats = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": " s "}, {"role": "user", "content": "\thi "}]]
    for chat, named in zip(chats, ("without a system message", "whitespace"), strict=True):
        if not any(named in n for n in notes):  # whatever is not warned about renders as the template does
            assert render(conv, chat) == jinja_render(template, chat, bos, clock=clock)


# a reasoning template as Qwen3's behaves: a past reply re-rendered with its think block (an empty one if it had
# none), the reply's own block left to the model
THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
            "{% set c = m.content.split('</think>')[-1].lstrip('\\n') %}"
            "{% set r = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') "
            "if '</think>' in m.content else '' %}<think>\n{{ r }}\n</think>\n\n{{ c }}"
            "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_reasoning_template_becomes_chatml_with_replies_as_written():
    """Qwen3-style templates write an (empty) think block into past replies but leave the reply's to the model;
    MLC has one assistant role for both. It was refused ("the generation prompt differs from its assistant
    turns"); the conversation template is now the plain one (what mlc_llm ships for Qwen3), which renders as the
    template does once past replies hold the think block the model wrote, and a note says so."""
    from edgekit.converters.formats.mlc.chat_config import (
        REPLY_PREFIX,
        derive,
        differences,
        jinja_render,
        render,
    )
    from edgekit.errors import InputError

    thinking = THINKING
    conv = derive(thinking)
    assert conv["roles"]["assistant"] == "<|im_start|>assistant" and conv["role_empty_sep"] == "\n"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nweighing it\n</think>\n\nHello."},
            {"role": "user", "content": "Again"}]
    assert render(conv, chat) == jinja_render(thinking, chat)
    notes = differences(conv, thinking)
    assert any("think block" in n for n in notes), notes
    assert conv[REPLY_PREFIX] == "<think>\n\n</think>\n\n"
    bot = ("{% for m in messages %}<|im_start|>{{ 'bot' if m.role == 'assistant' else m.role }}\n{{ m.content }}"
           "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(InputError, match=r"past assistant turns otherwise.*--to gguf or --to onnx"):
        derive(bot)


def test_a_qwen3_with_a_reasoning_template_converts_and_runs(tiny_models, tmp_path):
    import shutil

    src = tmp_path / "q3"
    shutil.copytree(tiny_models["Qwen3ForCausalLM"], src)
    (src / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = THINKING
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["convert", str(src), "--to", "mlc", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "think block" in r.output
    conv = json.loads((tmp_path / "m" / "mlc-chat-config.json").read_text())["conv_template"]
    assert conv["roles"]["assistant"] == "<|im_start|>assistant" and "edgekit_reply_prefix" not in conv
    r = runner.invoke(app, ["run", str(tmp_path / "m"), "-p", "hi", "-n", "3", "--temp", "0"])
    assert r.exit_code == 0, r.output
