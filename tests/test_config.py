import json

import pytest

from pigeon import config as cfg


@pytest.mark.parametrize("name", sorted(cfg.PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    config = cfg.preset(name)
    path = tmp_path / "c.json"
    cfg.save_json(config, path)
    data = json.loads(path.read_text())
    assert data["_format"] == cfg.CONFIG_FORMAT and data["_class"] == "PipelineConfig"
    assert cfg.load_json(cfg.PipelineConfig, path) == config


def test_preset_sizes_grow():
    tiny, small, base = (cfg.preset(n) for n in ("tiny", "small", "base"))
    assert tiny.image_size < small.image_size == 64 < base.image_size
    assert tiny.history_encoder.num_patches == (32 // 8) ** 2
    assert small.personalizer.hidden_size < base.personalizer.hidden_size


def test_unknown_preset_names_the_choices():
    with pytest.raises(cfg.ConfigError, match=r"unknown preset 'huge'.*base.*small.*tiny"):
        cfg.preset("huge")


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    data = cfg.to_dict(cfg.UNetConfig())
    data["block_channels"] = [1]
    with pytest.raises(cfg.ConfigError, match="unknown key 'block_channels'"):
        cfg.from_dict(cfg.UNetConfig, data)


def test_missing_key_is_an_error_naming_the_key():
    data = cfg.to_dict(cfg.VAEConfig())
    del data["latent_channels"]
    with pytest.raises(cfg.ConfigError, match="missing key 'latent_channels'"):
        cfg.from_dict(cfg.VAEConfig, data)


def test_a_field_added_after_the_format_takes_its_default_when_absent():
    """Files written before `scheduler.strength` existed load with the behaviour they had (1.0)."""
    data = cfg.to_dict(cfg.preset("tiny"))
    del data["scheduler"]["strength"]
    assert cfg.from_dict(cfg.PipelineConfig, data).scheduler.strength == 1.0
    del data["scheduler"]["guidance_scale"]  # an original field stays required
    with pytest.raises(cfg.ConfigError, match="missing key 'guidance_scale'"):
        cfg.from_dict(cfg.PipelineConfig, data)
    with pytest.raises(cfg.ConfigError, match=r"scheduler.strength=0.0 must be in \(0, 1\]"):
        cfg.SchedulerConfig(strength=0.0)


def test_an_omitted_field_keeps_the_behaviour_its_file_was_written_with():
    """A checkpoint from before `unet.reference_input` has a UNet without it; a serving.json from
    before `unet_in_process` served the UNet over BLS, although both defaults differ now."""
    data = cfg.to_dict(cfg.preset("tiny"))
    del data["unet"]["reference_input"]
    assert cfg.from_dict(cfg.PipelineConfig, data).unet.reference_input is False
    serving = cfg.to_dict(cfg.ServingConfig())
    assert cfg.ServingConfig().unet_in_process is True
    del serving["unet_in_process"]
    assert cfg.from_dict(cfg.ServingConfig, serving).unet_in_process is False
    assert cfg.from_dict(cfg.ServingConfig, serving) == cfg.ServingConfig(unet_in_process=False)
    del serving["ort_personalizer_threads"]  # before it: the personalizer took ort_threads (0)
    assert cfg.from_dict(cfg.ServingConfig, serving).ort_personalizer_threads == 0


def test_nested_errors_name_the_path():
    data = cfg.to_dict(cfg.preset("tiny"))
    data["unet"]["layers_per_block"] = "two"
    with pytest.raises(cfg.ConfigError, match=r"unet\.layers_per_block='two' must be an integer"):
        cfg.from_dict(cfg.PipelineConfig, data)


def test_wrong_format_and_class_are_rejected():
    data = cfg.to_dict(cfg.VAEConfig())
    with pytest.raises(cfg.ConfigError, match="_format=99"):
        cfg.from_dict(cfg.VAEConfig, {**data, "_format": 99})
    with pytest.raises(cfg.ConfigError, match="_class is not UNetConfig"):
        cfg.from_dict(cfg.UNetConfig, cfg.to_dict(cfg.VAEConfig()))


def test_literal_fields_are_checked():
    data = cfg.to_dict(cfg.SchedulerConfig())
    data["sampler"] = "euler"
    with pytest.raises(
        cfg.ConfigError, match=r"sampler='euler' is not one of \['ddim', 'dpmpp_2m'\]"
    ):
        cfg.from_dict(cfg.SchedulerConfig, data)


def test_overrides_are_typed_and_strict():
    config = cfg.apply_overrides(
        cfg.preset("tiny"), ["personalizer.num_layers=3", "scheduler.sampler=dpmpp_2m"]
    )
    assert config.personalizer.num_layers == 3 and config.scheduler.sampler == "dpmpp_2m"
    with pytest.raises(cfg.ConfigError, match="unknown key 'num_layer'"):
        cfg.apply_overrides(config, ["personalizer.num_layer=3"])
    with pytest.raises(cfg.ConfigError, match="must be an integer"):
        cfg.apply_overrides(config, ["personalizer.num_layers=3.5"])


def test_cross_field_checks_name_the_values():
    with pytest.raises(cfg.ConfigError, match="image_size=33 is not a multiple of patch_size=8"):
        cfg.HistoryEncoderConfig(image_size=33)
    with pytest.raises(cfg.ConfigError, match="history_mask_ratio=1.5"):
        cfg.MaskGeneratorConfig(history_mask_ratio=1.5)
    with pytest.raises(cfg.ConfigError, match=r"unet.norm_num_groups=0 does not divide"):
        cfg.UNetConfig(norm_num_groups=0)
    with pytest.raises(cfg.ConfigError, match=r"vae.norm_num_groups=5 .* entries \[32, 64\]"):
        cfg.VAEConfig(norm_num_groups=5)
