"""The case format: every validation rule raises one CaseFormatError naming file and key."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from vmat_diffusion.case import Case, CaseFormatError, load_case, save_case
from vmat_diffusion.constraints import PROSTATE, constraint_vector
from vmat_diffusion.conventions import holds_only_zeros_and_ones, mask_to_sdf
from vmat_diffusion.structures import PROSTATE_STRUCTURES

SHAPE = (6, 5, 4)


def tiny_case(**overrides) -> Case:
    rng = np.random.default_rng(0)
    s = len(PROSTATE_STRUCTURES)
    fields = dict(
        ct=rng.random(SHAPE, dtype=np.float32),
        dose=(70 * rng.random(SHAPE)).astype(np.float32),
        masks_sdf=rng.uniform(-1, 1, (s,) + SHAPE).astype(np.float32),
        constraints=constraint_vector(PROSTATE, ["PTV70"], 70.0),
        metadata={"case_id": "c1", "structures": list(PROSTATE_STRUCTURES),
                  "spacing_mm": [2.0, 2.0, 3.0], "rx_dose_gy": 70.0},
        extras={"possible_dose_mask": np.ones(SHAPE, np.uint8)},
    )
    fields.update(overrides)
    return Case(**fields)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def arrays_of(case: Case, drop=(), **replace):
    arrays = {"ct": case.ct, "dose": case.dose, "masks_sdf": case.masks_sdf,
              "constraints": case.constraints, "metadata": np.array(json.dumps(case.metadata))}
    arrays.update(replace)
    for key in drop:
        arrays.pop(key)
    return arrays


def test_round_trip_keeps_every_array_and_metadata(tmp_path):
    case = tiny_case()
    path = save_case(tmp_path / "c1.npz", case)
    back = load_case(path)
    for key in ("ct", "dose", "masks_sdf", "constraints"):
        np.testing.assert_array_equal(getattr(back, key), getattr(case, key))
        assert getattr(back, key).dtype == np.float32
    np.testing.assert_array_equal(back.extras["possible_dose_mask"], case.extras["possible_dose_mask"])
    assert back.case_id == "c1" and back.structures == list(PROSTATE_STRUCTURES)
    assert back.spacing_mm == (2.0, 2.0, 3.0) and back.rx_dose_gy == 70.0
    assert back.shape == SHAPE


def test_mask_and_present_structures():
    case = tiny_case()
    case.masks_sdf[:] = 1.0
    case.masks_sdf[1, 0, 0, 0] = -0.5
    assert case.present_structures() == ["PTV56"]
    assert case.mask("PTV56").sum() == 1
    with pytest.raises(KeyError, match="SpinalCord"):
        case.mask("SpinalCord")


@pytest.mark.parametrize("missing", ["ct", "dose", "masks_sdf", "constraints", "metadata"])
def test_missing_key(tmp_path, missing):
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), drop=[missing]))
    with pytest.raises(CaseFormatError, match=rf"bad\.npz, key '{missing}': missing") as info:
        load_case(path)
    assert info.value.key == missing


def test_dose_may_be_absent_for_inference(tmp_path):
    path = write_npz(tmp_path / "nodose.npz", **arrays_of(tiny_case(), drop=["dose"]))
    assert load_case(path, require_dose=False).dose is None


@pytest.mark.parametrize("key,value,message", [
    ("dose", np.zeros((6, 5, 3), np.float32), "differs from ct"),
    ("masks_sdf", np.zeros((8, 6, 5, 3), np.float32), "spatial shape"),
    ("masks_sdf", np.zeros((7,) + SHAPE, np.float32), "7 channels but metadata 'structures' names 8"),
    ("ct", np.zeros((6, 5), np.float32), "expected 3 dimensions"),
    ("ct", np.zeros(SHAPE, np.int16), r"expected a float32 array \(other float dtypes are converted\), got dtype int16"),
    ("constraints", np.zeros((2, 13), np.float32), "expected 1 dimensions"),
])
def test_bad_shapes_and_dtypes(tmp_path, key, value, message):
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), **{key: value}))
    with pytest.raises(CaseFormatError, match=message) as info:
        load_case(path)
    assert info.value.key == key and "bad.npz" in str(info.value)


@pytest.mark.parametrize("key", ["ct", "dose", "masks_sdf", "constraints"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(tmp_path, key, bad):
    arr = getattr(tiny_case(), key).copy()
    arr.flat[3] = bad
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), **{key: arr}))
    with pytest.raises(CaseFormatError, match=f"key '{key}': contains 1 NaN or Inf"):
        load_case(path)


@pytest.mark.parametrize("change,message", [
    ({"spacing_mm": [2.0, 0.0, 3.0]}, "spacing_mm"),
    ({"spacing_mm": [2.0, 2.0]}, "spacing_mm"),
    ({"spacing_mm": "2mm"}, "spacing_mm"),
    ({"spacing_mm": [2.0, float("nan"), 3.0]}, "spacing_mm"),
    ({"rx_dose_gy": -70}, "rx_dose_gy"),
    ({"structures": "PTV70"}, "structures"),
    ({"case_id": None, "_drop": "case_id"}, "missing field 'case_id'"),
])
def test_bad_metadata(tmp_path, change, message):
    meta = dict(tiny_case().metadata)
    drop = change.pop("_drop", None)
    meta.update(change)
    if drop:
        meta.pop(drop)
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), metadata=np.array(json.dumps(meta))))
    with pytest.raises(CaseFormatError, match=message) as info:
        load_case(path)
    assert info.value.key == "metadata"


def _sdf_channel(values):
    """tiny_case's masks_sdf with channel 3 (Rectum) replaced by ``values``."""
    sdf = tiny_case().masks_sdf.copy()
    sdf[3] = values
    return sdf


