"""Memory-mapped case store: round trip, memmaps, centres, idempotence, atomic builds, patches."""
import os
import pickle

import numpy as np
import pytest

from vmat_diffusion.case import CaseFormatError, load_case, save_case
from vmat_diffusion.cli.build_store import main as build_store_main
from vmat_diffusion.patches import PatchSampler, dose_biased_centers
from vmat_diffusion.phantom import make_phantom
from vmat_diffusion.store import CaseStore, StoreCase, build_store, open_cases, open_store_case
import vmat_diffusion.store as store_module

SHAPE = (32, 32, 24)
SPACING = (8.0, 8.0, 8.0)


@pytest.fixture(scope="module")
def phantom_cases():
    return [make_phantom(f"case_{i}", shape=SHAPE, spacing_mm=SPACING, seed=i) for i in range(2)]


@pytest.fixture
def data_dir(tmp_path, phantom_cases):
    folder = tmp_path / "data"
    for case in phantom_cases:
        save_case(folder / f"{case.case_id}.npz", case)
    return folder


def test_round_trip_equals_load_case(data_dir, tmp_path):
    report = build_store(data_dir, tmp_path / "store", progress=False)
    assert len(report.built) == 2 and report.skipped == []
    store = CaseStore(tmp_path / "store")
    assert len(store) == 2 and store.case_ids == ["case_0", "case_1"]
    for case_id in store.case_ids:
        original = load_case(data_dir / f"{case_id}.npz")
        stored = store.open(case_id)
        assert isinstance(stored, StoreCase)
        for key in ("ct", "dose", "masks_sdf", "constraints"):
            array = getattr(stored, key)
            assert isinstance(array, np.memmap) and not array.flags.writeable
            assert array.dtype == getattr(original, key).dtype
            assert np.array_equal(array, getattr(original, key))
        assert stored.metadata == original.metadata
        assert set(stored.extras) == set(original.extras) == {"possible_dose_mask"}
        assert isinstance(stored.extras["possible_dose_mask"], np.memmap)
        assert np.array_equal(stored.extras["possible_dose_mask"], original.extras["possible_dose_mask"])
        assert (stored.case_id, stored.structures, stored.spacing_mm, stored.rx_dose_gy, stored.shape) == \
            (original.case_id, original.structures, original.spacing_mm, original.rx_dose_gy, original.shape)
        assert np.array_equal(stored.mask("PTV70"), original.mask("PTV70"))
        assert np.array_equal(stored.to_case().masks_sdf, original.masks_sdf)
    with pytest.raises(KeyError, match="case_9"):
        store.open("case_9")


def test_centers_stored(data_dir, tmp_path):
    build_store(data_dir, tmp_path / "store", thresholds=(0.1, 0.5), progress=False)
    stored = CaseStore(tmp_path / "store").open("case_0")
    original = load_case(data_dir / "case_0.npz")
    for threshold in (0.1, 0.5):
        expected = dose_biased_centers(original.dose, original.rx_dose_gy, threshold)
        centers = stored.precomputed_centers(threshold)
        assert centers.shape[1] == 3 and len(centers) > 0
        assert np.array_equal(centers, expected)
    assert len(stored.precomputed_centers(0.5)) < len(stored.precomputed_centers(0.1))
    assert stored.precomputed_centers(0.3) is None
    assert stored.stored_thresholds() == [0.1, 0.5]


def test_idempotent_by_size_and_mtime(data_dir, tmp_path):
    store_dir = tmp_path / "store"
    build_store(data_dir, store_dir, progress=False)
    ct_file = store_dir / "case_0" / "ct.npy"
    before = ct_file.stat().st_mtime_ns

    again = build_store(data_dir, store_dir, thresholds=(0.1, 0.2), progress=False)
    assert again.built == [] and len(again.skipped) == 2
    assert ct_file.stat().st_mtime_ns == before
    assert (store_dir / "case_0" / "centers_0.2.npy").is_file()  # new threshold added in place

    source = data_dir / "case_0.npz"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    changed = build_store(data_dir, store_dir, progress=False)
    assert changed.built == [source] and changed.skipped == [data_dir / "case_1.npz"]

    forced = build_store(data_dir, store_dir, force=True, progress=False)
    assert len(forced.built) == 2
    assert sorted(p.name for p in store_dir.iterdir()) == ["case_0", "case_1"]


def test_failed_build_leaves_no_half_case(data_dir, tmp_path, monkeypatch):
    store_dir = tmp_path / "store"
    real_save = store_module._save_npy

    def failing_save(path, array):
        if path.name == "masks_sdf.npy":
            raise OSError("disk full (simulated)")
        real_save(path, array)

    monkeypatch.setattr(store_module, "_save_npy", failing_save)
    with pytest.raises(OSError, match="simulated"):
        build_store(data_dir, store_dir, progress=False)
    assert list(store_dir.iterdir()) == []
    assert len(CaseStore(store_dir)) == 0

    monkeypatch.setattr(store_module, "_save_npy", real_save)
    build_store(data_dir, store_dir, progress=False)
    good = np.array(CaseStore(store_dir).open("case_0").masks_sdf)
    monkeypatch.setattr(store_module, "_save_npy", failing_save)
    with pytest.raises(OSError, match="simulated"):
        build_store(data_dir, store_dir, force=True, progress=False)
    assert sorted(p.name for p in store_dir.iterdir()) == ["case_0", "case_1"]  # old versions intact
    assert np.array_equal(CaseStore(store_dir).open("case_0").masks_sdf, good)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to name fsynced files")
