"""`maas generate`: text from a text-generation deployment (the trainer's GPT, or an imported
language model), streamed token by token with --stream or printed once it is complete; with
--chat the text is a user's message that the model's chat template turns into the prompt."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from maas.cli._shared import AddressOption, ApiKeyOption, client, errors, fail
from maas.errors import ApiError
from maas.inference.v1 import inference_pb2


def generate(
    deployment: str,
    prompt: str,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Tokens to generate (default 64)")] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="Default 1.0; 0 picks the most likely token")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens; 0: all")] = 0,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling, in (0, 1]")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="The same seed gives the same text")] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable, at most 8)")
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print each token as it arrives")] = False,
    chat: Annotated[
        bool, typer.Option("--chat", help="PROMPT is a user's message, answered through the model's chat template")
    ] = False,
    system: Annotated[str, typer.Option("--system", help="With --chat: a system message before it")] = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Continue PROMPT with a text-generation deployment (with --chat: answer it)."""
    if system and not chat:
        raise typer.BadParameter("--system goes with --chat", param_hint="--system")
    messages = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": prompt}]
    maas = client(api_key, address)
    pieces: list[str] = []
    final = inference_pb2.GenerateResponse()
    try:
        for response in maas.generate(
            deployment, "" if chat else prompt, messages=messages if chat else (), max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stop=stop or (),
        ):
            if response.finish_reason:
                final = response
            elif stream:
                sys.stdout.write(response.text)
                sys.stdout.flush()
            else:
                pieces.append(response.text)
    except ApiError as error:
        raise fail(error) from None
    except KeyboardInterrupt:
        # Leaving the stream cancels the call: the model stops generating.
        errors.print("\ninterrupted", style="yellow")
        raise typer.Exit(130) from None
    print("".join(pieces) if not stream else "")
    reason = inference_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    errors.print(
        f"{final.completion_tokens} tokens ({final.prompt_tokens} in the prompt), finished: {reason}, "
        f"{final.model} version {final.version}",
        style="dim",
    )
