import json
import pickle

import numpy as np
import pytest
import torch

from blobenc import AlgonautsDataset, DataError, ValidationSplit, open_dataset
from blobenc.data._io import load_label_mapping

REAL_COUNTS = {"subj06": (18978, 20220), "subj08": (18981, 20530)}


def test_reader_full_vertex_counts(full_data):
    ds = AlgonautsDataset(full_data)
    assert list(ds.subjects) == [f"subj{k:02d}" for k in range(1, 9)]
    for name, s in ds.subjects.items():
        lh, rh = REAL_COUNTS.get(name, (19004, 20544))
        assert s.n_vertices == {"lh": lh, "rh": rh}
        assert len(s.fsaverage_masks["lh"]) == 163842
        assert s.fmri("train", "lh").shape == (6, lh)
        assert s.fmri("test", "rh").shape == (3, rh)
        assert s.fmri("train", "lh").dtype == np.float32
    assert ds.group.n_vertices == 39548
    assert ds.group.size == 2 * 163842 and ds.group.surface == "fsaverage"


@pytest.mark.parametrize("name", ["subj06", "subj08"])
def test_group_round_trip_real_counts(full_data, name):
    """Native -> group -> native for the subjects with fewer vertices, at the real counts: every
    native vertex lands on its own fsaverage vertex, and exactly the group vertices outside the
    subject's masks stay missing."""
    ds = AlgonautsDataset(full_data)
    s = ds.subjects[name]
    idx = ds.group_index(name)
    lh, rh = REAL_COUNTS[name]
    assert len(idx) == lh + rh and np.all(np.diff(idx) > 0)
    # group column -> fsaverage vertex, from the masks themselves (lh ids first, rh after 163842)
    fs_lh, fs_rh = (np.flatnonzero(s.fsaverage_masks[h]) for h in ("lh", "rh"))
    np.testing.assert_array_equal(ds.group.index[idx], np.concatenate([fs_lh, fs_rh + 163842]))
    np.testing.assert_array_equal(ds.group.fsaverage_index["lh"][idx[:lh]], fs_lh)
    np.testing.assert_array_equal(ds.group.fsaverage_index["rh"][idx[lh:] - len(ds.group.fsaverage_index["lh"])], fs_rh)
    native = s.fmri_native("train")
    group = np.full((len(native), ds.group.n_vertices), np.nan, dtype=np.float32)
    group[:, idx] = native
    np.testing.assert_array_equal(group[:, idx], native)  # back to native, bit for bit
    missing = np.isnan(group[0])
    assert missing.sum() == 39548 - (lh + rh) > 0
    union = np.zeros(39548, bool)  # the missing vertices are the group's minus the subject's
    union[idx] = True
    np.testing.assert_array_equal(missing, ~union)
    # and every missing vertex belongs to some other subject
    others = np.concatenate([ds.group_index(n) for n in ds.subjects if n != name])
    assert np.isin(np.flatnonzero(missing), others).all()


def test_images_sorted_with_nsd_ids(small_data):
    s = AlgonautsDataset(small_data).subjects["subj01"]
    names = [p.name for p in s.images["train"]]
    assert names == sorted(names) and names[0].startswith("train-0001_nsd-")
    assert [int(n.split("nsd-")[1][:5]) for n in names] == s.nsd_ids["train"].tolist()
    assert list(s.keys["train"]) == [f"nsd-{i:05d}" for i in s.nsd_ids["train"].tolist()]


def test_group_round_trip(small_data):
    ds = AlgonautsDataset(small_data)
    rng = np.random.default_rng(0)
    for name, s in ds.subjects.items():
        idx = ds.group_index(name)
        native = rng.normal(size=(3, s.n_vertices_total))
        group = np.full((3, ds.group.n_vertices), np.nan)
        group[:, idx] = native
        np.testing.assert_array_equal(group[:, idx], native)
        # the vertices a subject lacks stay missing, not zero
        assert np.isnan(group).sum() == 3 * (ds.group.n_vertices - s.n_vertices_total)
    # fsaverage order: lh group vertices come first and are increasing
    idx = ds.group_index("subj01")
    assert np.all(np.diff(idx) > 0)


def test_unique_images_and_shared(small_data):
    ds = AlgonautsDataset(small_data)
    index = ds.unique_images()
    assert len(set(index.keys)) == len(index) and index.keys == sorted(index.keys)
    all_keys = {k for s in ds.subjects.values() for split in ("train", "test") for k in s.keys[split]}
    assert set(index.keys) == all_keys
    # NSD-like: some training images appear for several subjects
    shared = set(ds.subjects["subj01"].keys["train"]) & set(ds.subjects["subj02"].keys["train"])
    assert shared


def test_validation_split_is_by_image(small_data, tmp_path):
    ds = AlgonautsDataset(small_data)
    split = ds.validation_split(0.25, seed=3)
    assert split.val_keys.tolist() == ds.validation_split(0.25, seed=3).val_keys.tolist()
    assert split.val_keys.tolist() != ds.validation_split(0.25, seed=4).val_keys.tolist()
    train_ids, val_ids = set(), set()
    for s in ds.subjects.values():
        tr, va = split.rows(s)
        assert len(tr) + len(va) == len(s.images["train"])
        train_ids |= set(s.nsd_ids["train"][tr].tolist())
        val_ids |= set(s.nsd_ids["train"][va].tolist())
    assert val_ids and not (train_ids & val_ids)
    split.save(tmp_path / "split.json")
    assert ValidationSplit.load(tmp_path / "split.json").val_keys.tolist() == split.val_keys.tolist()


