"""A checkpoint that declares a chat_template: the prompt the server reads is the one Hugging Face's
`apply_chat_template` renders with the same template and tokenizer (same text, same token count, same greedy reply
as /v1/completions on that text), and the template's raise_exception becomes a 400."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import LiveServer

from service.chat_template import DEFAULT_TEMPLATE, ChatTemplateError, load_chat_template

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

# Llama-2-like: a system block, alternation enforced with raise_exception, whitespace shaped by trim/lstrip_blocks
TEMPLATE = """{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}
{% else %}
{% set system = none %}{% set rest = messages %}
{% endif %}
{{ bos_token }}{% if system %}<<SYS>> {{ system }} <</SYS>>
{% endif %}
{% for m in rest %}
    {% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('roles must alternate user/assistant') }}
    {% endif %}
    {% if m['role'] == 'user' %}
[INST] {{ m['content'] | trim }} [/INST]
    {%- else %} {{ m['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %} {% endif %}"""

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "ROMEO: O Juliet"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two dogs"},
     {"role": "assistant", "content": " play in the snow. "}, {"role": "user", "content": "A man rides"}],
]


@pytest.fixture
def chat_models(checkpoints_dir: Path, tmp_path: Path) -> Path:
    """tiny-gpt's folder copied as tiny-chat, with a tokenizer_config.json that declares TEMPLATE."""
    folder = tmp_path / "models" / "tiny-chat"
    shutil.copytree(checkpoints_dir / "tiny-gpt", folder)
    config = {"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def hf_tokenizer(folder: Path) -> Any:
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                               eos_token="</s>")
    tok.chat_template = TEMPLATE
    return tok


def test_renders_as_hugging_face_does(chat_models: Path) -> None:
    ours, hf = load_chat_template(chat_models, "<s>", "</s>"), hf_tokenizer(chat_models)
    assert ours.source == "checkpoint"
    for messages in CONVERSATIONS:
        for add in (True, False):
            assert ours.render(messages, add) == hf.apply_chat_template(messages, add_generation_prompt=add,
                                                                         tokenize=False)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.render([{"role": "assistant", "content": "x"}])


def test_the_server_reads_the_declared_template(chat_models: Path, make_server: Any) -> None:
    server: LiveServer = make_server(models_dir=chat_models.parent)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    hf = hf_tokenizer(chat_models)
    for messages in CONVERSATIONS:
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
        ref = client.completions.create(model="tiny-chat", prompt=text, max_tokens=12, temperature=0)
        assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
        assert chat.choices[0].message.content == ref.choices[0].text
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"model": "tiny-chat", "messages": [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
    card = httpx.get(f"{server.url}/v1/models/tiny-chat").json()
    assert card["details"]["chat"] == {"available": True, "prompt": "checkpoint chat template"}


def test_where_a_template_may_be_declared(tmp_path: Path) -> None:
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ eos_token }}"}],
        "eos_token": {"content": "<|end|>", "special": True}}))
    assert load_chat_template(named, "<s>", "</s>").render([]) == "<|end|>"
    jinja = tmp_path / "jinja"
    jinja.mkdir()
    (jinja / "chat_template.jinja").write_text("{{ messages | length }}{{ bos_token }}{{ flavour | default('') }}")
    from_file = load_chat_template(jinja, "<s>", "</s>")
    assert from_file.render([{"role": "user", "content": "a"}]) == "1<s>"
    assert from_file.render([], extra={"flavour": "x"}) == "0<s>x"  # chat_template_kwargs
    none = tmp_path / "none"
    none.mkdir()
    default = load_chat_template(none, "<s>", "</s>")
    assert (default.source, default.text) == ("default", DEFAULT_TEMPLATE)
    assert default.render([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ChatTemplateError, match="does not parse"):
        load_chat_template(broken, "<s>", "</s>")


def test_the_sandbox_refuses_unsafe_attribute_access(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ messages.__class__.__mro__ }}"}))
    with pytest.raises(ChatTemplateError):
        load_chat_template(tmp_path, None, None).render([])
