"""int8 and mixed variants (pigeon.export.quantize) and the ONNX Runtime settings of the serving config,
on the tiny preset: every variant validates against PyTorch, a wrongly calibrated component is
rejected by validation, an int8 version serves in the cpu Triton target, and the session settings come
from the one ServingConfig in process and in the generated Triton configs."""

import dataclasses
import io
import json

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from pigeon.checkpoint import load_checkpoint
from pigeon.config import ConfigError, ServingConfig, from_dict, preset, to_dict
from pigeon.export.artifacts import export_onnx
from pigeon.export.errors import ExportError, ToleranceError
from pigeon.export.manifest import read_manifest
from pigeon.export.publish import export_all
from pigeon.export.quantize import (
    Calibration,
    HeldOutInputs,
    component_inputs,
    export_quantized,
    pipeline_images,
)
from pigeon.export.validate import validate
from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
from pigeon.inference.runners import OrtOptions, OrtRunner, TorchRunner
from pigeon.serving.triton_config import repository_configs
from pigeon.specs import INT8_IMAGE_MAE, component_specs, sample_inputs
from pigeon.training.data import load_data

from .conftest import emoji_like

# each exports and validates whole variants: make test-all
pytestmark = pytest.mark.integration

CAL = Calibration(users=4, held_out=2, batch=2)
STATIC = ("vae_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def int8(checkpoint_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    return export_onnx(checkpoint_dir, out, precision="int8", calibration=CAL), out


def held_out_inputs(ckpt, names):
    """The validation-split inputs quantize validates static components on, rebuilt here."""
    data = load_data("procedural", ckpt.config.image_size)
    users = data.validation_users(CAL.held_out, min(5, ckpt.config.personalizer.max_history))
    calls = component_inputs(
        ckpt, TorchRunner(ckpt.model), users, list(names), CAL.batch, None, CAL.seed + 1
    )
    specs = component_specs(ckpt.config)
    return {n: HeldOutInputs(specs[n], calls[n]) for n in names}


def test_int8_variant_validates_against_pytorch_and_records_what_it_kept(checkpoint_dir, int8):
    manifest, out = int8
    ckpt = load_checkpoint(checkpoint_dir)
    assert manifest["precision"] == "int8" and manifest["checkpoint_sha256"] == ckpt.digest
    read_manifest(out)  # every file matches its SHA-256
    specs = component_specs(ckpt.config)
    kept = {n: e["precision"] for n, e in manifest["components"].items()}
    assert list(kept) == list(specs) and set(kept.values()) <= {"int8", "fp16", "fp32"}
    assert "int8" in kept.values()
    reference = TorchRunner(ckpt.model)
    held = held_out_inputs(ckpt, [n for n in STATIC if kept[n] == "int8"])
    for name, entry in manifest["components"].items():
        assert set(entry["max_error"]) == {"min", "opt", "max", "odd"}, name
        for attempt in entry["rejected"]:  # what was rejected, and why
            assert attempt["precision"] in ("int8", "fp16") and name in attempt["error"], attempt
        if entry["precision"] != "int8":
            assert entry["rejected"], f"{name} kept {entry['precision']} without a rejected int8"
            continue
        assert entry["bytes"] < entry["fp32_bytes"], name
        want = "static" if name in STATIC else "dynamic"  # convolutions hold most weights, or not
        assert entry["quantization"]["method"] == want, name
        assert set(entry["relative_error"]) == {"min", "opt", "max", "odd"}
        # the kept file passes the same validation again, here, against PyTorch
        runner = OrtRunner.from_files({name: out / entry["file"]}, ckpt.config)
        again = validate(
            specs[name],
            ckpt.config,
            "int8",
            lambda f, n=name: reference.run(n, f),
            lambda f, n=name, r=runner: r.run(n, f),
            inputs=held.get(name),
        )
        for point, outputs in again.items():  # the same errors (inputs rebuilt on PyTorch)
            for output, error in outputs.items():
                recorded = entry["max_error"][point][output]
                assert abs(error - recorded) <= 0.1 * recorded + 1e-5, (name, point, output)


def test_int8_images_stay_within_the_declared_distance_of_fp32(checkpoint_dir, int8, tmp_path):
    manifest, out = int8
    ckpt = load_checkpoint(checkpoint_dir)
    check = manifest["quantization"]["pipeline_check"]
    assert check["limit_mean_abs_pixel"] == INT8_IMAGE_MAE and check["users"] == CAL.held_out
    for name in check["rejected"]:
        assert manifest["components"][name]["precision"] != "int8", name
    export_onnx(checkpoint_dir, tmp_path / "fp32")
    users = load_data("procedural", ckpt.config.image_size).validation_users(
        CAL.held_out, min(5, ckpt.config.personalizer.max_history)
    )
    files = {n: e["file"] for n, e in manifest["components"].items()}
    want = pipeline_images(ckpt, {n: tmp_path / "fp32" / f for n, f in files.items()}, users, None)
    got = pipeline_images(ckpt, {n: out / f for n, f in files.items()}, users, None)
    mae = float(np.abs(got.astype(float) - want.astype(float)).mean())
    assert mae <= INT8_IMAGE_MAE
    assert mae == pytest.approx(check["variant_mean_abs_pixel"], abs=1e-3)


def test_a_wrongly_calibrated_component_is_rejected_by_validation(checkpoint_dir, tmp_path):
    def off_by_100(
        component, calls
    ):  # ranges 100x too wide: every activation rounds to a few steps
        return [{k: v * 100 if v.dtype == np.float32 else v for k, v in c.items()} for c in calls]

    with pytest.raises(ToleranceError, match=r"^unet\.noise_pred at \w+ \{'batch': \d+\}: "):
        export_quantized(
            checkpoint_dir,
            tmp_path / "strict",
            precision="int8",
            components=["unet"],
            calibration=CAL,
            strict=True,
            calibration_hook=off_by_100,
        )
    assert not (tmp_path / "strict").exists()
    manifest = export_quantized(
        checkpoint_dir,
        tmp_path / "fallback",
        precision="int8",
        components=["unet"],
        calibration=CAL,
        calibration_hook=off_by_100,
    )
    entry = manifest["components"]["unet"]
    assert entry["precision"] in ("fp16", "fp32")
    assert entry["rejected"][0]["precision"] == "int8"
    assert entry["rejected"][0]["error"].startswith("ToleranceError: unet.noise_pred at ")


def test_mixed_keeps_the_fastest_valid_candidate(checkpoint_dir, tmp_path):
    parts = ["condition_adapter", "vae_decoder"]
    manifest = export_onnx(
        checkpoint_dir, tmp_path / "mixed", precision="mixed", components=parts, calibration=CAL
    )
    for name in parts:
        entry = manifest["components"][name]
        times = entry["candidates_ms"]
        assert "fp32" in times and entry["precision"] in times
        rejected = {r["precision"] for r in entry["rejected"]}
        assert set(times) == {"fp32", "fp16", "int8"} - rejected
        fastest = min(t["p50_ms"] for t in times.values())
        assert times[entry["precision"]]["p50_ms"] <= fastest * 1.10 + 1e-9


def test_fp16_and_fp32_variants_still_validate(checkpoint_dir, tmp_path):
    for precision in ("fp32", "fp16"):
        manifest = export_onnx(
            checkpoint_dir, tmp_path / precision, precision=precision, components=["vae_decoder"]
        )
        assert manifest["precision"] == precision
        assert set(manifest["components"]["vae_decoder"]["max_error"]) == {
            "min",
            "opt",
            "max",
            "odd",
        }


def test_fp16_personalizer_keeps_its_rotary_angles_in_fp32(checkpoint_dir, tmp_path):
    import onnx

    from pigeon.export.onnx_export import rotary_angle_nodes

    manifest = export_onnx(
        checkpoint_dir, tmp_path / "h", precision="fp16", components=["personalizer"]
    )  # validates at the max shape: positions up to past_len + seq
    graph = onnx.load(str(tmp_path / "h" / "personalizer" / "model.onnx")).graph
    kept = set(rotary_angle_nodes(graph))
    assert {n.op_type for n in graph.node if n.name in kept} >= {"Cos", "Sin"}
    fp32 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    inputs = {casts.get(i, i) for n in graph.node if n.name in kept for i in n.input}
    assert inputs & fp32, "inv_freq reaches the angles in fp32"
    worst = max(
        v for e in manifest["components"]["personalizer"]["max_error"].values() for v in e.values()
    )
    assert worst < 0.01


def test_a_candidate_onnx_runtime_cannot_load_is_rejected_by_name(checkpoint_dir, tmp_path):
    """A fallback file that ONNX Runtime refuses to load (the fp16 personalizer of a fused-attention
    export is one) is a rejected candidate, recorded with ONNX Runtime's reason, not a crash of
    the export; with strict=True it is the typed error."""
    from pigeon.export.quantize import _Attempts

    ckpt = load_checkpoint(checkpoint_dir)
    spec = component_specs(ckpt.config)["personalizer"]
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx model")
    tried = _Attempts(spec, ckpt, reference=None, inputs=None, strict=False)
    assert tried.attempt("fp16", broken) is False
    assert tried.valid == {}
    assert tried.rejected[0]["precision"] == "fp16"
    assert "ONNX Runtime cannot load the fp16 file" in tried.rejected[0]["error"]
    strict = _Attempts(spec, ckpt, reference=None, inputs=None, strict=True)
    with pytest.raises(ExportError, match="cannot load the fp16 file"):
        strict.attempt("fp16", broken)


def test_quantized_variants_are_refused_for_the_gpu_target(checkpoint_dir, tmp_path):
    with pytest.raises(ExportError, match="precision='int8' is a cpu-target variant"):
        export_all(checkpoint_dir, tmp_path / "repo", 1, target="gpu", precision="int8")
    with pytest.raises(ExportError, match=r"precision='int4' is not one of"):
        export_onnx(checkpoint_dir, tmp_path / "x", precision="int4")


# --- the int8 version in the cpu Triton target -------------------------------------------------


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.triton
def test_the_fast_variant_serves_its_fused_files_with_its_sampling_defaults(
    checkpoint_dir, tmp_path
):
    """`--variant fast` publishes mixed-precision files with fused attention (opset 23) whose
    manifest carries DDIM at 10 steps;
    a served request that names no sampler or steps matches the same files in process with those
    settings given explicitly, and not the checkpoint's own defaults (its own step count)."""
    from pigeon.core.images import load_image
    from pigeon.export.variants import VARIANTS, with_sampling_defaults
    from pigeon.serving.client import PigeonClient, deploy
    from pigeon.serving.server import TritonServer

    repo = tmp_path / "repo"
    manifest = export_all(checkpoint_dir, repo, 1, variant="fast", calibration=CAL)
    root = repo / "cpu"
    published = json.loads((root / "unet" / "1" / "manifest.json").read_text())
    fast = VARIANTS["fast"].sampling_defaults
    assert (published["precision"], published["variant"]) == ("mixed", "fast")
    assert {c["opset"] for c in manifest["components"].values()} == {23}
    assert published["sampling_defaults"] == fast == {"sampler": "ddim", "num_inference_steps": 10}
    history, reference = [png(emoji_like(i)) for i in range(3)], png(emoji_like(9))
    with TritonServer(root) as server:
        deploy(server.http_url, root, 1)
        with PigeonClient(server.grpc_url, "grpc", timeout_s=120) as client:
            result = client.generate(history, reference, "a red circle", seed=4)
    served = np.asarray(Image.open(io.BytesIO(result.image_png)).convert("RGB"))
    ckpt = load_checkpoint(checkpoint_dir)
    assert ckpt.config.scheduler.num_inference_steps != 10  # the variant's default is what differs
    runner = OrtRunner.from_files(
        {n: root / n / "1" / "model.onnx" for n in manifest["components"]}, ckpt.config
    )
    request = GenerationRequest(
        history=[load_image(h) for h in history],
        reference=load_image(reference),
        text="a red circle",
        seed=4,
    )
    explicit = dataclasses.replace(request, sampler="ddim", steps=10)
    expected = PigeonPipeline(ckpt.config, ckpt.tokenizer, runner)(explicit)[0].image
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 2
    config = with_sampling_defaults(ckpt.config, published)  # in process, from the manifest alone
    in_process = PigeonPipeline(config, ckpt.tokenizer, runner)(request)[0].image
    assert np.abs(in_process.astype(int) - expected.astype(int)).max() <= 2
    own_defaults = PigeonPipeline(ckpt.config, ckpt.tokenizer, runner)(request)[0].image
    assert np.abs(own_defaults.astype(int) - expected.astype(int)).max() > 2


def test_a_variant_refuses_a_precision_it_contradicts_and_an_unknown_name(tmp_path):
    from pigeon.export.variants import resolve, with_sampling_defaults

    assert resolve("default", None) == ("fp32", {})
    assert resolve("default", "fp16") == ("fp16", {})
    assert resolve("fast", "mixed")[0] == "mixed"
    with pytest.raises(ExportError, match=r"variant='fast' exports mixed files; precision='fp16'"):
        resolve("fast", "fp16")
    with pytest.raises(ExportError, match=r"variant='fastest' is not one of \['default', 'fast'\]"):
        export_onnx("no-such-checkpoint", tmp_path / "x", variant="fastest")
    with pytest.raises(ExportError, match=r"\['steps'\] are not scheduler fields"):
        with_sampling_defaults(preset("tiny"), {"sampling_defaults": {"steps": 10}})


# --- ONNX Runtime settings from the serving config ---------------------------------------------


def test_session_settings_come_from_the_serving_config_in_process_and_in_triton():
    serving = ServingConfig(
        ort_threads=3,
        ort_inter_op_threads=2,
        ort_graph_optimization="extended",
        ort_execution_mode="parallel",
        ort_io_binding=True,
    )
    options = OrtOptions.from_serving(serving)
    assert options.intra_op_threads == 3 and options.io_binding == ("unet",)
    so = options.session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (3, 2)
    assert str(so.graph_optimization_level).endswith("ORT_ENABLE_EXTENDED")
    assert str(so.execution_mode).endswith("ORT_PARALLEL")
    configs = repository_configs(preset("tiny"), serving, "cpu")
    for model in ("unet", "vae_decoder", "personalize"):
        parsed = text_format.Parse(configs[model], model_config_pb2.ModelConfig())
        params = {k: {"string_value": v.string_value} for k, v in parsed.parameters.items()}
        back = OrtOptions.from_parameters(params)
        assert back.session_options().inter_op_num_threads == 2, model
        assert (back.graph_optimization, back.execution_mode) == ("extended", "parallel")
        assert back.intra_op_threads == 3


def test_serving_files_written_before_the_ort_fields_still_load():
    data = to_dict(ServingConfig())
    for key in [k for k in data if k.startswith("ort_") and k != "ort_threads"]:
        del data[key]
    # every omitted field takes its default, but the personalizer's own thread count takes 0
    # (ort_threads, as such a file served before the field existed)
    assert from_dict(ServingConfig, data) == ServingConfig(ort_personalizer_threads=0)
    with pytest.raises(ConfigError, match="ort_execution_mode='fast' is not one of"):
        from_dict(ServingConfig, {**to_dict(ServingConfig()), "ort_execution_mode": "fast"})


def test_io_binding_and_session_reuse_give_the_same_results(int8, checkpoint_dir):
    _, out = int8
    ckpt = load_checkpoint(checkpoint_dir)
    plain = OrtRunner.from_artifacts(out, ckpt.config)
    bound = OrtRunner.from_artifacts(
        out, ckpt.config, OrtOptions(io_binding=("unet", "personalizer"), session_reuse=True)
    )
    again = OrtRunner.from_artifacts(out, ckpt.config, OrtOptions(session_reuse=True))
    assert again.sessions["unet"] is bound.sessions["unet"]  # one session per file and settings
    assert plain.sessions["unet"] is not bound.sessions["unet"]
    specs = component_specs(ckpt.config)
    for name in ("unet", "personalizer"):
        for point in ("min", "max", "opt"):
            feeds = sample_inputs(specs[name], ckpt.config, point)
            want, got = plain.run(name, feeds), bound.run(name, feeds)
            assert all(np.array_equal(want[k], got[k]) for k in want), (name, point)
    request = GenerationRequest(
        history=[emoji_like(i) for i in range(3)], reference=emoji_like(9), text="a cat", seed=2
    )
    images = [
        PigeonPipeline(ckpt.config, ckpt.tokenizer, r)(request)[0].image for r in (plain, bound)
    ]
    assert np.array_equal(images[0], images[1])


@pytest.mark.slow
def test_variants_benchmark_writes_the_trade_off_record(checkpoint_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = root / "demo" / "data" / "emojiprefs"
    args = [sys.executable, "-m", "benchmarks.variants", "--preset", "tiny"]
    args += ["--checkpoint", str(checkpoint_dir), "--workdir", str(tmp_path / "w")]
    args += ["--runs", "1", "--component-runs", "2", "--warmup", "1", "--calibration-users", "4"]
    args += ["--out", str(tmp_path / "v.jsonl"), "--users", "2"]
    args += ["--variants", "fp32", "int8", "fast", "--eager"]
    if data.is_dir():
        args += ["--data", str(data), "--split", "val"]
    res = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / "v.jsonl").read_text().splitlines()[-1])
    assert list(record["variants"]) == ["fp32", "int8", "fast", "eager"]
    assert record["sampling_defaults"] == {
        "fp32": {},
        "int8": {},
        "fast": {"sampler": "ddim", "num_inference_steps": 10},
    }
    eager = record["variants"].pop("eager")  # PyTorch: no files, memory probe or components
    assert eager["end_to_end_s"]["n"] == 1 and set(eager) == {"end_to_end_s", "stages_s", "quality"}
    specs = component_specs(preset("tiny"))
    for name, row in record["variants"].items():
        assert set(row["components_s"]) == set(specs), name
        assert row["end_to_end_s"]["n"] == 1 and row["memory"]["peak_mib"] > 0
        assert row["size"]["total_bytes"] == sum(
            c["bytes"] for c in row["size"]["components"].values()
        )
        if data.is_dir():
            assert 0 <= row["quality"]["StyleAcc"] <= 1 and 0 <= row["quality"]["ConceptR@5"] <= 1
    assert "| int8 |" in res.stdout and "| eager |" in res.stdout
    fast_row = next(line for line in res.stdout.splitlines() if line.startswith("| fast |"))
    assert "sampler=ddim num_inference_steps=10" in fast_row


