"""The real tritonserver on the generated repository (cpu target): same image as in process, the
response cache, dynamic batching, per-request errors, version switches under load, generated configs."""

import io
import json
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from pigeon.checkpoint import load_checkpoint, save_checkpoint
from pigeon.config import ServingConfig, preset
from pigeon.core.images import load_image
from pigeon.export.publish import export_all
from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
from pigeon.inference.runners import OrtRunner
from pigeon.serving.client import ClientError, PigeonClient, deploy, rollback
from pigeon.serving.server import TritonServer
from pigeon.serving.triton_config import ENSEMBLE_STEPS, repository_configs, request_interface

from .conftest import emoji_like, make_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


HISTORY = [png(emoji_like(i)) for i in range(4)]
REFERENCE = png(emoji_like(9))


# the shared server calls the UNet model over BLS, so its dynamic batcher can be observed; the
# default (the UNet in the denoise process) has its own test below
BLS_UNET = ServingConfig(unet_in_process=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory, checkpoint_dir, tokenizer):
    repo = tmp_path_factory.mktemp("repo")
    export_all(checkpoint_dir, repo, 1, serving=BLS_UNET)
    # version 2 also recolours the reference from the history (scheduler.style_start), so the
    # Triton preprocess model's copy of that step is compared with the in-process one
    tiny = preset("tiny")
    recolouring = replace(tiny, scheduler=replace(tiny.scheduler, style_start="histogram"))
    other = save_checkpoint(
        make_model(recolouring, seed=3), tokenizer, tmp_path_factory.mktemp("ck2") / "v2"
    )
    export_all(other, repo, 2, serving=BLS_UNET)
    with TritonServer(repo / "cpu") as server:
        deploy(server.http_url, repo / "cpu", 1)
        yield server, repo, other


def in_process(checkpoint, repo, version, seed=4, steps=6, style_start=None, **params):
    """The image the in-process pipeline draws on version `version`'s ONNX files; `params`: any
    other request parameter (pigeon.interface.PARAMETERS); `style_start` replaces the checkpoint's."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.config
    if style_start is not None:
        config = replace(config, scheduler=replace(config.scheduler, style_start=style_start))
    artifacts = repo / "cpu"
    runner = OrtRunner.from_files(
        {
            n: artifacts / n / str(version) / "model.onnx"
            for n in (
                "history_encoder",
                "mask_generator",
                "personalizer",
                "condition_adapter",
                "vae_encoder",
                "unet",
                "vae_decoder",
            )
        },
        config,
    )
    pipe = PigeonPipeline(config, ckpt.tokenizer, runner)
    request = GenerationRequest(
        history=[load_image(h) for h in HISTORY],
        reference=load_image(REFERENCE),
        text="a red circle",
        seed=seed,
        steps=steps,
        **params,
    )
    return pipe(request)[0].image


def served_image(server, protocol="grpc", **kw):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with PigeonClient(url, protocol, timeout_s=60) as client:
        result = client.generate(HISTORY, REFERENCE, "a red circle", seed=4, steps=6, **kw)
    return np.asarray(Image.open(io.BytesIO(result.image_png)).convert("RGB")), result


# gRPC: the real-server smoke test of `make test`
@pytest.mark.parametrize("protocol", [pytest.param("grpc", marks=pytest.mark.smoke), "http"])
def test_served_image_equals_the_in_process_pipeline(served, checkpoint_dir, protocol):
    server, repo, _ = served
    image, result = served_image(server, protocol)
    expected = in_process(checkpoint_dir, repo, 1)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2
    assert set(result.timings) == {"preprocess", "personalize", "denoise", "postprocess"}


def test_served_img2img_equals_the_in_process_pipeline(served, checkpoint_dir):
    """strength < 1: the denoise model encodes the reference through vae_encoder over BLS."""
    server, repo, _ = served
    image, _ = served_image(server, strength=0.5)
    expected = in_process(checkpoint_dir, repo, 1, strength=0.5)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(image.astype(int) - served_image(server)[0].astype(int)).mean() > 1


def test_every_request_parameter_is_served(served, checkpoint_dir):
    """The sampler, a string parameter, reaches the denoise model: the served image equals the
    in-process one with the same sampler and differs from the default sampler's."""
    server, repo, _ = served
    image, _ = served_image(server, sampler="dpmpp_2m")
    expected = in_process(checkpoint_dir, repo, 1, sampler="dpmpp_2m")
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2
    default = in_process(checkpoint_dir, repo, 1, sampler="ddim")
    assert np.abs(image.astype(int) - default.astype(int)).mean() > 1
    with pytest.raises(ClientError, match="sampler='euler' is not one of") as bad:
        served_image(server, sampler="euler")
    assert bad.value.status == "INVALID_ARGUMENT"