def test_every_file_of_a_case_folder_is_fsynced_before_the_rename(data_dir, tmp_path, monkeypatch):
    fsynced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        fsynced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    report = build_store([data_dir / "case_0.npz"], tmp_path / "store", progress=False)
    names = sorted(p.name for p in report.case_dirs[0].iterdir())
    assert {"metadata.json", "source.json", "ct.npy"} <= set(names)
    for name in names:  # written in place, or as the atomic writer's temporary ".<name>.*.tmp"
        assert any(f == name or f.startswith(f".{name}.") for f in fsynced), name


def test_corrupt_metadata_json_names_the_file(data_dir, tmp_path):
    build_store(data_dir, tmp_path / "store", progress=False)
    path = tmp_path / "store" / "case_1" / "metadata.json"
    for text in ("", "[1, 2]"):
        path.write_text(text)
        for read in (lambda: CaseStore(tmp_path / "store"), lambda: open_store_case(path.parent)):
            with pytest.raises(CaseFormatError, match=r"case_1/metadata\.json: .*rebuild this case"):
                read()


def test_bad_case_file_is_refused(data_dir, tmp_path):
    (data_dir / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(CaseFormatError, match="broken.npz"):
        build_store([data_dir / "broken.npz"], tmp_path / "store", progress=False)
    assert list((tmp_path / "store").iterdir()) == []


def test_duplicate_case_ids_are_refused(data_dir, tmp_path, phantom_cases):
    save_case(tmp_path / "other" / "copy.npz", phantom_cases[0])
    with pytest.raises(ValueError, match="case_id 'case_0' is already in the store"):
        build_store([data_dir / "case_0.npz", tmp_path / "other" / "copy.npz"], tmp_path / "store", progress=False)


def test_open_cases_uses_default_cache(data_dir):
    cases = open_cases([data_dir / "case_1.npz", data_dir / "case_0.npz"])
    assert [c.case_id for c in cases] == ["case_1", "case_0"]
    assert (data_dir / ".vmat_store" / "case_0" / "ct.npy").is_file()
    assert all(isinstance(c.dose, np.memmap) for c in cases)
    again = open_cases(data_dir)
    assert [c.case_id for c in again] == ["case_0", "case_1"]


def test_pickle_sends_the_folder_not_the_data(data_dir, tmp_path):
    build_store(data_dir, tmp_path / "store", progress=False)
    stored = CaseStore(tmp_path / "store").open("case_0")
    blob = pickle.dumps(stored)
    assert len(blob) < 2000 < stored.masks_sdf.nbytes
    restored = pickle.loads(blob)
    assert isinstance(restored.masks_sdf, np.memmap)
    assert np.array_equal(restored.dose, stored.dose)


def test_patch_sampler_same_patches_on_store_case(data_dir, tmp_path):
    build_store(data_dir, tmp_path / "store", progress=False)
    stored = open_store_case(tmp_path / "store" / "case_1")
    original = load_case(data_dir / "case_1.npz")
    kwargs = dict(patch_size=16, patches_per_volume=6, dose_biased_fraction=0.5, dose_threshold=0.1)
    from_store = PatchSampler(rng=np.random.default_rng(3), **kwargs).sample(stored)
    from_case = PatchSampler(rng=np.random.default_rng(3), **kwargs).sample(original)
    assert any(p["dose_biased"] for p in from_store) and not all(p["dose_biased"] for p in from_store)
    for a, b in zip(from_store, from_case):
        assert a["center"] == b["center"] and a["dose_biased"] == b["dose_biased"]
        for key in ("ct", "masks_sdf", "dose"):
            assert a[key].shape == b[key].shape
            assert bool((a[key] == b[key]).all())


def test_cli(data_dir, tmp_path, capsys):
    assert build_store_main([str(data_dir), "--quiet"]) == 0
    assert "2 converted" in capsys.readouterr().out
    assert build_store_main([str(data_dir), str(tmp_path / "s"), "--thresholds", "0.1", "0.3", "--quiet"]) == 0
    assert (tmp_path / "s" / "case_0" / "centers_0.3.npy").is_file()
    assert build_store_main([str(data_dir), "--quiet"]) == 0
    assert "2 already up to date" in capsys.readouterr().out
    assert build_store_main([str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    (tmp_path / "a_file").write_text("not a folder\n")
    assert build_store_main([str(data_dir), str(tmp_path / "a_file"), "--quiet"]) == 2
    assert "a_file exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [("-1", "fraction of the prescription in [0, 10]"),
                                             ("x", "expected numbers")])
def test_cli_bad_threshold_is_a_usage_error_naming_the_flag(data_dir, tmp_path, capsys, value, expected):
    with pytest.raises(SystemExit) as stop:
        build_store_main([str(data_dir), str(tmp_path / "s"), "--thresholds", "0.1", value, "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --thresholds:" in err and expected in err
    assert not (tmp_path / "s").exists()


def test_changed_case_id_replaces_the_old_folder(data_dir, tmp_path, phantom_cases):
    store_dir = tmp_path / "store"
    build_store(data_dir, store_dir, progress=False)
    renamed = make_phantom("renamed", shape=SHAPE, spacing_mm=SPACING, seed=0)
    save_case(data_dir / "case_0.npz", renamed)
    build_store(data_dir, store_dir, progress=False)
    assert CaseStore(store_dir).case_ids == ["case_1", "renamed"]