def test_sdf_channels_that_are_absent_or_outside_everywhere_load(tmp_path):
    absent = _sdf_channel(2.0)              # SDF_ABSENT: not contoured
    absent[4] = 1.0                          # SDF_OUTSIDE everywhere is a valid (empty) SDF
    path = write_npz(tmp_path / "ok.npz", **arrays_of(tiny_case(), masks_sdf=absent))
    assert load_case(path).present_structures() == [n for i, n in enumerate(PROSTATE_STRUCTURES) if i not in (3, 4)]


binary = np.zeros(SHAPE, np.float32)
binary[1:3, 1:3, 1:3] = 1.0
averaged = np.zeros(SHAPE, np.float32)    # a 0/1 mask resampled: fractions on its border
averaged[1:4, 1:4, 1:3] = 1.0
averaged[4, 1:4, 1:3] = 0.5
cubic = averaged.copy()                    # resampled with cubic splines: overshoot on both sides
cubic[0, 0, 0], cubic[1, 1, 1] = -0.1, 1.1
partly_absent = np.full(SHAPE, 2.0, np.float32)
partly_absent[0] = -0.5


@pytest.mark.parametrize("values, words", [
    (binary, r"values in \[0, 1\] \(only 0s and 1s, or many exact 0s: a binary or resampled mask"),
    (averaged, r"values in \[0, 1\] \(only 0s and 1s, or many exact 0s: a binary or resampled mask"),
    (cubic, r"values in \[-0.1, 1.1\] \(only 0s and 1s, or many exact 0s: a binary or resampled mask"),
    (binary * 255, r"values in \[0, 255\]"),
    (partly_absent, r"values in \[-0.5, 2\]"),
    (-3.0 * binary - 0.5, r"values in \[-3.5, -0.5\]"),            # SDF in another scale
])
def test_sdf_values_outside_the_convention_are_refused(tmp_path, values, words):
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), masks_sdf=_sdf_channel(values)))
    with pytest.raises(CaseFormatError, match=rf"bad\.npz, key 'masks_sdf': channel 3 \('Rectum'\) has {words}") as info:
        load_case(path)
    assert "mask_to_sdf(mask, spacing_mm)" in str(info.value)
    with pytest.raises(CaseFormatError, match="channel 3"):
        save_case(tmp_path / "out.npz", tiny_case(masks_sdf=_sdf_channel(values)))