def model_stats(server, model):
    with PigeonClient(server.grpc_url, "grpc") as client:
        stats = client.statistics(model)["model_stats"]
    return stats[0]


def test_returning_user_history_hits_the_response_cache(served):
    server, _, _ = served
    before = int(
        model_stats(server, "history_encoder")["inference_stats"]
        .get("cache_hit", {})
        .get("count", 0)
    )
    with PigeonClient(server.grpc_url, "grpc") as client:
        client.generate(HISTORY, png(emoji_like(20)), "first visit", seed=1, steps=2)
        client.generate(HISTORY, png(emoji_like(21)), "returning", seed=2, steps=2)
    after = int(model_stats(server, "history_encoder")["inference_stats"]["cache_hit"]["count"])
    assert after >= before + 1


def test_concurrent_requests_share_unet_executions(served):
    server, _, _ = served
    before = model_stats(server, "unet")
    errors = []

    def one(i):
        try:
            with PigeonClient(server.grpc_url, "grpc", timeout_s=120) as client:
                client.generate(HISTORY, REFERENCE, f"user {i}", seed=i, steps=8)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    after = model_stats(server, "unet")
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences == 4 * 8 * 2  # 4 users x 8 steps x (conditional + unconditional)
    assert executions < inferences / 2  # dynamic batching merged steps of different users


def test_unet_in_process_gives_the_same_image_without_calling_the_unet_model(
    tmp_path, checkpoint_dir
):
    """ServingConfig.unet_in_process (the default): denoise runs the UNet's file itself (no BLS
    per step)."""
    repo = tmp_path / "repo"
    export_all(checkpoint_dir, repo, 1)
    denoise = (repo / "cpu" / "denoise" / "config.pbtxt").read_text()
    assert 'key: "unet_in_process"' in denoise
    with TritonServer(repo / "cpu") as server:
        deploy(server.http_url, repo / "cpu", 1)
        image, _ = served_image(server, strength=0.5)
        assert int(model_stats(server, "unet").get("inference_count", 0)) == 0  # 0 is omitted
        assert int(model_stats(server, "vae_encoder")["inference_count"]) == 1  # still over BLS
    expected = in_process(checkpoint_dir, repo, 1, strength=0.5)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2


def test_a_reference_input_checkpoint_is_served_with_the_in_process_image(
    tmp_path, tiny_config, tokenizer
):
    """unet.reference_input through the BLS UNet: the generated unet config declares
    reference_latents, the denoise model feeds it, and the image is the in-process one."""
    import torch

    model = make_model(tiny_config)
    model.enable_reference_input()
    with torch.no_grad():  # as if trained: the reference's channels matter
        model.unet.conv_in.weight[:, tiny_config.vae.latent_channels :].normal_(0, 0.2)
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    repo = tmp_path / "repo"
    export_all(checkpoint, repo, 1, serving=BLS_UNET)
    assert 'name: "reference_latents"' in (repo / "cpu" / "unet" / "config.pbtxt").read_text()
    with TritonServer(repo / "cpu") as server:
        deploy(server.http_url, repo / "cpu", 1)
        image, _ = served_image(server)
        assert int(model_stats(server, "vae_encoder")["inference_count"]) == 1  # strength 1
    expected = in_process(checkpoint, repo, 1)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2