def test_validation_split_files_of_nsd_ids_still_load(small_data, tmp_path):
    """split.json written before image keys held NSD ids: they load as the same split."""
    ds = AlgonautsDataset(small_data)
    split = ds.validation_split(0.25, seed=3)
    ids = [int(k.removeprefix("nsd-")) for k in split.val_keys]
    (tmp_path / "old.json").write_text(json.dumps({"seed": 3, "fraction": 0.25, "val_ids": ids}))
    old = ValidationSplit.load(tmp_path / "old.json")
    for s in ds.subjects.values():
        for a, b in zip(old.rows(s), split.rows(s), strict=True):
            np.testing.assert_array_equal(a, b)


def test_open_dataset_detects_the_layout(small_data, tmp_path):
    assert isinstance(open_dataset(small_data), AlgonautsDataset)
    assert open_dataset(small_data).layout == "algonauts"
    (tmp_path / "neither").mkdir()
    with pytest.raises(DataError, match="neither layout"):
        open_dataset(tmp_path / "neither")
    with pytest.raises(DataError, match="subject 'subj01' is given twice"):
        open_dataset(small_data, subjects=["subj01", "subj01"])


def test_rois_cover_both_hemispheres(small_data):
    s = AlgonautsDataset(small_data).subjects["subj03"]
    labels, names = s.rois()["prf-visualrois"]
    lh, _ = s.roi_labels("prf-visualrois", "lh")
    rh, _ = s.roi_labels("prf-visualrois", "rh")
    np.testing.assert_array_equal(labels, np.concatenate([lh, rh]))
    assert names[1] == "V1v" and s.parts["lh"].sum() == len(lh)


def test_roi_labels_and_mapping(small_data):
    s = AlgonautsDataset(small_data).subjects["subj03"]
    labels, names = s.roi_labels("prf-visualrois", "lh")
    assert labels.shape == (s.n_vertices["lh"],)
    assert names[0] == "Unknown" and names[1] == "V1v"


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_mapping_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mapping_streams.npy"
    np.save(path, np.array(_Evil(), dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"mapping_streams.npy: refuses to unpickle posix.system"):
        load_label_mapping(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("obj", [{"a": 1}, [1, 2], {1: 2}])
def test_mapping_wrong_content(tmp_path, obj):
    path = tmp_path / "mapping_x.npy"
    np.save(path, np.array(obj, dtype=object) if not isinstance(obj, list) else np.array(obj), allow_pickle=True)
    with pytest.raises(DataError, match="expected a dict of ints to strings"):
        load_label_mapping(path)


def test_mapping_raw_pickle_refused(tmp_path):
    path = tmp_path / "mapping_y.npy"
    path.write_bytes(pickle.dumps({1: "V1"}))  # not an .npy at all
    with pytest.raises(DataError, match="mapping_y.npy: not a readable .npy mapping"):
        load_label_mapping(path)


def test_missing_root_and_subject(tmp_path, small_data):
    with pytest.raises(DataError, match="nope: data folder not found"):
        AlgonautsDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no subject folders"):
        AlgonautsDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="subject folder subj09 not found"):
        AlgonautsDataset(small_data, subjects=["subj09"])


def test_missing_file(data_copy):
    (data_copy / "subj02/training_split/training_fmri/rh_training_fmri.npy").unlink()
    with pytest.raises(DataError, match="subj02/training_split/training_fmri/rh_training_fmri.npy: file not found"):
        AlgonautsDataset(data_copy)


def test_fmri_rows_must_match_images(data_copy):
    path = data_copy / "subj01/training_split/training_fmri/lh_training_fmri.npy"
    arr = np.load(path)
    np.save(path, arr[:-1])
    with pytest.raises(DataError, match=r"lh_training_fmri.npy: expected shape \(12, \d+\), found \(11, \d+\)"):
        AlgonautsDataset(data_copy)


def test_nan_in_fmri(data_copy):
    path = data_copy / "subj04/test_split/test_fmri/rh_test_fmri.npy"
    arr = np.load(path)
    arr[2, 5] = np.nan
    np.save(path, arr)
    ds = AlgonautsDataset(data_copy)
    with pytest.raises(DataError, match=r"rh_test_fmri.npy: non-finite values \(first at index \(2, 5\)\)"):
        ds.subjects["subj04"].fmri("test", "rh")


def test_group_targets_of_a_sample_subset_equal_the_full_rows(train_data):
    """The group PCA's subsample reads only its rows: the same values as the full matrix's rows."""
    from blobenc.train.data import SplitTargets
    from blobenc.train.fit import pca_samples

    ds = open_dataset(train_data)
    data = SplitTargets(ds, ds.validation_split(0.1, 0), torch.device("cpu"))
    n = len(data.sets["train"])
    assert pca_samples(n, n, 0) is None
    samples = pca_samples(n, 50, 0)
    assert len(samples) == 50 and (np.diff(samples) > 0).all()
    np.testing.assert_array_equal(data.group_targets("train", samples), data.group_targets("train")[samples])
    np.testing.assert_array_equal(data.observed("train", samples), data.observed("train")[samples])
