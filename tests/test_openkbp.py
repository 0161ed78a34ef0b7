"""OpenKBP reader and importer: sparse CSVs, orientation, SDFs, constraints, errors, idempotence."""
import shutil

import numpy as np
import pytest
from scipy import ndimage

from vmat_diffusion.case import load_case
from vmat_diffusion.cli.import_openkbp import main as import_main
from vmat_diffusion.constraints import HEAD_NECK
from vmat_diffusion.conventions import SDF_ABSENT, SDF_CLIP_MM, mask_to_sdf
from vmat_diffusion.openkbp import (
    OPENKBP_SHAPE, OpenKBPFormatError, import_openkbp, openkbp_to_case, read_openkbp_patient,
    read_sparse_csv, stored_ct_to_hu, structure_sdf, write_sparse_csv,
)
from vmat_diffusion.structures import HEAD_NECK_STRUCTURES

SMALL_PATIENTS = ("train-pats/pt_143", "train-pats/pt_40")
PTV63_ENTRY = [t.structure for t in HEAD_NECK.targets].index("PTV63")
PTV70_ENTRY = [t.structure for t in HEAD_NECK.targets].index("PTV70")


def copy_patient(src_folder, dst_folder):
    """Copy a (read-only) patient folder to a writable one."""
    shutil.copytree(src_folder, dst_folder, copy_function=shutil.copyfile)
    return dst_folder