BOMB = png(np.zeros((1, 1, 3), np.uint8))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"history": [b"not an image"]}, "history[0]: not a readable image"),
        ({"history": []}, "history is empty"),
        ({"history": HISTORY * 2}, "history has 8 images, more than the configured maximum of 5"),
        ({"text": ""}, "text is empty"),
        ({"text": "x" * 1001}, "text has 1001 characters"),
        ({"steps": 0}, "steps=0 must be an integer"),
        ({"guidance": float("nan")}, "guidance=nan must be a finite number"),
        ({"reference_mask_ratio": 2.0}, "reference_mask_ratio=2.0 must be in [0, 1]"),
        ({"strength": 1.5}, "strength=1.5 must be in (0, 1]"),
    ],
)
def test_bad_requests_get_a_named_error_and_the_server_keeps_serving(served, kwargs, message):
    server, _, _ = served
    request = {"history": HISTORY, "reference": REFERENCE, "text": "a cat", "steps": 2, **kwargs}
    with PigeonClient(server.grpc_url, "grpc") as client:
        with pytest.raises(ClientError) as info:
            client.generate(**request)
        assert message in str(info.value)
        assert client.generate(HISTORY, REFERENCE, "fine", steps=2).image_png[:4] == b"\x89PNG"


def test_oversized_and_non_utf8_inputs_are_refused(served):
    server, _, _ = served
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, format="PNG")
    with PigeonClient(server.grpc_url, "grpc") as client:
        with pytest.raises(ClientError, match="5000x5000 pixels exceeds the limit"):
            client.generate([bomb.getvalue()], REFERENCE, "x", steps=2)
        import tritonclient.grpc as tc

        inputs = []
        for name, value in (
            ("history_images", np.array(HISTORY[:1], np.object_)),
            ("reference_image", np.array([REFERENCE], np.object_)),
            ("text", np.array([b"\xff\xfe bad"], np.object_)),
        ):
            tensor = tc.InferInput(name, list(value.shape), "BYTES")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="text is not valid UTF-8"):
            client.client.infer("pigeon", inputs)


def deploy_under_load(server, repo, version: int) -> tuple[list, list]:
    """Deploy `version` while two clients keep sending requests; -> (results, errors) of theirs."""
    results, errors, done = [], [], threading.Event()

    def load():
        with PigeonClient(server.grpc_url, "grpc", timeout_s=120) as client:
            while not done.is_set():
                try:
                    results.append(client.generate(HISTORY, REFERENCE, "load", steps=2))
                except Exception as exc:  # collected and asserted by the caller
                    errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deploy(server.http_url, repo / "cpu", version)
    finally:
        done.set()
        for t in threads:
            t.join()
    return results, errors


def test_version_switch_under_load_loses_no_request_and_rolls_back(served, checkpoint_dir):
    server, repo, other = served
    results, errors = deploy_under_load(server, repo, 2)
    assert results and not errors
    image, _ = served_image(server)
    expected_v2 = in_process(other, repo, 2)
    assert np.abs(image.astype(int) - expected_v2.astype(int)).max() <= 2
    # version 2's reference is recoloured from the history before the image-to-image start
    image, _ = served_image(server, strength=0.5)
    recoloured = in_process(other, repo, 2, strength=0.5)
    assert np.abs(image.astype(int) - recoloured.astype(int)).max() <= 2
    as_is = in_process(other, repo, 2, strength=0.5, style_start="none")
    assert np.abs(recoloured.astype(int) - as_is.astype(int)).mean() > 1
    # a request's style_start overrides the version's: the reference as it is, over HTTP too
    image, _ = served_image(server, "http", strength=0.5, style_start="none")
    assert np.abs(image.astype(int) - as_is.astype(int)).max() <= 2
    assert rollback(server.http_url, repo / "cpu") == 1
    image, _ = served_image(server)
    assert np.abs(image.astype(int) - in_process(checkpoint_dir, repo, 1).astype(int)).max() <= 2