def test_fp16_keeps_a_component_whose_argmax_flips_in_fp32_and_says_why(checkpoint_dir, tmp_path):
    """A codebook of near-identical codes: in fp16 the nearest code flips for most tokens."""
    import torch

    from pigeon.checkpoint import save_checkpoint

    ckpt = load_checkpoint(checkpoint_dir)
    codebook = ckpt.model.history_encoder.quantizer.codebook.weight
    with torch.no_grad():
        codebook.copy_(codebook[:1] + 1e-3 * torch.randn_like(codebook))
    clustered = save_checkpoint(ckpt.model, ckpt.tokenizer, tmp_path / "clustered")
    with pytest.raises(ToleranceError, match="history_encoder.token_ids"):
        export_onnx(
            clustered,
            tmp_path / "strict",
            precision="fp16",
            components=["history_encoder"],
            strict=True,
        )
    assert not (tmp_path / "strict").exists()
    manifest = export_onnx(
        clustered, tmp_path / "a", precision="fp16", components=["history_encoder", "unet"]
    )
    encoder, unet = manifest["components"]["history_encoder"], manifest["components"]["unet"]
    assert encoder["precision"] == "fp32"
    assert "history_encoder.token_ids" in encoder["kept_fp32_because"]
    assert "precision" not in unet  # the UNet has no discrete output: fp16 as asked
    import onnx

    weights = onnx.load(str(tmp_path / "a" / "history_encoder" / "model.onnx")).graph.initializer
    assert onnx.TensorProto.FLOAT16 not in {w.data_type for w in weights}
    # the kept file is the one the manifest hashes, and it reproduces PyTorch's codes exactly
    runner = OrtRunner.from_artifacts(tmp_path / "a", load_checkpoint(clustered).config)
    spec = component_specs(load_checkpoint(clustered).config)["history_encoder"]
    feeds = sample_inputs(spec, load_checkpoint(clustered).config, "opt")
    expected = TorchRunner(load_checkpoint(clustered).model).run("history_encoder", feeds)
    got = runner.run("history_encoder", feeds)
    assert np.array_equal(got["token_ids"], expected["token_ids"])
