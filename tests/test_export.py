"""ONNX export on the tiny preset: declared interfaces, numeric validation, the ORT pipeline, publishing."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pigeon.checkpoint import load_checkpoint
from pigeon.export import tensorrt as trt_export
from pigeon.export.artifacts import export_onnx
from pigeon.export.errors import (
    ExportError,
    IONameError,
    ManifestError,
    NonFiniteError,
    ShapeError,
    ToleranceError,
)
from pigeon.export.manifest import read_manifest
from pigeon.export.onnx_export import dynamic_shapes
from pigeon.export.publish import export_all
from pigeon.export.validate import check_graph_io, compare
from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
from pigeon.inference.runners import OrtRunner, TorchRunner
from pigeon.specs import IDS, component_specs

from .conftest import emoji_like


@pytest.fixture(scope="module")
def artifacts(checkpoint_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "fp32"
    export_onnx(checkpoint_dir, out)
    return out


@pytest.mark.integration
def test_manifest_records_every_component_with_measured_errors(artifacts, checkpoint_dir):
    manifest = read_manifest(artifacts)
    ckpt = load_checkpoint(checkpoint_dir)
    assert manifest["checkpoint_sha256"] == ckpt.digest and manifest["precision"] == "fp32"
    assert set(manifest["tools"]) >= {"torch", "onnx", "onnxruntime"}
    assert list(manifest["components"]) == list(component_specs(ckpt.config))
    for name, entry in manifest["components"].items():
        assert set(entry["max_error"]) == {"min", "opt", "max", "odd"}, name
        assert entry["files"] and entry["opset"] == 18


def test_graphs_carry_the_declared_names_and_dimensions(artifacts, tiny_config):
    for name, spec in component_specs(tiny_config).items():
        model = onnx.load(str(artifacts / name / "model.onnx"))
        check_graph_io(spec, model)  # raises on any difference
        dims = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)
        }
        for t in spec.inputs + spec.outputs:
            assert dims[t.name] == list(t.shape), f"{name}.{t.name}"


def test_onnxruntime_pipeline_gives_the_pytorch_image(artifacts, checkpoint_dir):
    ckpt = load_checkpoint(checkpoint_dir)
    request = GenerationRequest(
        history=[emoji_like(i) for i in range(4)],
        reference=emoji_like(9),
        text="a red circle",
        seed=4,
        steps=6,
    )
    torch_image = PigeonPipeline(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model))(request)[0]
    ort = OrtRunner.from_artifacts(artifacts, ckpt.config)
    ort_image = PigeonPipeline(ckpt.config, ckpt.tokenizer, ort)(request)[0]
    np.testing.assert_array_equal(torch_image.tokens, ort_image.tokens)
    assert np.abs(torch_image.image.astype(int) - ort_image.image.astype(int)).max() <= 2


@pytest.mark.integration
def test_a_reference_input_unet_exports_and_serves_the_pytorch_image(
    tiny_config, tokenizer, tmp_path
):
    """unet.reference_input: the UNet's extra input is declared, exported and fed by the pipeline."""
    from pigeon.checkpoint import save_checkpoint

    from .conftest import make_model

    model = make_model(tiny_config)
    model.enable_reference_input()
    with torch.no_grad():  # as if trained: the reference's channels matter
        model.unet.conv_in.weight[:, tiny_config.vae.latent_channels :].normal_(0, 0.2)
    ckpt_dir = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    export_onnx(ckpt_dir, tmp_path / "art")
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.config.unet.reference_input
    graph = onnx.load(str(tmp_path / "art" / "unet" / "model.onnx")).graph
    assert [i.name for i in graph.input][-1] == "reference_latents"
    request = GenerationRequest(
        history=[emoji_like(i) for i in range(3)], reference=emoji_like(9), text="a cat", seed=2
    )
    torch_pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model))
    ort = OrtRunner.from_artifacts(tmp_path / "art", ckpt.config)
    ort_image = PigeonPipeline(ckpt.config, ckpt.tokenizer, ort)(request)[0].image
    assert np.abs(torch_pipe(request)[0].image.astype(int) - ort_image.astype(int)).max() <= 2


def test_an_altered_artifact_is_refused(artifacts, tmp_path, tiny_config):
    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy)
    path = copy / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"unet/model.onnx: SHA-256 differs"):
        OrtRunner.from_artifacts(copy, tiny_config)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        read_manifest(copy)


def perturb_unet(model):
    with torch.no_grad():
        model.unet.conv_out.weight.add_(0.05)