def test_a_lora_version_swaps_only_the_personalizer_under_load_and_rolls_back(
    served, checkpoint_dir, tmp_path
):
    """`pigeon deploy --lora`: a PEFT adapter merged into the served checkpoint becomes a version in
    which only the personalizer's file is new; the switch loses no request in flight, the served
    image is that version's, and a bad adapter is refused by name with nothing published."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from pigeon.export.errors import ExportError
    from pigeon.export.publish import publish_lora
    from pigeon.interop import InteropError, export_peft

    server, repo, _ = served
    base = load_checkpoint(checkpoint_dir)
    torch.manual_seed(0)
    for name, param in base.model.personalizer.llm.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 1.0)
    tuned = save_checkpoint(base.model, base.tokenizer, tmp_path / "tuned")
    export_peft(tuned, tmp_path / "peft")
    adapter = tmp_path / "peft" / "adapter"

    def peft_folder(name, **lora):
        llm = LlamaForCausalLM.from_pretrained(tmp_path / "peft" / "base")
        get_peft_model(llm, LoraConfig(**lora)).save_pretrained(tmp_path / name)
        return tmp_path / name

    refusals = [
        (tuned, adapter, ExportError, "is not the checkpoint of version 1"),
        (
            checkpoint_dir,
            peft_folder("r2", r=2, target_modules=["q_proj", "v_proj"]),
            ExportError,
            "rank 2",
        ),
        (
            checkpoint_dir,
            peft_folder("qk", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
            InteropError,
            "target_modules",
        ),
    ]
    for checkpoint, bad, error, message in refusals:
        with pytest.raises(error, match=message):
            publish_lora(checkpoint, bad, repo, 3, base_version=1)
        assert not list((repo / "cpu").glob("*/3"))  # nothing published

    publish_lora(checkpoint_dir, adapter, repo, 3, base_version=1)
    for model in ("history_encoder", "mask_generator", "condition_adapter", "unet", "vae_decoder"):
        old, new = (repo / "cpu" / model / v / "model.onnx" for v in ("1", "3"))
        assert old.read_bytes() == new.read_bytes(), model
    personalizer = [(repo / "cpu" / "personalizer" / v / "model.onnx") for v in ("1", "3")]
    assert personalizer[0].read_bytes() != personalizer[1].read_bytes()

    results, errors = deploy_under_load(server, repo, 3)
    assert results and not errors
    image, _ = served_image(server)
    expected = in_process(checkpoint_dir, repo, 3)  # the same configs; version 3's files
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(expected.astype(int) - in_process(checkpoint_dir, repo, 1).astype(int)).max() > 2
    assert rollback(server.http_url, repo / "cpu") == 1
    image, _ = served_image(server)
    assert np.abs(image.astype(int) - in_process(checkpoint_dir, repo, 1).astype(int)).max() <= 2


def test_prometheus_metrics_are_exposed(served):
    server, _, _ = served
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    assert 'nv_inference_request_success{model="pigeon"' in text


# --- generated configs ------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_committed_configs_are_the_generated_ones(target):
    generated = repository_configs(preset("tiny"), ServingConfig(), target)
    committed = {
        p.parent.name: p.read_text()
        for p in (REPO_ROOT / "triton_models" / target).glob("*/config.pbtxt")
    }
    assert committed == generated, "run `pigeon triton-configs` and commit triton_models/"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_configs_parse_and_the_ensemble_is_wired(target):
    configs = {
        name: text_format.Parse(text, model_config_pb2.ModelConfig())
        for name, text in repository_configs(preset("tiny"), ServingConfig(), target).items()
    }
    inputs, outputs = request_interface(preset("tiny"))
    available = {i.name for i in inputs}
    for model, ins, outs in ENSEMBLE_STEPS:  # in order: each input produced upstream, no cycle
        declared_in = {i.name for i in configs[model].input}
        declared_out = {o.name for o in configs[model].output}
        assert set(ins) <= declared_in and set(outs) <= declared_out, model
        missing = [v for v in ins.values() if v not in available]
        assert not missing, f"{model} reads {missing} before anything produces them"
        available |= set(outs.values())
    assert {o.name for o in outputs} <= available
    if target == "gpu":
        assert all(
            configs[n].platform == "tensorrt_plan"
            for n in ("history_encoder", "personalizer", "unet", "vae_decoder")
        )


def test_gpu_and_cpu_targets_share_names():
    cpu, gpu = (repository_configs(preset("tiny"), ServingConfig(), t) for t in ("cpu", "gpu"))
    assert set(cpu) == set(gpu)
    for name in cpu:
        a = text_format.Parse(cpu[name], model_config_pb2.ModelConfig())
        b = text_format.Parse(gpu[name], model_config_pb2.ModelConfig())
        assert [(i.name, list(i.dims)) for i in a.input] == [
            (i.name, list(i.dims)) for i in b.input
        ]
        assert [o.name for o in a.output] == [o.name for o in b.output]


def test_serving_config_is_strict():
    from pigeon.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="unknown key 'max_batch'"):
        from_dict(ServingConfig, {"max_batch": 4})
    with pytest.raises(ConfigError, match="serving.instances=0 must be >= 1"):
        ServingConfig(instances=0)
    text = repository_configs(
        preset("tiny"), ServingConfig(unet_dynamic_batching=False, unet_instances=2), "cpu"
    )["unet"]
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert not config.HasField("dynamic_batching") and config.instance_group[0].count == 2


def test_each_network_config_carries_its_own_thread_count_and_no_table():
    """A network's model runs one session: its config holds that session's resolved thread count
    (the personalizer its own, the rest ort_threads) and no per-component table, which only the
    loop models that run several sessions carry."""
    from pigeon.specs import component_specs

    serving = ServingConfig(ort_threads=2, ort_personalizer_threads=1)
    configs = repository_configs(preset("tiny"), serving, "cpu")

    def parameters(name: str) -> dict[str, str]:
        config = text_format.Parse(configs[name], model_config_pb2.ModelConfig())
        return {k: v.string_value for k, v in config.parameters.items()}

    for name in component_specs(preset("tiny")):
        assert parameters(name)["ort_threads"] == ("1" if name == "personalizer" else "2"), name
        assert "ort_component_threads" not in parameters(name), name
    assert parameters("personalize")["ort_component_threads"] == "personalizer=1"


def test_loop_models_queue_requests_with_a_bound_and_keep_the_full_shapes():
    """personalize and denoise: max_batch_size 1 with the queue policy of the serving config, and
    every tensor's shape with its batch dimension is the full shape the ensemble passes
    (`python_model_io`), a batched scalar's dims [1] reshaped to []."""
    from pigeon.config import ConfigError
    from pigeon.serving.triton_config import LOOP_MODELS, python_model_io

    serving = ServingConfig(request_queue_size=5, request_queue_timeout_ms=250, bls_instances=3)
    configs = repository_configs(preset("tiny"), serving, "cpu")
    full = python_model_io(preset("tiny"))
    # denoise has room for all that personalize holds (3 running, 5 waiting): only the entry refuses
    bounds = {"personalize": 5, "denoise": 5 + 3}
    for name in LOOP_MODELS:
        config = text_format.Parse(configs[name], model_config_pb2.ModelConfig())
        policy = config.dynamic_batching.default_queue_policy
        assert config.max_batch_size == 1
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (
            bounds[name],
            250_000,
        )
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        ins, outs = full[name]
        pairs = [*zip(config.input, ins, strict=True), *zip(config.output, outs, strict=True)]
        for declared, tensor in pairs:
            assert declared.name == tensor.name
            shape = list(declared.reshape.shape) if declared.HasField("reshape") else declared.dims
            assert [1, *shape] == list(tensor.dims), name
    with pytest.raises(ConfigError, match="request_queue_size=-1 must be >= 0"):
        ServingConfig(request_queue_size=-1)


