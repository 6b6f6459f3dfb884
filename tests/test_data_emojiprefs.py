"""EmojiPrefs: codepoint joining, crop-and-centre, family splits, manifests and the user sampler on
small synthetic inputs (no network); one real build behind `-m slow`."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pigeon.data.emojiprefs import (
    DEFAULT_STYLES,
    PERMISSIVE_STYLES,
    PERSON_FAMILY,
    Concept,
    EmojiPrefs,
    EmojiPrefsError,
    EmojiUser,
    IconifySet,
    Source,
    assign_splits,
    codepoint_key,
    concepts_from_openmoji,
    crop_and_centre,
    family_of,
    fetch_package,
    index_by_codepoints,
    join_concepts,
    load_emojiprefs,
    load_manifest,
    make_manifest,
    on_white,
    read_tarball,
    resolve_styles,
    sample_training_user,
    split_families,
    unified,
    write_dataset,
)

STYLES = ["flat", "line", "glossy", "pixel"]


def synthetic_concepts(n_subgroups: int = 6, per_subgroup: int = 20) -> list[Concept]:
    """Concepts with gendered variants, so several concepts share a family."""
    out = []
    code = 0x1F300
    for g in range(n_subgroups):
        for k in range(per_subgroup):
            base = f"{code:X}"
            out.append(Concept(base, f"thing {code:X}", f"group{g % 2}", f"sub{g}", ["t"]))
            if k % 4 == 0:  # a "man <thing>" and "woman <thing>" in the same family
                out.append(
                    Concept(f"1F468-200D-{base}", f"man {code:X}", f"group{g % 2}", f"sub{g}")
                )
                out.append(
                    Concept(f"1F469-200D-{base}", f"woman {code:X}", f"group{g % 2}", f"sub{g}")
                )
            code += 1
    return out


def synthetic_dataset(seed: int = 0, size: int = 8) -> EmojiPrefs:
    concepts = assign_splits(synthetic_concepts(), seed)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (len(concepts), len(STYLES), size, size, 3), dtype=np.uint8)
    return EmojiPrefs(STYLES, concepts, rgb)


# --- codepoints --------------------------------------------------------------------------------


def test_codepoint_key_normalizes_case_zeros_and_variation_selectors():
    assert codepoint_key("1F600") == (0x1F600,)
    assert codepoint_key("0023-fe0f-20e3") == codepoint_key("23-20e3") == (0x23, 0x20E3)
    assert codepoint_key("261D-FE0F") == codepoint_key("261d") == (0x261D,)
    assert codepoint_key("1f468_200d_1f373") == (0x1F468, 0x200D, 0x1F373)
    assert unified((0x23, 0x20E3)) == "0023-20E3"
    assert unified(codepoint_key("1f9d1-200d-1f373")) == "1F9D1-200D-1F373"


@pytest.mark.parametrize("bad", ["", "zz12", "FE0F", "1F600-xyz", "110000"])
def test_codepoint_key_rejects_bad_values_naming_them(bad):
    with pytest.raises(ValueError, match="codepoint|variation"):
        codepoint_key(bad)


def test_family_merges_gendered_variants():
    cook = family_of(codepoint_key("1F9D1-200D-1F373"))
    assert cook == family_of(codepoint_key("1F468-200D-1F373")) == "1F373"
    assert family_of(codepoint_key("1F3C3-200D-2642-FE0F")) == "1F3C3"
    assert family_of(codepoint_key("1F469")) == family_of(codepoint_key("1F468")) == PERSON_FAMILY
    assert family_of(codepoint_key("1F600")) == "1F600"


def test_concepts_from_openmoji_keeps_base_unicode_emoji_only():
    entries = [
        {"hexcode": "1F600", "group": "smileys-emotion", "subgroups": "face-smiling",
         "annotation": "grinning face", "tags": "face, grin", "skintone": "", "order": 1},
        {"hexcode": "1F44D-1F3FB", "group": "people-body", "subgroups": "hand-fingers-closed",
         "annotation": "thumbs up: light skin tone", "tags": "", "skintone": 1, "order": 3},
        {"hexcode": "1F44D", "group": "people-body", "subgroups": "hand-fingers-closed",
         "annotation": "thumbs up", "tags": "", "skintone": "", "order": 2},
        {"hexcode": "1F1E9-1F1EA", "group": "flags", "subgroups": "country-flag",
         "annotation": "flag: Germany", "tags": "", "skintone": "", "order": 4},
        {"hexcode": "1F3FB", "group": "component", "subgroups": "skin-tone",
         "annotation": "light skin tone", "tags": "", "skintone": "", "order": 5},
        {"hexcode": "E000", "group": "extras-openmoji", "subgroups": "symbols",
         "annotation": "openmoji extra", "tags": "", "skintone": "", "order": 6},
        {"hexcode": "2764-FE0F", "group": "smileys-emotion", "subgroups": "heart",
         "annotation": "red heart", "tags": "love", "skintone": "", "order": 7},
    ]  # fmt: skip
    concepts = concepts_from_openmoji(entries)
    assert [c.unified for c in concepts] == ["1F600", "1F44D", "2764"]
    assert concepts[0].name == "grinning face" and concepts[0].tags == ["face", "grin"]
    assert concepts[2].subgroup == "heart"


def test_join_by_codepoints_across_naming_schemes():
    concepts = [Concept("1F600", "grinning face", "g", "s"), Concept("0023-20E3", "keycap #", "g", "s"),
                Concept("2764", "red heart", "g", "s"), Concept("1F355", "pizza", "g", "s")]  # fmt: skip
    sources = {
        # Iconify chars.json: lower case, no FE0F
        "a": index_by_codepoints(
            [
                ("1f600", "grinning-face"),
                ("23-20e3", "keycap-#"),
                ("2764", "red-heart"),
                ("1f355", "pizza"),
            ]
        ),  # fmt: skip
        # file names with FE0F and leading zeros, plus a non-codepoint extra icon
        "b": index_by_codepoints(
            [
                ("1f600", "1f600.webp"),
                ("0023-fe0f-20e3", "0023-fe0f-20e3.webp"),
                ("2764-fe0f", "2764-fe0f.webp"),
                ("extra-icon", "x.webp"),
            ]
        ),  # fmt: skip
    }
    assert sources["b"][(0x2764,)] == "2764-fe0f.webp"
    joined = join_concepts(concepts, sources)
    assert [c.unified for c in joined] == ["1F600", "0023-20E3", "2764"]  # no pizza in "b"


def test_index_by_codepoints_is_deterministic_on_duplicates():
    a = index_by_codepoints([("2764-fe0f", "second"), ("2764", "first")])
    b = index_by_codepoints([("2764", "first"), ("2764-fe0f", "second")])
    assert a == b == {(0x2764,): "first"}


# --- images ------------------------------------------------------------------------------------


def test_crop_and_centre_known_rectangle():
    image = np.zeros((60, 100, 4), np.uint8)
    image[5:15, 70:90] = (255, 0, 0, 255)  # a 10 x 20 red bar near the top right
    image[50, 5] = (0, 0, 255, 5)  # faint dust below the threshold is ignored
    out = crop_and_centre(image, 32, padding=2)
    assert out.shape == (32, 32, 4) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[..., 3])
    # longer side scaled to 32 - 2 * 2 = 28 px, the bar keeps its 2:1 aspect (14 px), centred
    assert (xs.min(), xs.max()) == (2, 29)
    assert (ys.min(), ys.max()) == (9, 22)
    assert (out[ys, xs, :3] == (255, 0, 0)).all()
    rgb = on_white(out)
    assert (
        rgb.shape == (32, 32, 3) and (rgb[0, 0] == 255).all() and (rgb[16, 16] == (255, 0, 0)).all()
    )


def test_crop_and_centre_tall_content_and_default_padding():
    image = np.zeros((200, 200, 4), np.uint8)
    image[20:180, 10:50] = 255  # 160 tall x 40 wide, far off centre
    out = crop_and_centre(image, 64)  # default padding 64 / 32 = 2
    ys, xs = np.nonzero(out[..., 3])
    assert (ys.min(), ys.max()) == (2, 61)
    assert (xs.min() + xs.max()) / 2 == pytest.approx(31.5, abs=0.5)
    assert xs.max() - xs.min() + 1 == 15  # 40 * 60 / 160


def test_crop_and_centre_rejects_empty_and_bad_input():
    with pytest.raises(ValueError, match="no content"):
        crop_and_centre(np.zeros((10, 10, 4), np.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        crop_and_centre(np.zeros((10, 10, 3), np.uint8), 8)


def test_iconify_alias_with_flip_and_non_square_icon():
    pytest.importorskip("resvg_py")
    icon_set = IconifySet(
        {
            "prefix": "test",
            "width": 32,
            "height": 32,
            "icons": {
                "left": {"body": '<rect x="0" y="0" width="8" height="32" fill="#ff0000"/>'},
                "wide": {
                    "body": '<rect width="40" height="20" fill="#0000ff"/>',
                    "width": 40,
                    "height": 20,
                },
            },
            "aliases": {"right": {"parent": "left", "hFlip": True}, "right2": {"parent": "right"}},
        }
    )
    left, right = icon_set.render("left", 64), icon_set.render("right2", 64)
    assert left.shape == right.shape == (64, 64, 4)
    assert left[:, :16, 3].min() == 255 and left[:, 20:, 3].max() == 0
    assert right[:, -16:, 3].min() == 255 and right[:, :-20, 3].max() == 0
    wide = icon_set.render("wide", 64)
    assert wide.shape == (32, 64, 4) and (wide[..., 2] == 255).all()
    with pytest.raises(EmojiPrefsError, match="no icon 'missing'"):
        icon_set.render("missing", 64)


# --- splits, users -----------------------------------------------------------------------------


def test_split_by_family_is_deterministic_disjoint_and_proportional():
    concepts = synthetic_concepts()
    a, b = split_families(concepts, seed=0), split_families(concepts, seed=0)
    assert a == b
    assert split_families(concepts, seed=1) != a
    families = {c.family for c in concepts}
    assert set(a) == families and set(a.values()) == {"test", "val", "train"}
    counts = Counter(a.values())
    assert abs(counts["test"] - 0.2 * len(families)) <= 1
    assert abs(counts["val"] - 0.1 * len(families)) <= 1
    # every subgroup of 20 families is split about 4 / 2 / 14
    for sub in {c.subgroup for c in concepts}:
        fams = {c.family for c in concepts if c.subgroup == sub}
        assert 2 <= sum(a[f] == "test" for f in fams) <= 6
    assign_splits(concepts, seed=0)
    by_family = {}
    for c in concepts:
        assert by_family.setdefault(c.family, c.split) == c.split  # a family never straddles splits


def test_manifest_is_reproducible_and_follows_the_rules():
    concepts = assign_splits(synthetic_concepts(), seed=0)
    by_code = {c.unified: c for c in concepts}
    rows = make_manifest(concepts, STYLES, "test", 200, seed=7)
    assert rows == make_manifest(concepts, STYLES, "test", 200, seed=7)
    assert rows != make_manifest(concepts, STYLES, "test", 200, seed=8)
    assert rows != make_manifest(concepts, STYLES, "val", 200, seed=7)
    assert [r["user_id"] for r in rows[:2]] == ["test-00000", "test-00001"]
    for row in rows:
        user = EmojiUser.from_json(json.loads(json.dumps(row)))
        assert user.to_json() == row
        target = by_code[user.target[0]]
        assert target.split == "test" and user.target[1] == user.style
        assert user.reference[0] == target.unified and user.reference[1] != user.style
        assert user.text == f"a sticker of {target.name}"
        codes = [u for u, _ in user.history]
        assert len(codes) == 5 and len(set(codes)) == 5
        for code in codes:
            assert by_code[code].family != target.family
            assert by_code[code].split in ("train", "test")
        own = sum(s == user.style for _, s in user.history)
        rival = max(Counter(s for _, s in user.history if s != user.style).values(), default=0)
        assert user.ambiguous == (own <= rival)


def test_training_user_invariants():
    ds = synthetic_dataset()
    train = {ds.concepts[i].unified for i in ds.split_index["train"]}
    family = {c.unified: c.family for c in ds.concepts}
    rng = np.random.default_rng(0)
    users = [sample_training_user(ds, rng, history_length=5, noise_ratio=0.3) for _ in range(2000)]
    in_style = [s == u.style for u in users for _, s in u.history]
    assert np.mean(in_style) == pytest.approx(0.7, abs=0.02)
    assert Counter(u.style for u in users).keys() == set(STYLES)
    for u in users:
        assert u.target == (u.target[0], u.style) and u.target[0] in train
        assert u.reference[0] == u.target[0] and u.reference[1] != u.style
        assert all(c in train and family[c] != family[u.target[0]] for c, _ in u.history)
    history, reference, target = ds.user_images(users[0])
    assert history.shape == (5, 8, 8, 3)
    assert (target == ds.rgb[ds.index(*users[0].target)]).all()
    assert (reference == ds.image(*users[0].reference)).all()
    assert (history[2] == ds.image(*users[0].history[2])).all()


def test_training_user_noise_extremes_and_ranges():
    ds = synthetic_dataset()
    rng = np.random.default_rng(1)
    clean = [sample_training_user(ds, rng, history_length=3, noise_ratio=0.0) for _ in range(50)]
    assert all(s == u.style and not u.ambiguous for u in clean for _, s in u.history)
    noisy = [sample_training_user(ds, rng, noise_ratio=1.0) for _ in range(50)]
    assert all(s != u.style and u.ambiguous for u in noisy for _, s in u.history)
    ranged = [
        sample_training_user(ds, rng, history_length=10, noise_ratio=(0.1, 0.3)) for _ in range(50)
    ]
    assert all(0.1 <= u.noise_ratio <= 0.3 and len(u.history) == 10 for u in ranged)
    with pytest.raises(ValueError, match="noise_ratio"):
        sample_training_user(ds, rng, noise_ratio=1.5)
    with pytest.raises(ValueError, match="history_length 900"):
        sample_training_user(ds, rng, history_length=900)


def test_write_and_load_round_trip_with_stable_hash(tmp_path):
    ds = synthetic_dataset()
    alpha = np.full(ds.rgb.shape[:4], 255, np.uint8)
    args = dict(seed=3, val_users=20, test_users=30)
    info = write_dataset(tmp_path / "a", synthetic_concepts(), STYLES, ds.rgb, alpha, **args)
    again = write_dataset(tmp_path / "b", synthetic_concepts(), STYLES, ds.rgb, alpha, **args)
    assert info["content_sha256"] == again["content_sha256"]
    assert info["counts"]["images"] == len(ds.concepts) * len(STYLES)
    changed = ds.rgb.copy()
    changed[0, 0, 0, 0, 0] ^= 1
    other = write_dataset(tmp_path / "c", synthetic_concepts(), STYLES, changed, alpha, **args)
    assert other["content_sha256"] != info["content_sha256"]
    loaded = load_emojiprefs(tmp_path / "a")
    assert loaded.styles == STYLES and (loaded.rgb == ds.rgb).all() and (loaded.alpha == 255).all()
    assert [c.split for c in loaded.concepts] == [
        c.split for c in assign_splits(synthetic_concepts(), 3)
    ]
    users = load_manifest(tmp_path / "a" / "test.jsonl")
    assert len(users) == 30 and all(
        loaded.concepts[loaded.concept_index[u.target[0]]].split == "test" for u in users
    )
    on_disk = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert on_disk["content_sha256"] == info["content_sha256"]


def test_style_selection():
    assert resolve_styles(None, False) == list(DEFAULT_STYLES)
    assert resolve_styles(None, True) == list(PERMISSIVE_STYLES)
    assert "openmoji_color" not in PERMISSIVE_STYLES and len(PERMISSIVE_STYLES) == 5
    assert resolve_styles(["noto", "fluent_color"], False) == ["noto", "fluent_color"]
    with pytest.raises(ValueError, match="apple"):
        resolve_styles(["noto", "apple"], False)
    with pytest.raises(ValueError, match="openmoji_line"):
        resolve_styles(["noto", "openmoji_line"], True)


# --- fetching (offline) --------------------------------------------------------------------------


def _tarball(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_cached_tarball_is_reused_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm on PATH
    integrity = _tarball(
        tmp_path / "scope-pkg-1.0.0.tgz", {"icons.json": b"{}", "x.svg": b"<svg/>"}
    )
    source = Source("@scope/pkg", "1.0.0", integrity, "MIT", "test")
    assert source.tarball == "scope-pkg-1.0.0.tgz"
    path = fetch_package(source, tmp_path)
    assert path == tmp_path / "scope-pkg-1.0.0.tgz"
    assert read_tarball(path, lambda n: n.endswith(".json")) == {"icons.json": b"{}"}


def test_missing_npm_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    source = Source("@scope/pkg", "1.0.0", "sha512-AAAA", "MIT", "test")
    with pytest.raises(EmojiPrefsError, match=r"npm not found.*@scope/pkg@1\.0\.0"):
        fetch_package(source, tmp_path / "cache")


def test_failed_download_names_the_package(tmp_path, monkeypatch):
    if not any((Path(p) / "npm").exists() for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("npm is not installed")
    # a registry that refuses connections: fails at once, without the network
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    monkeypatch.setenv("npm_config_offline", "false")
    source = Source("openmoji", "17.0.0", "sha512-AAAA", "CC-BY-SA-4.0", "test")
    with pytest.raises(EmojiPrefsError, match=r"npm pack openmoji@17\.0\.0 failed"):
        fetch_package(source, tmp_path / "cache")


# --- the real thing ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_build_is_reproducible(tmp_path):
    from pigeon.data.emojiprefs import build_emojiprefs

    cache = Path(os.environ.get("PIGEON_EMOJIPREFS_CACHE", tmp_path / "cache"))
    first = build_emojiprefs(tmp_path / "a", cache_dir=cache, val_users=50, test_users=50)
    second = build_emojiprefs(tmp_path / "b", cache_dir=cache, val_users=50, test_users=50)
    assert first["content_sha256"] == second["content_sha256"]
    assert first["counts"]["concepts"] > 1500 and first["counts"]["styles"] == 7
    ds = load_emojiprefs(tmp_path / "a")
    assert ds.rgb.shape[1:] == (7, 64, 64, 3)
    notice = (tmp_path / "a" / "NOTICE").read_text()
    for licence in ("CC BY-SA 4.0", "CC BY 4.0", "Apache License", "MIT"):
        assert licence in notice
    assert "apple" not in json.dumps(first["sources"]).lower()
    assert sorted(p.name for p in cache.glob("*.tgz")) == sorted(
        s["package"].lstrip("@").replace("/", "-") + f"-{s['version']}.tgz"
        for s in first["sources"]
    )
