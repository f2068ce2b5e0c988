"""`maas generate`: text from a text-generation deployment (e.g. the trainer's GPT), streamed
token by token with --stream or printed once it is complete."""

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
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Continue PROMPT with a text-generation deployment."""
    maas = client(api_key, address)
    pieces: list[str] = []
    final = inference_pb2.GenerateResponse()
    try:
        for response in maas.generate(
            deployment, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
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
        errors.print("\n[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    print("".join(pieces) if not stream else "")
    reason = inference_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    errors.print(
        f"[dim]{final.completion_tokens} tokens ({final.prompt_tokens} in the prompt), finished: {reason}, "
        f"{final.model} version {final.version}[/]"
    )
