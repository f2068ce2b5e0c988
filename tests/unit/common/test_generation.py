"""Generation requests: validation of the sampling parameters, the Triton request and the parsing
of streamed responses (services/common/generation.py)."""

from __future__ import annotations

import json
import struct

import pytest
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.generation import (
    GenerationFailed,
    Sampling,
    check_prompt,
    generate_response_of_stream,
    generation_of_infer,
    is_final,
    sampling_of_generate,
    stream_request,
)


def bytes_element(text: str) -> bytes:
    return struct.pack("<I", len(text.encode())) + text.encode()


def test_unset_fields_take_the_defaults():
    sampling = sampling_of_generate(inference_pb2.GenerateRequest(deployment="d", prompt="hi"))
    assert sampling == Sampling(max_tokens=64, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=())


def test_zero_temperature_and_seed_zero_are_kept_not_defaulted():
    request = inference_pb2.GenerateRequest(prompt="hi", temperature=0.0, seed=0, max_tokens=5, stop=["\n"])
    assert sampling_of_generate(request) == Sampling(max_tokens=5, temperature=0.0, seed=0, stop=("\n",))


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"max_tokens": 0}, "max_tokens must be between 1 and 2048"),
        ({"max_tokens": 2049}, "max_tokens must be between 1 and 2048"),
        ({"temperature": -0.1}, "temperature must be 0"),
        ({"temperature": float("nan")}, "temperature must be 0"),
        ({"top_k": -1}, "top_k must be 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"stop": [str(i) for i in range(9)]}, "at most 8 stop sequences"),
        ({"stop": [""]}, "stop sequences must be 1 to 64 characters"),
        ({"stop": ["x" * 65]}, "stop sequences must be 1 to 64 characters"),
    ],
)
def test_bad_parameters_are_refused_with_the_rule(fields, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        sampling_of_generate(inference_pb2.GenerateRequest(prompt="hi", **fields))


def test_an_empty_or_huge_prompt_is_refused():
    with pytest.raises(InvalidArgument, match="must not be empty"):
        check_prompt("")
    with pytest.raises(InvalidArgument, match="at most 16384 characters"):
        check_prompt("x" * 16_385)


def test_the_stream_request_round_trips_through_the_oip_parser():
    sampling = Sampling(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=42, stop=("\n\n", "END"))
    request = stream_request("To be, or not", sampling, "m_abc", "req-1")
    assert (request.model_name, request.id) == ("m_abc", "req-1")
    assert generation_of_infer(request) == ("To be, or not", sampling)


def test_oip_requests_are_checked_like_generate_requests():
    request = stream_request("hi", Sampling(), "m")
    request.parameters["temperature"].int64_param = 0  # an integer temperature is fine
    assert generation_of_infer(request)[1].temperature == 0
    request.parameters["max_tokens"].string_param = "lots"
    with pytest.raises(InvalidArgument, match="parameter 'max_tokens' must be of type int64"):
        generation_of_infer(request)
    bad_stop = stream_request("hi", Sampling(), "m")
    bad_stop.parameters["stop"].string_param = "not json"
    with pytest.raises(InvalidArgument, match="JSON list of strings"):
        generation_of_infer(bad_stop)
    too_long = stream_request("hi", Sampling(), "m")
    too_long.parameters["max_tokens"].int64_param = 5000
    with pytest.raises(InvalidArgument, match="max_tokens"):
        generation_of_infer(too_long)
    wrong_input = service_pb2.ModelInferRequest(model_name="m")
    wrong_input.inputs.add(name="x", datatype="FP32", shape=[1])
    with pytest.raises(InvalidArgument, match="send one input, 'prompt'"):
        generation_of_infer(wrong_input)
    truncated = stream_request("hi", Sampling(), "m")
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-1]
    with pytest.raises(InvalidArgument, match="exactly one BYTES element"):
        generation_of_infer(truncated)


def stream_response(**outputs) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelStreamInferResponse()
    for name, value in outputs.items():
        if isinstance(value, str):
            response.infer_response.outputs.add(name=name, datatype="BYTES", shape=[1])
            response.infer_response.raw_output_contents.append(bytes_element(value))
        else:
            response.infer_response.outputs.add(name=name, datatype="INT64", shape=[1])
            response.infer_response.raw_output_contents.append(struct.pack("<q", value))
    return response


def test_token_and_final_responses_are_parsed():
    token = generate_response_of_stream(stream_response(text="é"), "gpt", 3)
    assert (token.text, token.model, token.version, is_final(token)) == ("é", "gpt", 3, False)
    final = generate_response_of_stream(
        stream_response(text="", finish_reason="stop", prompt_tokens=5, completion_tokens=9), "gpt", 3
    )
    assert is_final(final) and final.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert (final.prompt_tokens, final.completion_tokens) == (5, 9)


def test_error_responses_map_to_the_callers_fault_or_a_failure():
    with pytest.raises(InvalidArgument, match="^the prompt holds characters"):
        generate_response_of_stream(
            service_pb2.ModelStreamInferResponse(error_message="invalid input: the prompt holds characters"), "g", 1
        )
    with pytest.raises(GenerationFailed, match="out of memory"):
        generate_response_of_stream(service_pb2.ModelStreamInferResponse(error_message="out of memory"), "g", 1)
    with pytest.raises(ResourceExhausted, match="^all 8 sequences"):
        generate_response_of_stream(
            service_pb2.ModelStreamInferResponse(error_message="model busy: all 8 sequences are in flight"), "g", 1
        )


def test_stop_travels_as_a_json_list():
    request = stream_request("hi", Sampling(stop=('"quoted"',)), "m")
    assert json.loads(request.parameters["stop"].string_param) == ['"quoted"']