def test_sdf_of_a_thin_structure_averaged_to_half_resolution_loads(tmp_path):
    # one contoured slice, block-averaged 2x2x2: inside and outside distances cancel to exactly 0
    thin = np.zeros((8, 8, 8), bool)
    thin[2:6, 2:6, 3] = True
    sdf = mask_to_sdf(thin, (2.0, 2.0, 2.0))
    half = sdf.reshape(4, 2, 4, 2, 4, 2).mean(axis=(1, 3, 5))
    assert half.min() == 0.0 and not holds_only_zeros_and_ones(half)
    masks = np.full((len(PROSTATE_STRUCTURES), 4, 4, 4), 2.0, np.float32)
    masks[0] = half
    case = tiny_case(ct=np.zeros((4, 4, 4), np.float32), dose=np.zeros((4, 4, 4), np.float32), masks_sdf=masks,
                     extras={})
    path = write_npz(tmp_path / "half.npz", **arrays_of(case))
    assert load_case(path).masks_sdf[0].min() == 0.0


@pytest.mark.parametrize("extra, words", [
    (np.ones((3, 3, 3), np.uint8), r"shape \(3, 3, 3\) differs from ct \(6, 5, 4\)"),
    (np.array(["a", "b"]), r"extra arrays must be numeric .* got dtype <U1"),
    (np.array([b"a"]), r"extra arrays must be numeric .* got dtype \|S1"),
])
def test_extras_must_be_numeric_and_on_the_ct_grid(tmp_path, extra, words):
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), possible_dose_mask=extra))
    with pytest.raises(CaseFormatError, match=rf"bad\.npz, key 'possible_dose_mask': {words}"):
        load_case(path)
    fine = write_npz(tmp_path / "fine.npz", **arrays_of(tiny_case(), spacing_hint=np.ones(7, np.float64)))
    assert load_case(fine).extras["spacing_hint"].shape == (7,)  # only 3-D extras must match the CT


def test_numpy_values_in_metadata_are_written_as_json(tmp_path):
    meta = dict(tiny_case().metadata, seed=np.int64(3), spacing_mm=np.array([2.0, 2.0, 3.0]),
                nested={"scale": np.float32(1.5), "ids": [np.int8(1), np.array([2, 3])]})
    back = load_case(save_case(tmp_path / "c.npz", tiny_case(metadata=meta)))
    assert back.metadata["seed"] == 3 and type(back.metadata["seed"]) is int
    assert back.metadata["nested"] == {"scale": 1.5, "ids": [1, [2, 3]]}
    with pytest.raises(CaseFormatError, match=r"key 'metadata': field 'when' cannot be written as JSON"):
        save_case(tmp_path / "bad.npz", tiny_case(metadata=dict(meta, when=object())))


def test_readme_recipe_converts_pickled_metadata_with_numpy_values(tmp_path):
    meta = dict(tiny_case().metadata, spacing_mm=np.array([2.0, 2.0, 3.0]), n_fractions=np.int64(28),
                origin_mm=np.array([-250.0, -250.0, 100.0]))
    obj = np.empty((), dtype=object)
    obj[()] = meta
    path = write_npz(tmp_path / "old.npz", **arrays_of(tiny_case(), metadata=obj))
    save_case(path, load_case(path, allow_pickle=True))        # the README's one-off conversion
    back = load_case(path)
    assert back.metadata["n_fractions"] == 28 and back.metadata["origin_mm"] == [-250.0, -250.0, 100.0]


def test_metadata_as_utf8_bytes_is_read(tmp_path):
    text = json.dumps(dict(tiny_case().metadata, case_id="c\u00e9"))
    path = write_npz(tmp_path / "b.npz", **arrays_of(tiny_case(), metadata=np.array(text.encode("utf-8"))))
    assert load_case(path).case_id == "c\u00e9"
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), metadata=np.array(b"{\xff}")))
    with pytest.raises(CaseFormatError, match="key 'metadata': bytes are not UTF-8"):
        load_case(path)


