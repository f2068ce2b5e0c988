"""Chat messages rendered with a model's template (runner/chat.py) as transformers renders them,
and templates a hostile tenant could ship: reaching for internals, loops that never end, output
or values that would fill the memory. Each fails with TemplateFailed (the caller's invalid
input) within its budget, and the process goes on."""

from __future__ import annotations

import time

import pytest

from tests.support.hf_models import CHAT_TEMPLATE
from tests.unit.inference.llm_runner_support import chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]


def test_a_chatml_template_renders_as_transformers_does(tmp_path):
    from transformers import AutoTokenizer

    from tests.support.hf_models import hf_model_dir

    tokenizer = AutoTokenizer.from_pretrained(hf_model_dir(tmp_path, "gpt2", n_layer=1))
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat.ChatTemplate(CHAT_TEMPLATE, "<|endoftext|>", "<|im_end|>").render(MESSAGES) == expected


def test_bos_eos_and_raise_exception_are_there_as_in_transformers():
    template = chat.ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] + eos_token }}{% endfor %}",
        "<s>", "</s>",
    )
    assert template.render([{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    with pytest.raises(chat.TemplateFailed, match="refused the messages: System role not supported"):
        template.render(MESSAGES)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "reached for '__class__'"),
        ("{{ raise_exception.__globals__['os'] }}", "reached for '__globals__'"),
        ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "reached for '__init__'"),
        ("{% set x = [] %}{{ x.append(1) }}", "(?i)unsafe|append"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "rendered more than"),
        ("{{ 'a' * 1000000000 }}", "huge sequence"),
        ("{{ (10 ** 60) ** 64 ** 64 }}", "huge power"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{{ messages[5]['content'] }}", "UndefinedError"),
        ("{% for %}", "does not compile"),
    ],
)
def test_hostile_templates_fail_cleanly_within_their_budget(source, reason):
    started = time.monotonic()
    with pytest.raises(chat.TemplateFailed, match=reason):
        chat.ChatTemplate(source).render(MESSAGES)
    assert time.monotonic() - started < chat.RENDER_SECONDS + 2


@pytest.mark.parametrize(
    "prompt",
    ["not json", "{}", "[]", '[{"role": "user"}]', '[{"role": "user", "content": 3}]',
     '[{"role": "user", "content": "hi", "name": "x"}]', '["hi"]'],
)
def test_messages_must_be_a_list_of_role_and_content(prompt):
    with pytest.raises(chat.TemplateFailed):
        chat.messages_of(prompt)


def test_messages_are_read_from_json():
    assert chat.messages_of('[{"role": "user", "content": "hi"}]') == [{"role": "user", "content": "hi"}]