def write_fake_patient(folder, seed=0, spacing=(4.0, 4.5, 3.0)):
    """A synthetic 128^3 patient in OpenKBP layout (axis0 ant->post, axis1 right->left, axis2 sup->inf).

    Returns the dense arrays written, in OpenKBP axis order.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    shape = OPENKBP_SHAPE
    body = np.zeros(shape, dtype=bool)
    body[30:100, 25:105, 10:120] = True
    ct = np.where(body, rng.integers(900, 1200, size=shape), 0).astype(np.float32)
    ct[60, 60, 60] = 30000.0  # beyond the recommended 4095 clip
    possible = np.zeros(shape, dtype=bool)
    possible[40:90, 40:90, 30:100] = True
    dose = np.where(possible, np.round(rng.uniform(0.5, 75.0, size=shape), 3), 0.0).astype(np.float32)
    structures = {}
    structures["RightParotid"] = np.zeros(shape, dtype=bool)
    structures["RightParotid"][50:58, 35:45, 40:48] = True      # low axis-1 index = patient right
    structures["LeftParotid"] = np.zeros(shape, dtype=bool)
    structures["LeftParotid"][50:58, 85:95, 40:48] = True
    structures["PTV70"] = np.zeros(shape, dtype=bool)
    structures["PTV70"][55:75, 55:75, 50:70] = True
    write_sparse_csv(folder / "ct.csv", ct, value_format="%.1f")
    write_sparse_csv(folder / "dose.csv", dose)
    write_sparse_csv(folder / "possible_dose_mask.csv", possible, mask=True)
    for name, mask in structures.items():
        write_sparse_csv(folder / f"{name}.csv", mask, mask=True)
    np.savetxt(folder / "voxel_dimensions.csv", np.asarray(spacing))
    return {"ct": ct, "dose": dose, "possible": possible, "structures": structures, "spacing": spacing}


@pytest.fixture(scope="module")
def fake_src(tmp_path_factory):
    """Two synthetic patients in a train-pats split folder (no real data needed)."""
    src = tmp_path_factory.mktemp("fake_openkbp")
    arrays = write_fake_patient(src / "train-pats" / "pt_1", seed=1)
    write_fake_patient(src / "train-pats" / "pt_7", seed=7)
    return src, arrays


@pytest.fixture(scope="module")
def imported_real(openkbp_dir, tmp_path_factory):
    """pt_143 and pt_40 copied to a temporary source tree and imported once."""
    root = tmp_path_factory.mktemp("real_openkbp")
    src, dst = root / "src", root / "dst"
    for rel in SMALL_PATIENTS:
        copy_patient(openkbp_dir / rel, src / rel)
    report = import_openkbp(src, dst, progress=False)
    assert report.ok, report.summary()
    return src, dst, report


# --------------------------------------------------------------------------- sparse CSV (no data)


def test_sparse_round_trip_values_and_mask(tmp_path):
    rng = np.random.default_rng(0)
    volume = np.zeros((8, 9, 10), dtype=np.float32)
    chosen = rng.choice(volume.size, size=50, replace=False)
    volume.flat[chosen] = np.round(rng.uniform(-5, 80, size=50), 3)
    write_sparse_csv(tmp_path / "v.csv", volume)
    indices, values = read_sparse_csv(tmp_path / "v.csv", shape=volume.shape)
    assert np.array_equal(indices, np.sort(chosen))
    dense = np.zeros(volume.size, dtype=np.float32)
    dense[indices] = values
    assert np.array_equal(dense.reshape(volume.shape), volume)

    mask = volume != 0
    write_sparse_csv(tmp_path / "m.csv", mask, mask=True)
    indices, values = read_sparse_csv(tmp_path / "m.csv", shape=mask.shape)
    assert values is None
    assert np.array_equal(indices, np.flatnonzero(mask))


def test_sparse_header_only_is_empty(tmp_path):
    (tmp_path / "e.csv").write_text(",data\n")
    indices, values = read_sparse_csv(tmp_path / "e.csv")
    assert indices.size == 0 and values is None


@pytest.mark.parametrize("content, line, words", [
    ("index,data\n1,2.0\n", 1, "bad header"),
    (",data\n1,2.0\n2,3.0\nx7,4.0\n", 4, "not an integer"),
    (",data\n1,2.0\n2.5,3.0\n", 3, "not an integer"),
    (",data\n1,2.0\n2,3.0\n9999999,4.0\n", 4, "out of range"),
    (",data\n1,2.0\n-3,4.0\n", 3, "out of range"),
    (",data\n1,2.0\n2,abc\n", 3, "not a number"),
    (",data\n1,2.0\n2,nan\n", 3, "not finite"),
    (",data\n1,2.0\n2,\n", 3, "empty value"),
    (",data\n1,\n2,5\n", 3, "in a mask file"),
    (",data\n1,\n2,\n3\n", 4, "expected '<index>,<value>'"),
    (",data\n5,1.0\n7,2.0\n7,3.0\n", 4, "strictly increasing"),     # a voxel listed twice
    (",data\n5,\n9,\n\n6,\n", 5, "strictly increasing"),             # out of order (blank line counted)
])
def test_malformed_sparse_csv_names_file_and_line(tmp_path, content, line, words):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(OpenKBPFormatError) as info:
        read_sparse_csv(path)
    message = str(info.value)
    assert "bad.csv" in message and f"line {line}" in message and words in message
    assert info.value.line == line


def test_mask_line_with_trailing_whitespace_is_an_empty_value(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(",data\n5, \n6,\t\r\n9,")
    indices, values = read_sparse_csv(path)
    assert indices.tolist() == [5, 6, 9] and values is None


@pytest.mark.parametrize("name", ["dose.csv", "possible_dose_mask.csv"])
def test_dose_or_possible_dose_file_listing_no_voxel_is_an_error(tmp_path, fake_src, name):
    src, _ = fake_src
    folder = copy_patient(src / "train-pats" / "pt_1", tmp_path / "pt_1")
    (folder / name).write_text(",data\n")
    with pytest.raises(OpenKBPFormatError, match=f"{name}: lists no voxel"):
        read_openkbp_patient(folder)


def test_missing_required_file_is_named(tmp_path, fake_src):
    src, _ = fake_src
    folder = copy_patient(src / "train-pats" / "pt_1", tmp_path / "pt_1")
    (folder / "possible_dose_mask.csv").unlink()
    with pytest.raises(OpenKBPFormatError, match="possible_dose_mask.csv: file not found"):
        read_openkbp_patient(folder)


def test_stored_ct_clipped_to_recommended_range():
    hu = stored_ct_to_hu(np.array([-50.0, 0.0, 1024.0, 4095.0, 25074.0], dtype=np.float32))
    assert hu.tolist() == [-1024.0, -1024.0, 0.0, 3071.0, 3071.0]


def test_structure_sdf_equals_mask_to_sdf():
    mask = np.zeros((40, 36, 30), dtype=bool)
    mask[10:16, 20:27, 0:5] = True  # touches the volume edge
    mask[30, 5, 25] = True
    spacing = (3.0, 2.0, 5.0)
    assert np.array_equal(structure_sdf(mask, spacing), mask_to_sdf(mask, spacing))
    assert np.array_equal(structure_sdf(np.zeros_like(mask), spacing), mask_to_sdf(np.zeros_like(mask), spacing))


# --------------------------------------------------------------------------- fake patients (no data)


def test_fake_patient_read_keeps_openkbp_axes(fake_src):
    src, arrays = fake_src
    patient = read_openkbp_patient(src / "train-pats" / "pt_1")
    assert patient.patient_id == "pt_1"
    assert patient.ct.shape == OPENKBP_SHAPE and patient.ct.dtype == np.float32
    assert np.array_equal(patient.ct, arrays["ct"])
    assert np.array_equal(patient.dose, arrays["dose"])
    assert np.array_equal(patient.possible_dose_mask, arrays["possible"])
    assert sorted(patient.structures) == sorted(arrays["structures"])
    assert patient.voxel_dimensions_mm == arrays["spacing"]


def test_fake_patient_case_conversion(fake_src):
    src, arrays = fake_src
    case = openkbp_to_case(read_openkbp_patient(src / "train-pats" / "pt_1"))
    assert case.case_id == "pt_1" and case.metadata["split"] == "train-pats"
    assert case.spacing_mm == (4.5, 4.0, 3.0)  # (axis1, axis0, axis2)
    assert case.structures == list(HEAD_NECK_STRUCTURES)
    # voxel (i, j, k) of OpenKBP is (x=j, y=i, z=k) of the case
    assert np.array_equal(case.dose[61, 45, 70], arrays["dose"][45, 61, 70])
    assert np.array_equal(case.extras["possible_dose_mask"], arrays["possible"].transpose(1, 0, 2).astype(np.uint8))
    assert np.array_equal(case.mask("PTV70"), arrays["structures"]["PTV70"].transpose(1, 0, 2))
    left_x = np.argwhere(case.mask("LeftParotid"))[:, 0].mean()
    right_x = np.argwhere(case.mask("RightParotid"))[:, 0].mean()
    assert left_x > right_x
    assert 0.0 <= case.ct.min() and case.ct.max() <= 1.0
    assert case.ct[60, 60, 60] == 1.0      # 30000 stored -> clipped to 4095 -> 3071 HU -> top of range
    assert case.ct[0, 0, 0] == 0.0         # unlisted voxel: air
    assert case.metadata["structures_present"] == ["RightParotid", "LeftParotid", "PTV70"]
    assert (case.masks_sdf[HEAD_NECK_STRUCTURES.index("Brainstem")] == SDF_ABSENT).all()


def test_fake_import_is_idempotent_and_reports_bad_patients(fake_src, tmp_path):
    src, _ = fake_src
    work = tmp_path / "src"
    shutil.copytree(src, work, copy_function=shutil.copyfile)
    bad = copy_patient(work / "train-pats" / "pt_1", work / "validation-pats" / "pt_3")
    lines = (bad / "dose.csv").read_text().splitlines(keepends=True)
    lines[4] = "12,not-a-dose\n"
    (bad / "dose.csv").write_text("".join(lines))
    dst = tmp_path / "dst"

    report = import_openkbp(work, dst, progress=False)
    assert sorted(p.relative_to(dst).as_posix() for p in report.written) == ["train-pats/pt_1.npz",
                                                                             "train-pats/pt_7.npz"]
    assert list(report.failed) == [str(bad)]
    message = report.failed[str(bad)]
    assert "dose.csv" in message and "line 5" in message and "not a number" in message
    assert not (dst / "validation-pats" / "pt_3.npz").exists()
    case = load_case(dst / "train-pats" / "pt_7.npz")
    assert case.case_id == "pt_7"

    mtime = (dst / "train-pats" / "pt_1.npz").stat().st_mtime_ns
    again = import_openkbp(work, dst, progress=False)
    assert again.written == [] and len(again.skipped) == 2
    assert (dst / "train-pats" / "pt_1.npz").stat().st_mtime_ns == mtime

    forced = import_openkbp(work / "train-pats", tmp_path / "dst2", force=True, progress=False)
    assert sorted(p.name for p in forced.written) == ["pt_1.npz", "pt_7.npz"]
    assert (tmp_path / "dst2" / "pt_1.npz").is_file()  # src is a split folder: no split subfolder


def test_cli_exit_codes(fake_src, tmp_path, capsys):
    src, _ = fake_src
    assert import_main([str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert "2 written" in capsys.readouterr().out
    assert import_main([str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert "2 skipped" in capsys.readouterr().out
    assert import_main([str(tmp_path / "nothing-here"), str(tmp_path / "out")]) == 2
    capsys.readouterr()
    (tmp_path / "a_file").write_text("not a folder\n")
    assert import_main([str(src), str(tmp_path / "a_file"), "--quiet"]) == 2
    assert "a_file exists and is not a folder" in capsys.readouterr().err
    bad = copy_patient(src / "train-pats" / "pt_1", tmp_path / "bad" / "pt_9")
    (bad / "ct.csv").write_text("oops\n1,2\n")
    assert import_main([str(tmp_path / "bad"), str(tmp_path / "out_bad"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "ct.csv, line 1: bad header" in out


# --------------------------------------------------------------------------- real data


def test_real_sparse_counts(openkbp_dir):
    folder = openkbp_dir / "train-pats" / "pt_143"
    for name in ("ct.csv", "dose.csv", "possible_dose_mask.csv", "SpinalCord.csv"):
        n_lines = len((folder / name).read_text().splitlines()) - 1
        indices, values = read_sparse_csv(folder / name)
        assert len(indices) == n_lines
        assert len(np.unique(indices)) == n_lines
    ct_indices, ct_values = read_sparse_csv(folder / "ct.csv")
    patient = read_openkbp_patient(folder)
    assert np.count_nonzero(patient.ct) == np.count_nonzero(ct_values) == len(ct_indices)
    mask_indices, _ = read_sparse_csv(folder / "possible_dose_mask.csv")
    assert patient.possible_dose_mask.sum() == len(mask_indices)
    assert sorted(patient.structures) == ["PTV70", "SpinalCord"]


def test_real_malformed_copy_names_file_and_line(openkbp_dir, tmp_path):
    folder = copy_patient(openkbp_dir / "train-pats" / "pt_143", tmp_path / "pt_143")
    lines = (folder / "SpinalCord.csv").read_text().splitlines(keepends=True)
    lines[10] = "12a,\n"
    (folder / "SpinalCord.csv").write_text("".join(lines))
    with pytest.raises(OpenKBPFormatError, match=r"SpinalCord\.csv, line 11: index '12a' is not an integer"):
        read_openkbp_patient(folder)


def test_real_orientation(imported_real):
    _, dst, _ = imported_real
    case = load_case(dst / "train-pats" / "pt_40.npz")

    def centroid(name):
        return np.argwhere(case.mask(name)).mean(axis=0)

    assert centroid("LeftParotid")[0] > centroid("RightParotid")[0]       # X: right -> left
    assert centroid("Mandible")[1] < centroid("SpinalCord")[1]            # Y: anterior -> posterior
    assert centroid("Brainstem")[2] < centroid("SpinalCord")[2]           # Z: superior -> inferior
    assert case.metadata["split"] == "train-pats" and case.metadata["source"] == "openkbp"
    assert case.spacing_mm == (4.68, 4.68, 3.0)


def test_real_sdf_sign_and_scale(imported_real):
    _, dst, _ = imported_real
    case = load_case(dst / "train-pats" / "pt_40.npz")
    mask = case.mask("SpinalCord")
    sdf = case.masks_sdf[HEAD_NECK_STRUCTURES.index("SpinalCord")]
    assert (sdf[mask] < 0).all() and (sdf[~mask] > 0).all()
    outside_mm = ndimage.distance_transform_edt(~mask, sampling=case.spacing_mm)
    inside_mm = ndimage.distance_transform_edt(mask, sampling=case.spacing_mm)
    inside_voxel = tuple(np.argwhere(mask)[len(np.argwhere(mask)) // 2])
    near = np.argwhere((outside_mm > 10) & (outside_mm < 40))[0]
    assert abs(sdf[inside_voxel]) * SDF_CLIP_MM == pytest.approx(inside_mm[inside_voxel], abs=1e-4)
    assert sdf[tuple(near)] * SDF_CLIP_MM == pytest.approx(outside_mm[tuple(near)], abs=1e-4)
    assert (sdf[outside_mm > SDF_CLIP_MM] == 1.0).all()
    absent = load_case(dst / "train-pats" / "pt_143.npz")
    assert (absent.masks_sdf[HEAD_NECK_STRUCTURES.index("Brainstem")] == SDF_ABSENT).all()


def test_real_constraints_ct_dose(imported_real):
    _, dst, _ = imported_real
    small = load_case(dst / "train-pats" / "pt_143.npz")
    assert small.constraints.shape == (HEAD_NECK.constraint_dim,)
    assert small.constraints[PTV63_ENTRY] == 0.0 and small.constraints[PTV70_ENTRY] == 1.0
    assert small.metadata["structures_present"] == ["SpinalCord", "PTV70"]
    full = load_case(dst / "train-pats" / "pt_40.npz")
    assert full.constraints[PTV63_ENTRY] == pytest.approx(63 / 70)
    for case in (small, full):
        assert case.ct.min() == 0.0 and case.ct.max() <= 1.0
        assert 60.0 < case.dose.max() < 90.0
        possible = case.extras["possible_dose_mask"].astype(bool)
        assert case.extras["possible_dose_mask"].dtype == np.uint8
        assert (case.dose[~possible] == 0).all()
        assert (case.mask("PTV70") <= possible).all()


def test_real_import_is_idempotent(imported_real):
    src, dst, first = imported_real
    assert len(first.written) == 2
    again = import_openkbp(src, dst, progress=False)
    assert again.written == [] and len(again.skipped) == 2 and again.ok