def test_metadata_not_json(tmp_path):
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), metadata=np.array("{not json")))
    with pytest.raises(CaseFormatError, match="key 'metadata': is not valid JSON"):
        load_case(path)


def test_structure_count_must_match_channels(tmp_path):
    meta = dict(tiny_case().metadata, structures=list(PROSTATE_STRUCTURES[:7]))
    path = write_npz(tmp_path / "bad.npz", **arrays_of(tiny_case(), metadata=np.array(json.dumps(meta))))
    with pytest.raises(CaseFormatError, match="8 channels but metadata 'structures' names 7"):
        load_case(path)


def test_other_float_dtypes_are_read_as_float32(tmp_path):
    case = tiny_case()
    path = write_npz(tmp_path / "wide.npz", **arrays_of(case, dose=case.dose.astype(np.float64),
                                                       masks_sdf=case.masks_sdf.astype(np.float16)))
    loaded = load_case(path)
    assert loaded.dose.dtype == np.float32 and loaded.masks_sdf.dtype == np.float32
    np.testing.assert_array_equal(loaded.dose, case.dose)
    np.testing.assert_array_equal(loaded.masks_sdf, case.masks_sdf.astype(np.float16).astype(np.float32))


def test_pickled_metadata_refused_by_default_and_opt_in(tmp_path):
    meta = tiny_case().metadata
    obj = np.empty((), dtype=object)
    obj[()] = meta
    path = write_npz(tmp_path / "old.npz", **arrays_of(tiny_case(), metadata=obj))
    with pytest.raises(CaseFormatError, match=r"pickled Python object.*save_case\(path, load_case\(path, allow_pickle=True\)\)"):
        load_case(path)
    assert load_case(path, allow_pickle=True).case_id == "c1"


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    obj = np.empty((), dtype=object)
    obj[()] = Evil()
    path = write_npz(tmp_path / "evil.npz", **arrays_of(tiny_case(), metadata=obj))
    with pytest.raises(CaseFormatError):
        load_case(path)
    assert not marker.exists()


def test_truncated_and_non_zip_files(tmp_path):
    good = save_case(tmp_path / "good.npz", tiny_case())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaseFormatError, match="truncated.npz"):
        load_case(truncated)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(CaseFormatError, match="text.npz.*not a complete .npz archive") as info:
        load_case(text)
    assert "pickle" not in str(info.value)  # numpy's own error would suggest unsafe loading
    with pytest.raises(CaseFormatError, match="file not found"):
        load_case(tmp_path / "absent.npz")
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(CaseFormatError, match="single .npy"):
        load_case(single)


def test_corrupt_member_names_the_key(tmp_path):
    good = save_case(tmp_path / "good.npz", tiny_case(), compress=False)
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("dose.npy")
    start = info.header_offset + 30 + len(info.filename) + 200  # inside the dose payload
    data[start:start + 50] = b"\xff" * 50
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CaseFormatError, match="corrupt.npz, key 'dose'"):
        load_case(corrupt)


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = save_case(tmp_path / "c.npz", tiny_case())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_case(path, tiny_case(metadata=dict(tiny_case().metadata, case_id="other")))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind


def test_save_validates_before_writing(tmp_path):
    bad = tiny_case(dose=np.zeros((2, 2, 2), np.float32))
    with pytest.raises(CaseFormatError, match="dose"):
        save_case(tmp_path / "bad.npz", bad)
    assert not (tmp_path / "bad.npz").exists()


def test_saved_file_loads_without_pickle_in_plain_numpy(tmp_path):
    path = save_case(tmp_path / "c.npz", tiny_case())
    with np.load(path, allow_pickle=False) as z:
        assert json.loads(str(z["metadata"]))["case_id"] == "c1"


def test_saved_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_case(tmp_path / "c.npz", tiny_case())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
