"""The request's parameters are declared once (`pigeon.interface`): every layer that carries them
agrees with the declaration, and a field declared nowhere fails here."""

import dataclasses
import inspect

import pytest

from pigeon.cli import build_parser
from pigeon.config import preset
from pigeon.inference.pipeline import GenerationRequest, check_request
from pigeon.interface import FORWARDED, PARAMETERS, PAYLOAD, parameter_values
from pigeon.serving.client import PigeonClient
from pigeon.serving.triton_config import ENSEMBLE_STEPS, python_model_io, request_interface

from .conftest import emoji_like

NAMES = [p.name for p in PARAMETERS]


def test_every_request_field_is_payload_or_a_declared_parameter():
    fields = [f.name for f in dataclasses.fields(GenerationRequest)]
    assert fields == [*PAYLOAD, *NAMES]


def test_the_client_takes_every_parameter():
    signature = list(inspect.signature(PigeonClient.generate).parameters)
    assert signature == ["self", *PAYLOAD, *NAMES]


def test_the_ensemble_serves_every_parameter_to_its_readers():
    config = preset("tiny")
    inputs, _ = request_interface(config)
    optional = {i.name: i.dtype for i in inputs if i.optional}
    assert optional == {p.name: p.dtype for p in PARAMETERS}
    io = python_model_io(config)
    steps = {model: ins for model, ins, _ in ENSEMBLE_STEPS}
    forwarded = {o.name for o in io["preprocess"][1] if o.name.endswith("_out")}
    # preprocess forwards exactly the parameters a later model reads (text_out is the payload's)
    assert forwarded == {f"{p.name}_out" for p in FORWARDED} | {"text_out"}
    assert {p.name for p in FORWARDED} == {p.name for p in PARAMETERS if p.readers}
    for p in PARAMETERS:
        for reader in p.readers:
            assert p.name in {i.name for i in io[reader][0]}, (p.name, reader)
            assert steps[reader][p.name] == p.checked
    readers = {"personalize", "denoise"}
    for model in readers:  # and nothing else reaches them as a parameter
        declared = {p.name for p in PARAMETERS if model in p.readers}
        assert {n for n in steps[model] if n in NAMES} == declared


@pytest.mark.parametrize("command", [["generate"], ["client", "generate"]])
def test_cli_flags_follow_the_declaration(command, tmp_path):
    base = ["--history", "h.png", "--reference", "r.png", "--text", "a cat", "--out", "o.png"]
    extra = [] if command == ["client", "generate"] else ["--checkpoint", "c"]
    parser = build_parser()
    args = parser.parse_args([*command, *base, *extra])
    assert parameter_values(args) == {}  # nothing given: every default is the request's own
    args = parser.parse_args(
        [*command, *base, *extra, "--sampler", "dpmpp_2m", "--seed", "3", "--strength", "0.5"]
    )
    assert parameter_values(args) == {"sampler": "dpmpp_2m", "seed": 3, "strength": 0.5}
    with pytest.raises(SystemExit):
        parser.parse_args([*command, *base, *extra, "--sampler", "euler"])


def test_parameters_round_trip_through_their_served_dtype():
    """What preprocess forwards (`to_array`) holds the checked value exactly, strings included."""
    config = preset("tiny")
    image = emoji_like(0)
    checked = check_request(
        config,
        GenerationRequest(
            [image], image, "a cat", seed=7, sampler="dpmpp_2m", strength=0.5, style_start="moments"
        ),
    )
    for p in PARAMETERS:
        array = p.to_array(getattr(checked, p.name))
        assert array.shape == (1,)
        value = array[0].decode() if p.dtype == "bytes" else array[0].item()
        assert value == pytest.approx(getattr(checked, p.name)), p.name
