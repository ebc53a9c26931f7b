import json

import pytest

from blobenc.errors import ConfigError, ReportError
from blobenc.files import atomic_path, read_json, write_json


def test_atomic_path_replaces_whole_or_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"v": ')  # half written, then a failure
        raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"v": 1} and list(tmp_path.iterdir()) == [path]
    write_json(tmp_path / "sub" / "b.json", [1, 2])  # its folder made
    assert read_json(tmp_path / "sub" / "b.json") == [1, 2]


def test_read_json_names_the_file_in_the_error_class_asked_for(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON"):
        read_json(bad)
    with pytest.raises(ReportError, match=r"missing.json: file not found"):
        read_json(tmp_path / "missing.json", ReportError)
