"""Every kind of bad input gives a DataFormatError naming the file, the row/key and the problem."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hsoftmax.data.samples import build_samples, load_mhsa
from hsoftmax.data.staypoints import DataFormatError, read_locations, read_staypoints

HEADER = "id,user_id,location_id,started_at,finished_at\n"
GOOD = [
    "0,1,5,2021-10-01T08:00:00+07:00,2021-10-01T09:00:00+07:00\n",
    "1,1,6,2021-10-01T10:00:00+07:00,2021-10-01T12:00:00+07:00\n",
    "2,2,5,2021-10-01 08:00:00,2021-10-01 17:30:00\n",
]


def _csv(tmp_path, lines, header=HEADER, name="sp.csv"):
    p = tmp_path / name
    p.write_text(header + "".join(lines))
    return p


def test_good_file_reads(tmp_path):
    sp = read_staypoints(_csv(tmp_path, GOOD))
    assert list(sp["user_id"]) == [1, 1, 2]
    # wall-clock time is kept (the +07:00 offset is dropped, not converted to UTC)
    assert sp["started_at"].iloc[0].hour == 8
    assert sp["started_at"].dtype.kind == "M"


def test_missing_column(tmp_path):
    p = _csv(tmp_path, ["0,1,5,2021-10-01 08:00\n"], header="id,user_id,location_id,started_at\n")
    with pytest.raises(
        DataFormatError, match=r"sp\.csv: missing required column\(s\) \['finished_at'\]"
    ):
        read_staypoints(p)


def test_wrong_type(tmp_path):
    bad = GOOD + ["3,abc,5,2021-10-02 08:00:00,2021-10-02 09:00:00\n"]
    with pytest.raises(
        DataFormatError, match=r"sp\.csv: column 'user_id' must hold integers; line 5: 'abc'"
    ):
        read_staypoints(_csv(tmp_path, bad))
    bad = GOOD + ["3,1,5.5,2021-10-02 08:00:00,2021-10-02 09:00:00\n"]
    with pytest.raises(DataFormatError, match=r"column 'location_id' must hold integers; line 5"):
        read_staypoints(_csv(tmp_path, bad))


def test_unparseable_timestamp(tmp_path):
    bad = GOOD[:1] + ["1,1,6,yesterday noon,2021-10-01T12:00:00+07:00\n"] + GOOD[2:]
    with pytest.raises(
        DataFormatError,
        match=r"sp\.csv: column 'started_at' has unparseable timestamps on line 3: 'yesterday",
    ):
        read_staypoints(_csv(tmp_path, bad))


def test_empty_timestamp(tmp_path):
    bad = GOOD + ["3,1,6,2021-10-02 08:00:00,\n"]
    with pytest.raises(DataFormatError, match=r"column 'finished_at' is empty on line 5"):
        read_staypoints(_csv(tmp_path, bad))


def test_negative_duration(tmp_path):
    bad = GOOD + ["3,2,6,2021-10-02 10:00:00,2021-10-02 09:00:00\n"]
    with pytest.raises(DataFormatError, match=r"sp\.csv: negative duration .* on line 5"):
        read_staypoints(_csv(tmp_path, bad))


def test_negative_id(tmp_path):
    bad = GOOD + ["3,2,-4,2021-10-02 08:00:00,2021-10-02 09:00:00\n"]
    with pytest.raises(
        DataFormatError, match=r"column 'location_id' has negative ids \(out of range\); line 5: -4"
    ):
        read_staypoints(_csv(tmp_path, bad))


def test_location_id_not_in_locations_table(tmp_path):
    sp = read_staypoints(_csv(tmp_path, GOOD))
    locs = read_locations(_csv(tmp_path, ["5,-7.8,110.3\n"], header="id,lat,lon\n", name="l.csv"))
    with pytest.raises(
        DataFormatError, match=r"sp\.csv: location_id 6 \(line 3\) is not in the locations"
    ):
        build_samples(sp, locations=locs, source=str(tmp_path / "sp.csv"), progress=False)


def test_bad_geometry_and_locations(tmp_path):
    lines = [GOOD[0].rstrip("\n") + ",POINT (110.3 -7.8)\n", GOOD[1].rstrip("\n") + ",nowhere\n"]
    p = _csv(tmp_path, lines, header=HEADER.rstrip("\n") + ",geom\n")
    with pytest.raises(
        DataFormatError, match=r"column 'geom' must hold WKT points .*line 3: 'nowhere'"
    ):
        read_staypoints(p)
    p = _csv(tmp_path, ["1,-7.8,110.3\n", "1,-7.9,110.4\n"], header="id,lat,lon\n", name="l.csv")
    with pytest.raises(DataFormatError, match=r"l\.csv: duplicate location id on line 3"):
        read_locations(p)
    p = _csv(tmp_path, ["1,-7.8\n"], header="id,lat\n", name="l2.csv")
    with pytest.raises(DataFormatError, match=r"l2\.csv: missing coordinates"):
        read_locations(p)
    p = _csv(tmp_path, ["1,-97.8,110.3\n"], header="id,lat,lon\n", name="l3.csv")
    with pytest.raises(DataFormatError, match=r"l3\.csv: lat/lon out of range .* line 2"):
        read_locations(p)


def test_wkt_locations_read(tmp_path):
    p = _csv(tmp_path, ['4,"POINT (110.37 -7.79)"\n'], header="id,center\n", name="l.csv")
    locs = read_locations(p)
    assert locs.loc[0, "lat"] == pytest.approx(-7.79) and locs.loc[0, "lon"] == pytest.approx(
        110.37
    )


def test_empty_file(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(DataFormatError, match=r"empty\.csv: file is empty"):
        read_staypoints(p)


def _sample(n=3, **over):
    s = {
        "X": np.array([2, 3, 2][:n], dtype=np.int64),
        "user_X": np.ones(n, dtype=np.int64),
        "weekday_X": np.zeros(n, dtype=np.int64),
        "start_min_X": np.array([480, 720, 1080][:n], dtype=np.int64),
        "dur_X": np.array([60, 30, 600][:n], dtype=np.int64),
        "diff": np.array([1, 1, 0][:n], dtype=np.int64),
        "Y": 3,
    }
    s.update(over)
    return s


def _pk(tmp_path, obj, name="s.pk"):
    p = tmp_path / name
    with open(p, "wb") as f:
        pickle.dump(obj, f)
    return p


def test_pickle_missing_key(tmp_path):
    bad = _sample()
    del bad["dur_X"]
    p = _pk(tmp_path, [_sample(), bad])
    with pytest.raises(DataFormatError, match=r"s\.pk: sample 1 lacks key\(s\) \['dur_X'\]"):
        load_mhsa(p)


def test_pickle_wrong_container_and_types(tmp_path):
    with pytest.raises(DataFormatError, match=r"s\.pk: expected a list of sample dicts, got dict"):
        load_mhsa(_pk(tmp_path, {"X": []}))
    with pytest.raises(DataFormatError, match=r"sample 0 key 'X' must be a 1-D integer array"):
        load_mhsa(_pk(tmp_path, [_sample(X=np.array([1.5, 2.0, 3.0]))]))
    with pytest.raises(DataFormatError, match=r"sample 0 key 'diff' has length 2, but 'X' has 3"):
        load_mhsa(_pk(tmp_path, [_sample(diff=np.array([1, 0]))]))
    with pytest.raises(DataFormatError, match=r"sample 0 key 'Y' must be an integer"):
        load_mhsa(_pk(tmp_path, [_sample(Y="home")]))
    p = tmp_path / "junk.pk"
    p.write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match=r"junk\.pk: not a readable pickle"):
        load_mhsa(p)


def test_pickle_ids_out_of_range(tmp_path):
    p = _pk(tmp_path, [_sample(), _sample(Y=50)])
    assert len(load_mhsa(p)) == 2  # fine without a vocabulary size
    with pytest.raises(
        DataFormatError, match=r"s\.pk: sample 1 key 'Y' has value 50 out of range \[1, 10\)"
    ):
        load_mhsa(p, n_locations=10)
    p = _pk(tmp_path, [_sample(), _sample(), _sample(X=np.array([2, -1, 3]))])
    with pytest.raises(DataFormatError, match=r"sample 2 key 'X' has value -1 out of range"):
        load_mhsa(p)
    p = _pk(tmp_path, [_sample(weekday_X=np.array([0, 7, 1]))])
    with pytest.raises(
        DataFormatError, match=r"sample 0 key 'weekday_X' has value 7 out of range \[0, 7\)"
    ):
        load_mhsa(p)
