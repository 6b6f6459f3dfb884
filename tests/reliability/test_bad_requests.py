"""Bad requests sent to the real server: each gets a named error and a 400, and the next good
request succeeds."""

from __future__ import annotations

import numpy as np
import pytest

from pigeon.checkpoint import load_checkpoint
from pigeon.serving.client import ClientError, PigeonClient

from ..test_serving import HISTORY, REFERENCE
from .support import (
    ONE_PIXEL,
    TIMEOUT_S,
    TRUNCATED,
    bomb,
    decode,
    generate,
    png_header,
    same_image,
)

# (request fields, the error it must get); test_serving.py covers: not an image, empty history,
# 8 images, empty text, 1001 characters, steps=0, guidance=nan, reference_mask_ratio=2.0, a
# 5000x5000 history image and non-UTF-8 text
SERVER_BAD = {
    "zero_byte_history_image": ({"history": [b""]}, r"history\[0\]: not a readable image"),
    "zero_byte_reference": ({"reference": b""}, r"reference: not a readable image"),
    "truncated_png": (
        {"history": [TRUNCATED]},
        r"history\[0\]: (truncated or corrupt|not a readable)",
    ),
    "bomb_reference": ({"reference": bomb()}, r"reference: 5000x5000 pixels exceeds the limit"),
    "header_claims_10_gigapixels": (
        {"history": [png_header(100_000, 100_000)]},
        r"history\[0\]: .*exceeds the limit of 16777216 pixels",
    ),
    "whitespace_text": ({"text": " \n\t "}, r"text is empty"),
    "100k_character_text": ({"text": "y" * 100_000}, r"text has 100000 characters, more than"),
    "inf_guidance": ({"guidance": float("inf")}, r"guidance=inf must be a finite number"),
    "negative_guidance": ({"guidance": -1.0}, r"guidance=-1.0 must be a finite number >= 0"),
    "nan_mask_ratio": (
        {"reference_mask_ratio": float("nan")},
        r"reference_mask_ratio=nan must be in \[0, 1\]",
    ),
    "negative_mask_ratio": (
        {"reference_mask_ratio": -0.5},
        r"reference_mask_ratio=-0.5 must be in \[0, 1\]",
    ),
    "negative_steps": ({"steps": -3}, r"steps=-3 must be an integer in \[1, "),
    "billion_steps": ({"steps": 10**9}, r"steps=1000000000 must be an integer in \[1, "),
    "negative_seed": ({"seed": -1}, r"seed=-1 must be a non-negative integer"),
    "thousand_image_history": (
        {"history": [ONE_PIXEL] * 1000},
        r"history has 1000 images, more than the configured maximum of 5",
    ),
}


@pytest.mark.parametrize("case", list(SERVER_BAD))
def test_bad_request_gets_a_named_error_and_the_next_good_one_succeeds(served, case):
    """The client's fault is INVALID_ARGUMENT over gRPC and 400 over HTTP, never a 500 that load
    balancers would retry and page someone for."""
    fields, message = SERVER_BAD[case]
    protocol = "http" if sorted(SERVER_BAD).index(case) % 2 else "grpc"
    with pytest.raises(ClientError, match=message) as info:
        generate(served, protocol, **fields)
    assert (info.value.status, info.value.http_status) == ("INVALID_ARGUMENT", 400), protocol
    assert generate(served).image_png[:8] == b"\x89PNG\r\n\x1a\n"


def _raw(server, inputs: dict) -> str:
    """Send tensors below PigeonClient (wrong dtypes and shapes); returns the server's error."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    tensors = []
    for name, (value, dtype) in inputs.items():
        tensor = tc.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client = tc.InferenceServerClient(server.grpc_url)
    try:
        client.infer("pigeon", tensors, client_timeout=TIMEOUT_S)
    except InferenceServerException as exc:
        return exc.message()
    finally:
        client.close()
    raise AssertionError(f"the server accepted {sorted(inputs)}")


GOOD_RAW = {
    "history_images": (np.array(HISTORY[:2], np.object_), "BYTES"),
    "reference_image": (np.array([REFERENCE], np.object_), "BYTES"),
    "text": (np.array([b"a cat"], np.object_), "BYTES"),
}
RAW_BAD = {
    "seed_as_float": (
        {**GOOD_RAW, "seed": (np.array([1.5], np.float32), "FP32")},
        r"input 'seed' data-type is 'FP32', but model 'pigeon' expects 'INT64'",
    ),
    "steps_as_bytes": (
        {**GOOD_RAW, "steps": (np.array([b"2"], np.object_), "BYTES")},
        r"steps",
    ),
    "history_as_int64": (
        {**GOOD_RAW, "history_images": (np.array([1, 2], np.int64), "INT64")},
        r"history_images",
    ),
    "two_references": (
        {**GOOD_RAW, "reference_image": (np.array([REFERENCE, REFERENCE], np.object_), "BYTES")},
        r"reference_image",
    ),
    "history_of_rank_2": (
        {**GOOD_RAW, "history_images": (np.array([HISTORY[:2]], np.object_), "BYTES")},
        r"history_images",
    ),
    "text_missing": ({k: v for k, v in GOOD_RAW.items() if k != "text"}, r"text"),
    "unknown_input": (
        {**GOOD_RAW, "temperature": (np.array([1.0], np.float32), "FP32")},
        r"temperature",
    ),
}


@pytest.mark.parametrize("case", list(RAW_BAD))
def test_wrong_dtypes_and_shapes_are_named_and_the_server_keeps_serving(served, case):
    inputs, message = RAW_BAD[case]
    import re

    error = _raw(served, inputs)
    assert re.search(message, error), error
    assert generate(served).image_png[:4] == b"\x89PNG"


def test_one_pixel_images_are_served(served, checkpoint_dir):
    from pigeon.core.images import load_image
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
    from pigeon.inference.runners import OrtRunner

    result = decode(generate(served, history=[ONE_PIXEL] * 3, reference=ONE_PIXEL, steps=3))
    ckpt = load_checkpoint(checkpoint_dir)
    files = {p.parent.parent.name: p for p in served.repository.glob("*/1/model.onnx")}
    pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, OrtRunner.from_files(files, ckpt.config))
    expected = pipe(
        GenerationRequest(
            history=[load_image(ONE_PIXEL)] * 3,
            reference=load_image(ONE_PIXEL),
            text="a red circle",
            seed=4,
            steps=3,
        )
    )[0].image
    assert same_image(result, expected)  # the same image as in process, from 1x1 inputs


def test_client_refuses_what_it_cannot_send():
    with pytest.raises(ValueError, match=r"timeout_s=nan must be a finite number"):
        PigeonClient("127.0.0.1:1", "grpc", timeout_s=float("nan"))
    with pytest.raises(ValueError, match=r"timeout_s=0 must be"):
        PigeonClient("127.0.0.1:1", "http", timeout_s=0)
    with PigeonClient("127.0.0.1:1", "grpc", timeout_s=5) as client:
        with pytest.raises(ClientError, match="text is not valid UTF-8"):
            client.generate(HISTORY, REFERENCE, "bad \udcff text")
        with pytest.raises(
            ClientError, match=r"seed=1180591620717411303424 cannot be sent as INT64"
        ):
            client.generate(HISTORY, REFERENCE, "x", seed=2**70)
