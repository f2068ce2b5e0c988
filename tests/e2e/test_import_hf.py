"""End to end through the real stack's gateway: a GPT-2 directory built here is imported with
`maas models import-hf` by a tenant's developer key; the registry's metadata says what it is;
the same bytes download back; a hostile file sent as SAFETENSORS with the SDK is refused; the
version deploys on Triton and generates greedily the text transformers generates. A second
tenant's Llama chats with the official `openai` client beside it, under keys, usage and quotas."""

from __future__ import annotations

import json
import os
import time

import pytest
from maas import Client
from maas.errors import ApiError
from maas.hf_import import GENERATION_SIGNATURE

from tests.support.hf_models import hf_model_dir

pytestmark = pytest.mark.slow
PROMPT = "ROMEO: But soft, what light"


@pytest.fixture(scope="module")
def imported(stack, tmp_path_factory):
    """A tenant's developer client and the GPT-2 directory it imported as model "poet"."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant("bards")
    key = admin.create_api_key("bards", "developer")[1]
    directory = hf_model_dir(tmp_path_factory.mktemp("hf"), "gpt2")
    result = stack.maas("models", "import-hf", str(directory), "--model", "poet",
                        env=dict(stack.env, MAAS_API_KEY=key))
    assert "poet version 1 ready: GPT2LMHeadModel" in result.stdout, result.stdout + result.stderr
    return Client(stack.gateway, key), directory


def test_the_registry_records_what_the_model_is(imported, tmp_path):
    client, directory = imported
    version = client.get_version("poet", 1)
    config = json.loads((directory / "config.json").read_text())
    assert version.metadata["architecture"] == "GPT2LMHeadModel" and version.metadata["task"] == "language"
    assert version.metadata["context_length"] == str(config["n_positions"]) and version.metadata["dtype"] == "float32"
    assert version.metadata["maas.source"] == "upload" and version.signature == GENERATION_SIGNATURE
    downloaded = client.download_version("poet", 1, tmp_path / "poet.safetensors")
    assert downloaded.sha256 == version.sha256 and (tmp_path / "poet.safetensors").stat().st_size == version.size_bytes


def test_a_hostile_safetensors_upload_is_refused_through_the_gateway(imported, tmp_path):
    client, _ = imported
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(ApiError) as refused:
        client.upload_version("poet", hostile, format="safetensors", signature=GENERATION_SIGNATURE)
    assert refused.value.code.name == "INVALID_ARGUMENT" and "over" in str(refused.value)
    assert [v.version for v in client.list_versions("poet")] == [1]


def test_the_imported_model_deploys_and_generates_what_transformers_does(imported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client, directory = imported
    client.create_deployment("poet", "poet", version=1)
    client.wait_ready("poet", timeout=300)
    responses = list(client.generate("poet", PROMPT, max_tokens=12, temperature=0))
    text = "".join(response.text for response in responses)

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    new_tokens = generated[0, prompt["input_ids"].shape[1]:]
    # Streamed text is valid UTF-8: bytes of a character not finished by the last token are held
    # back, where decode() writes replacement characters.
    assert text == tokenizer.decode(new_tokens, skip_special_tokens=True).rstrip("\ufffd") and text
    assert responses[-1].prompt_tokens == prompt["input_ids"].shape[1]
    assert responses[-1].completion_tokens == len(new_tokens)


def test_an_imported_llama_streams_chat_to_the_openai_client_with_keys_quotas_and_usage(stack, imported, tmp_path):
    """The issue's whole path: a Llama directory imported with the SDK by a second tenant,
    deployed, and chatted with through the official `openai` client (streamed, with usage in the
    last chunk) beside the first tenant's GPT-2, concurrently; each tenant sees only its own model,
    usage lands on the right tenant, and a spent token quota answers 429."""
    import asyncio

    import openai
    import torch
    from maas.gateway.v1 import admin_pb2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bards, _ = imported
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant("llamas")
    key = admin.create_api_key("llamas", "developer")[1]
    directory = hf_model_dir(tmp_path, "llama", seed=3)
    with Client(stack.gateway, key) as llamas:
        assert llamas.import_hf(directory, model="herder").metadata["architecture"] == "LlamaForCausalLM"
        llamas.create_deployment("herder", "herder", version=1)
        llamas.wait_ready("herder", timeout=300)
    messages = [{"role": "system", "content": "You speak verse."}, {"role": "user", "content": "Who is there?"}]
    bards_key = dict(bards._metadata)["authorization"].removeprefix("Bearer ")
    usage_before = {tenant: sum(row.tokens for row in admin.get_usage(tenant)) for tenant in ("bards", "llamas")}

    async def chat(api_key: str, model: str) -> tuple[str, openai.types.CompletionUsage]:
        async with openai.AsyncOpenAI(base_url=stack.http + "/v1", api_key=api_key, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    async def both():  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(chat(key, "herder") for _ in range(3)), chat(bards_key, "poet"))

    *herds, (_, poet_usage) = asyncio.run(both())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True).rstrip("\ufffd")
    for text, usage in herds:
        assert text == expected and usage.prompt_tokens == prompt.shape[1]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # Usage is the tenant's own; the other tenant's model does not exist for it.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        grown = {t: sum(row.tokens for row in admin.get_usage(t)) - usage_before[t] for t in usage_before}
        if grown["llamas"] >= 3 * herds[0][1].total_tokens and grown["bards"] >= poet_usage.total_tokens:
            break
        time.sleep(0.5)
    assert grown == {"llamas": 3 * herds[0][1].total_tokens, "bards": poet_usage.total_tokens}
    with openai.OpenAI(base_url=stack.http + "/v1", api_key=key, max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["herder"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="poet", messages=messages, max_tokens=4)
        admin.set_quota(admin_pb2.Quota(tenant="llamas", tokens_per_day=1))
        try:
            time.sleep(1.5)  # the gateway rereads quotas every second
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="herder", messages=messages, max_tokens=4)
        finally:
            admin.set_quota(admin_pb2.Quota(tenant="llamas"))
    admin.close()