def test_pigeon_serve_prints_endpoints_and_stops_on_sigterm(served):
    import signal
    import subprocess
    import sys

    from pigeon.serving.server import free_port

    _, repo, _ = served
    ports = [str(free_port()) for _ in range(3)]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pigeon.cli",
            "serve",
            "--repository",
            str(repo),
            "--target",
            "cpu",
            "--http-port",
            ports[0],
            "--grpc-port",
            ports[1],
            "--metrics-port",
            ports[2],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        endpoints = json.loads(process.stdout.readline())
        assert endpoints["http"] == f"127.0.0.1:{ports[0]}"
        with urllib.request.urlopen(f"http://{endpoints['http']}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        # announced after its warm-up: exactly one request has gone through the ensemble
        url = f"http://{endpoints['http']}/v2/models/pigeon/stats"
        with urllib.request.urlopen(url, timeout=5) as r:
            stats = json.loads(r.read())["model_stats"][0]
        assert endpoints["warm_up_s"] > 0 and int(stats["inference_count"]) == 1, stats
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0
    assert json.loads(out)["stopped"] is True


def test_client_timeout_is_enforced(served):
    server, _, _ = served
    with PigeonClient(server.grpc_url, "grpc", timeout_s=0.001) as client:
        with pytest.raises(ClientError, match="(?i)deadline"):
            client.generate(HISTORY, REFERENCE, "too slow", steps=50)
    # the server keeps serving (asked over HTTP: a new gRPC channel right after a cancelled call
    # can meet "Stream removed", a client-side transport effect, not the server's)
    with PigeonClient(server.http_url, "http") as client:
        assert client.generate(HISTORY, REFERENCE, "fine", steps=2).image_png[:4] == b"\x89PNG"


def test_an_altered_model_file_is_refused_at_load(served, tmp_path):
    import shutil as sh

    from pigeon.serving.server import ServerError

    _, repo, _ = served
    copy = tmp_path / "repo"
    sh.copytree(  # version 1 alone (other tests publish more versions into the shared repository)
        repo / "cpu",
        copy,
        ignore=lambda _, names: [n for n in names if (n.isdigit() and n != "1") or n[0] == "."],
    )
    target = copy / "vae_decoder" / "1" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    server = TritonServer(copy, log_file=tmp_path / "log.txt")
    with pytest.raises(ServerError, match="failed to load"):
        server.start()
    assert (
        "vae_decoder/1/model.onnx: SHA-256 differs from the manifest"
        in (tmp_path / "log.txt").read_text()
    )


def test_client_errors_keep_the_status_under_both_protocols():
    """tritonclient reports gRPC status names and HTTP codes; ClientError gives both, one mapping."""
    from tritonclient.utils import InferenceServerException

    from pigeon.serving.client import HTTP_STATUS, status_of

    for name, code in HTTP_STATUS.items():
        assert status_of(InferenceServerException("x", status=f"StatusCode.{name}")) == name
        assert status_of(InferenceServerException("x", status=str(code))) == name
        error = ClientError("x", name)
        assert (error.status, error.http_status) == (name, code)
    assert status_of(InferenceServerException("x", status="502")) == "INTERNAL"
    assert status_of(InferenceServerException("x", status="418")) == "INVALID_ARGUMENT"
    assert status_of(InferenceServerException("x")) is None
    assert ClientError("before sending").status is None


def test_user_data_trains_exports_serves_and_a_retrained_version_rolls_out(tmp_path):
    """The path of a team with its own data: a user-data folder -> every training stage -> export ->
    the real tritonserver -> generate; then retrain (stage 1 again), export version 2, deploy it
    without a restart and roll back. Each served image is the in-process ONNX pipeline's."""
    from pigeon.data.user_data import write_procedural_user_data
    from pigeon.training.loop import train_all, train_stage

    data = tmp_path / "data"
    write_procedural_user_data(data, users=8, sequence_length=8, size=32, seed=2)
    train_all(tmp_path / "run", preset_name="tiny", data_source=str(data), progress=False)
    first = tmp_path / "run" / "dpo" / "best"
    train_stage(
        "sft",
        tmp_path / "again",
        preset_name="tiny",
        data_source=str(data),
        init=str(first),
        overrides=["train.steps=4", "train.lr=0.05"],
        progress=False,
    )
    second = tmp_path / "again" / "sft" / "best"
    repo = tmp_path / "repo"
    export_all(first, repo, 1)
    export_all(second, repo, 2)

    def matches(server, checkpoint, version):
        image, _ = served_image(server)
        return np.abs(image.astype(int) - in_process(checkpoint, repo, version).astype(int)).max()

    with TritonServer(repo / "cpu") as server:
        deploy(server.http_url, repo / "cpu", 1)
        assert matches(server, first, 1) <= 2
        deploy(server.http_url, repo / "cpu", 2)
        assert matches(server, second, 2) <= 2
        assert rollback(server.http_url, repo / "cpu") == 1
        assert matches(server, first, 1) <= 2