@pytest.mark.integration
def test_a_broken_export_is_rejected_and_nothing_is_written(checkpoint_dir, tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(ToleranceError, match=r"unet\.noise_pred at min .*max abs error"):
        export_onnx(checkpoint_dir, out, components=["unet"], model_hook=perturb_unet)
    assert list(tmp_path.iterdir()) == []  # no artifacts, no staging folder


def test_validation_errors_are_typed(tiny_config, artifacts):
    spec = component_specs(tiny_config)["vae_decoder"]
    model = onnx.load(str(artifacts / "vae_decoder" / "model.onnx"))
    model.graph.output[0].name = "pixels"
    with pytest.raises(
        IONameError,
        match=r"vae_decoder: graph outputs are \['pixels'\], "
        r"declared \['images'\]",
    ):
        check_graph_io(spec, model)
    model = onnx.load(str(artifacts / "vae_decoder" / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    with pytest.raises(ShapeError, match=r"vae_decoder.latents: dimensions \['n', 4, 16, 16\]"):
        check_graph_io(spec, model)
    values = spec.point("min")
    good = {"images": np.zeros((1, 3, 32, 32), np.float32)}
    with pytest.raises(NonFiniteError, match="1 NaN/Inf values"):
        bad = good["images"].copy()
        bad[0, 0, 0, 0] = np.nan
        compare(spec, spec.tolerance["fp32"], "min", values, good, {"images": bad})
    with pytest.raises(ShapeError, match=r"shape \(1, 3, 16, 16\), declared \(1, 3, 32, 32\)"):
        compare(
            spec,
            spec.tolerance["fp32"],
            "min",
            values,
            good,
            {"images": np.zeros((1, 3, 16, 16), np.float32)},
        )
    ids_spec = component_specs(tiny_config)["history_encoder"]
    ids = np.zeros((1, 16), np.int64)
    flipped = ids.copy()
    flipped[0, :2] = 1  # 12.5% of ids differ, more than the allowed share
    with pytest.raises(ToleranceError, match="12.50% of values differ"):
        compare(
            ids_spec,
            IDS,
            "min",
            ids_spec.point("min"),
            {"token_ids": ids, "token_keep": ids},
            {"token_ids": flipped, "token_keep": ids},
        )


@pytest.mark.integration
def test_fused_attention_export_uses_the_onnx_attention_op(checkpoint_dir, tmp_path):
    manifest = export_onnx(
        checkpoint_dir,
        tmp_path / "fused",
        fused_attention=True,
        components=["condition_adapter", "unet"],
    )
    for name in ("condition_adapter", "unet"):
        graph = onnx.load(str(tmp_path / "fused" / name / "model.onnx")).graph
        assert any(n.op_type == "Attention" for n in graph.node), name
        assert manifest["components"][name]["opset"] == 23


def test_serving_thread_counts_reach_each_components_session(artifacts, tiny_config):
    """ServingConfig.ort_personalizer_threads gives the personalizer's session its own intra-op
    count, in process and through a Triton model's parameters; every other session keeps
    ort_threads, and 0 (a serving.json from before the field) keeps ort_threads everywhere."""
    from pigeon.config import ServingConfig
    from pigeon.inference.runners import OrtOptions

    def threads(serving: ServingConfig, via_parameters: bool = False) -> dict[str, int]:
        options = OrtOptions.from_serving(serving)
        if via_parameters:
            options = OrtOptions.from_parameters(
                {k: {"string_value": v} for k, v in options.to_parameters().items()}
            )
        runner = OrtRunner.from_artifacts(artifacts, tiny_config, options)
        return {
            name: session.get_session_options().intra_op_num_threads
            for name, session in runner.sessions.items()
        }

    default = threads(ServingConfig(ort_threads=2))
    assert default.pop("personalizer") == 1 and set(default.values()) == {2}
    assert threads(ServingConfig(ort_threads=2), via_parameters=True)["personalizer"] == 1
    assert set(threads(ServingConfig(ort_threads=2, ort_personalizer_threads=0)).values()) == {2}


@pytest.mark.integration
def test_fp16_export_keeps_fp32_io_and_validates(checkpoint_dir, tmp_path, tiny_config):
    export_onnx(
        checkpoint_dir,
        tmp_path / "h",
        precision="fp16",
        components=["condition_adapter", "vae_decoder"],
    )
    model = onnx.load(str(tmp_path / "h" / "vae_decoder" / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    check_graph_io(component_specs(tiny_config)["vae_decoder"], model)  # inputs/outputs still f32


@pytest.mark.integration
def test_export_all_publishes_versions_atomically(checkpoint_dir, tmp_path):
    repo = tmp_path / "repo"
    parts = ["condition_adapter", "vae_decoder"]
    export_all(checkpoint_dir, repo, 1, components=parts)
    root = repo / "cpu"
    published = sorted(p.parent.name for p in root.glob("*/1"))
    assert published == sorted(
        ["pigeon", "preprocess", "personalize", "denoise", "postprocess", *parts]
    )
    v1 = {p: (root / p / "1" / "model.onnx").read_bytes() for p in parts}
    assert json.loads((root / "vae_decoder" / "1" / "manifest.json").read_text())["components"]
    assert (root / "personalize" / "1" / "pipeline" / "pipeline.json").exists()
    with pytest.raises(ExportError, match="version 1 already exists"):
        export_all(checkpoint_dir, repo, 1, components=parts)
    with pytest.raises(ToleranceError):  # a failed validation publishes nothing
        export_all(checkpoint_dir, repo, 2, components=["unet"], model_hook=perturb_unet)
    assert not list(root.glob("*/2")) and not list(root.glob(".*"))
    assert all((root / p / "1" / "model.onnx").read_bytes() == v1[p] for p in parts)


def test_each_wrappers_forward_takes_the_spec_inputs_in_order(tiny_config):
    """The runners feed inputs by position: a wrapper whose parameters were swapped against the spec
    (two same-shaped inputs of the mask generator, say) would pass every shape check."""
    import inspect

    from pigeon.models.export_wrappers import WRAPPERS

    with_reference = dataclasses.replace(
        tiny_config, unet=dataclasses.replace(tiny_config.unet, reference_input=True)
    )
    for config in (tiny_config, with_reference):
        specs = component_specs(config)
        assert set(WRAPPERS) == set(specs)
        for name, wrapper in WRAPPERS.items():
            params = list(inspect.signature(wrapper.forward).parameters.values())[1:]  # no self
            named = [p for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            inputs = [t.name for t in specs[name].inputs]
            assert [p.name for p in named[: len(inputs)]] == inputs[: len(named)], name
            # parameters the spec leaves out are optional ones at the end (the reference latents)
            assert all(p.default is None for p in named[len(inputs) :]), name
            if len(named) < len(inputs):  # the personalizer's KV cache: past_key_0, ...
                assert params[-1].kind is inspect.Parameter.VAR_POSITIONAL, name
                assert all(n.startswith("past_") for n in inputs[len(named) :]), name
    assert "reference_latents" in [t.name for t in component_specs(with_reference)["unet"].inputs]


def test_personalizer_dynamic_shapes_follow_the_varargs_structure(tiny_config):
    shapes = dynamic_shapes(component_specs(tiny_config)["personalizer"])
    assert len(shapes) == 6 and len(shapes[5]) == 2 * tiny_config.personalizer.num_layers


def test_cli_generate_on_onnxruntime_and_a_mismatched_checkpoint(
    artifacts, checkpoint_dir, tmp_path, capsys
):
    from PIL import Image

    from pigeon.checkpoint import save_checkpoint
    from pigeon.cli import main

    from .conftest import make_model

    png = tmp_path / "a.png"
    Image.fromarray(emoji_like(0)).save(png)
    args = [
        "generate",
        "--backend",
        "onnxruntime",
        "--artifacts",
        str(artifacts),
        "--history",
        str(png),
        "--reference",
        str(png),
        "--text",
        "x",
        "--steps",
        "2",
    ]
    assert main([*args, "--checkpoint", str(checkpoint_dir), "--out", str(tmp_path / "o.png")]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnxruntime"
    other = save_checkpoint(
        make_model(load_checkpoint(checkpoint_dir).config, seed=5),
        load_checkpoint(checkpoint_dir).tokenizer,
        tmp_path / "other",
    )
    assert main([*args, "--checkpoint", str(other), "--out", str(tmp_path / "p.png")]) == 2
    assert "was exported from another checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


# --- TensorRT: the logic that needs no TensorRT -------------------------------------------------


def test_trt_profiles_come_from_the_declared_ranges(tiny_config):
    spec = component_specs(tiny_config)["personalizer"]
    profile = trt_export.trt_profile(spec)
    assert list(profile) == spec.input_names
    lo, opt, hi = profile["attention_mask"]
    assert lo == (1, 1) and hi == (16, 512)  # past_len + seq at min and max
    assert profile["past_key_0"][0] == (1, 4, 0, 8)


def test_engine_key_changes_with_everything_an_engine_depends_on(tiny_config):
    profile = trt_export.trt_profile(component_specs(tiny_config)["unet"])
    base = dict(
        onnx_sha256="a" * 64,
        precision="fp16",
        profile=profile,
        trt_version="10.9.0",
        compute_capability=(9, 0),
    )
    key = trt_export.engine_key(**base)
    assert key == trt_export.engine_key(**base)
    wider = {**profile, "latents": (profile["latents"][0], profile["latents"][1], (64, 4, 16, 16))}
    for change in (
        {"onnx_sha256": "b" * 64},
        {"precision": "fp32"},
        {"profile": wider},
        {"trt_version": "10.10.0"},
        {"compute_capability": (8, 9)},
        {"refittable": True},
    ):
        assert trt_export.engine_key(**{**base, **change}) != key, change


def test_a_lora_versions_refit_plan_is_exactly_its_lora_weights(checkpoint_dir, tmp_path):
    """The refit plan from the base personalizer's ONNX file to one whose LoRA changed lists exactly
    the LoRA's tensors (their values, as the exporter lays them out: A and B, transposed or not),
    and nothing else; a LoRA of another rank, or an identical file, is refused by name."""
    from pigeon.checkpoint import save_checkpoint
    from pigeon.export.refit import refit_key, refit_plan

    base = load_checkpoint(checkpoint_dir)

    def with_new_lora(seed: int, name: str) -> tuple[Path, dict]:
        """The tiny checkpoint with LoRA weights drawn from `seed`, its personalizer exported."""
        torch.manual_seed(seed)
        lora = {}
        for key, param in base.model.personalizer.llm.named_parameters():
            if "lora_" in key:
                param.data.normal_(0, 0.5)
                lora[key] = param.detach().numpy().copy()
        tuned = save_checkpoint(base.model, base.tokenizer, tmp_path / name)
        export_onnx(tuned, tmp_path / f"art-{name}", components=["personalizer"])
        return tmp_path / f"art-{name}" / "personalizer" / "model.onnx", lora

    # the served base has a trained LoRA: an untrained one (B = 0) the exporter may fold away
    base_onnx, _ = with_new_lora(1, "base")
    new_onnx, lora = with_new_lora(2, "new")

    plan = refit_plan(base_onnx, new_onnx)
    assert len(plan) == len(lora) and plan.unchanged > 0
    expected = [v for v in lora.values()]
    for name, value in plan.weights.items():
        matches = [
            e
            for e in expected
            if (e.shape == value.shape and np.allclose(e, value))
            or (e.T.shape == value.shape and np.allclose(e.T, value))
        ]
        assert matches, f"{name}: not one of the LoRA's tensors"
    with pytest.raises(ExportError, match="nothing to refit"):
        refit_plan(base_onnx, base_onnx)
    key = refit_key("e" * 64, "a" * 64)
    assert key != refit_key("e" * 64, "b" * 64) and key != refit_key("f" * 64, "a" * 64)

    wider = dataclasses.replace(
        base.config,
        personalizer=dataclasses.replace(
            base.config.personalizer, lora_rank=2 * base.config.personalizer.lora_rank
        ),
    )
    from pigeon.models.pigeon import PigeonModel

    other = save_checkpoint(PigeonModel(wider), base.tokenizer, tmp_path / "rank")
    export_onnx(other, tmp_path / "art-rank", components=["personalizer"])
    with pytest.raises(ExportError, match="a refit keeps every weight's shape|not the graph of"):
        refit_plan(base_onnx, tmp_path / "art-rank" / "personalizer" / "model.onnx")


def test_tensorrt_export_explains_when_tensorrt_is_missing(artifacts):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ExportError, match="TensorRT is not installed here"):
            trt_export.export_tensorrt(artifacts)
    else:  # pragma: no cover - on a TensorRT machine the GPU test below runs instead
        pytest.skip("TensorRT is installed; see test_tensorrt_engines_match_onnxruntime")


@pytest.mark.trt
def test_tensorrt_engines_match_onnxruntime(artifacts):  # pragma: no cover - GPU + TensorRT only
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on the CPU machines")
    records = trt_export.export_tensorrt(artifacts, precision="fp16")
    assert set(records) == set(read_manifest(artifacts)["components"])
    again = trt_export.export_tensorrt(artifacts, precision="fp16")  # every engine from the cache
    assert all(again[n]["key"] == records[n]["key"] for n in records)
