"""Every kind of bad input gives a DataFormatError naming the file, the row/key and the problem."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hsoftmax.data.samples import MHSA_KEYS, build_samples, load_mhsa
from hsoftmax.data.sources import load_dir
from hsoftmax.data.staypoints import (
    DataFormatError,
    read_locations,
    read_staypoints,
    vocabulary_coordinates,
)

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
    with pytest.raises(
        DataFormatError, match=r"l\.csv: duplicate location id with different coordinates on line 3"
    ):
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
    with pytest.raises(
        DataFormatError, match=r"sample 0 key 'X' must be a 1-D numeric array of whole numbers"
    ):
        load_mhsa(_pk(tmp_path, [_sample(X=np.array(["a", "b", "c"]))]))
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


# ---------------------------------------------------------------- MHSA pickles as MHSA writes them


def test_pickle_float_whole_numbers_accepted(tmp_path):
    # MHSA writes dur_X as float64 (total_seconds() // 60 read back from a CSV)
    exact = _sample()
    floats = _sample(dur_X=np.array([60.0, 30.0, 600.0]), Y=np.float64(3.0))
    a = load_mhsa(_pk(tmp_path, [exact]), as_sampleset=True)
    b = load_mhsa(_pk(tmp_path, [floats], name="f.pk"), as_sampleset=True)
    for k in MHSA_KEYS[:-1]:
        np.testing.assert_array_equal(a[0][k], b[0][k])
        assert b[0][k].dtype == np.int64
    assert b[0]["Y"] == 3


def test_pickle_non_integral_values(tmp_path):
    p = _pk(tmp_path, [_sample(), _sample(dur_X=np.array([60.0, 12.5, 600.0]))])
    with pytest.raises(
        DataFormatError,
        match=r"s\.pk: sample 1 key 'dur_X' has non-integral value 12\.5 \(whole numbers "
        r"expected; 1 such values in total\)",
    ):
        load_mhsa(p)
    p = _pk(tmp_path, [_sample(), _sample(), _sample(start_min_X=np.array([1.0, np.nan, 2.0]))])
    with pytest.raises(DataFormatError, match=r"sample 2 key 'start_min_X' has non-integral value"):
        load_mhsa(p)
    with pytest.raises(DataFormatError, match=r"sample 0 key 'Y' must be a whole number, got 2\.5"):
        load_mhsa(_pk(tmp_path, [_sample(Y=2.5)]))


def _variant(d, name, samples=None, splits=("train", "validation", "test")):
    d.mkdir(exist_ok=True)
    for split in splits:
        _pk(d, samples or [_sample()], name=f"{name}{split}.pk")


def test_mhsa_variant_lacking_a_split(tmp_path):
    _variant(tmp_path, "geolife_transformer_7_", splits=("train", "test"))
    with pytest.raises(
        DataFormatError,
        match=r"MHSA sample set 'geolife_transformer_7' lacks its validation pickle "
        r"\(geolife_transformer_7_validation\.pk\)",
    ):
        load_dir(tmp_path, previous_day=7, progress=False)


def test_mhsa_two_files_for_one_split(tmp_path):
    _variant(tmp_path, "x_")
    _pk(tmp_path, [_sample()], name="x_valid.pk")
    with pytest.raises(
        DataFormatError, match=r"two validation pickles for sample set 'x': x_valid\.pk and "
    ):
        load_dir(tmp_path, progress=False)


def test_mhsa_same_previous_day_twice(tmp_path):
    _variant(tmp_path, "geolife_transformer_7_")
    _variant(tmp_path, "geolife_lstm_7_")
    with pytest.raises(
        DataFormatError,
        match=r"2 MHSA sample sets with previous_day=7: geolife_lstm_7 \(previous_day 7\), "
        r"geolife_transformer_7 \(previous_day 7\); keep one of them",
    ):
        load_dir(tmp_path, previous_day=7, progress=False)


def test_mhsa_unnamed_variant_checked_against_previous_day(tmp_path):
    _variant(tmp_path, "", samples=[_sample(diff=np.array([5, 1, 0]))])
    data = load_dir(tmp_path, previous_day=5, progress=False)
    assert len(data.train) == 1 and not data.has_coordinates
    with pytest.raises(
        DataFormatError,
        match=r"samples of \(no prefix\) reach back 5 days, more than "
        r"data.previous_day=2",
    ):
        load_dir(tmp_path, previous_day=2, progress=False)


def test_mhsa_bad_meta(tmp_path):
    _variant(tmp_path, "")
    (tmp_path / "meta.json").write_text('{"n_locations": "many"}')
    with pytest.raises(DataFormatError, match=r"meta\.json: needs an integer n_locations >= 2"):
        load_dir(tmp_path, progress=False)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(DataFormatError, match=r"meta\.json: not valid JSON"):
        load_dir(tmp_path, progress=False)


# --------------------------------------------------------------- trackintel staypoints as written

TI_HEADER = "id,user_id,location_id,started_at,finished_at,is_activity\n"
TI_GOOD = [
    "0,1,5,2021-10-01 08:00:00+07:00,2021-10-01 09:00:00+07:00,True\n",
    "1,1,,2021-10-01 09:10:00+07:00,2021-10-01 09:20:00+07:00,True\n",
    "2,1,6,2021-10-01 10:00:00+07:00,2021-10-01 12:00:00+07:00,False\n",
    "3,2,5,2021-10-01 08:00:00+07:00,2021-10-01 17:30:00+07:00,True\n",
]


def test_noise_and_non_activity_dropped_with_one_line(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hsoftmax.data"):
        sp = read_staypoints(_csv(tmp_path, TI_GOOD, header=TI_HEADER))
    assert list(sp["row"]) == [0, 3] and list(sp["location_id"]) == [5, 5]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1
    assert msgs[0].endswith(
        "sp.csv: dropped 2 of 4 stays: 1 DBSCAN noise (empty location_id), 1 more not activities "
        "(is_activity false)"
    )
    kept_all = read_staypoints(_csv(tmp_path, TI_GOOD, header=TI_HEADER), activities_only=False)
    assert list(kept_all["row"]) == [0, 2, 3]


def test_lines_counted_in_the_file_after_dropping(tmp_path):
    bad = TI_GOOD + ["4,x,6,2021-10-02 08:00:00+07:00,2021-10-02 09:00:00+07:00,True\n"]
    with pytest.raises(DataFormatError, match=r"column 'user_id' must hold integers; line 6: 'x'"):
        read_staypoints(_csv(tmp_path, bad, header=TI_HEADER))


def test_bad_activity_flag(tmp_path):
    bad = TI_GOOD[:1] + ["1,1,5,2021-10-01 09:10:00,2021-10-01 09:20:00,maybe\n"]
    with pytest.raises(
        DataFormatError,
        match=r"sp\.csv: column 'is_activity' must hold True/False; line 3: 'maybe'",
    ):
        read_staypoints(_csv(tmp_path, bad, header=TI_HEADER))


def test_only_noise_left(tmp_path):
    noise = [TI_GOOD[1], TI_GOOD[2]]
    with pytest.raises(
        DataFormatError,
        match=r"sp\.csv: no staypoint left: 1 of 2 have an empty location_id \(DBSCAN noise\), "
        r"1 more are not activities",
    ):
        read_staypoints(_csv(tmp_path, noise, header=TI_HEADER))


# ------------------------------------------------------------------------------ directory loading


def test_load_dir_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data path .*nowhere does not exist"):
        load_dir(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"no staypoints\.csv and no MHSA pickles"):
        load_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"notes\.txt is a file; give a staypoint CSV"):
        load_dir(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"previous_day must be an integer >= 1, got 0"):
        load_dir(tmp_path, previous_day=0)
    for name in ("a_staypoints.csv", "b_staypoints.csv"):
        _csv(tmp_path, GOOD, name=name)
    with pytest.raises(
        DataFormatError,
        match=r"several \*staypoints\*\.csv files and no staypoints\.csv: "
        r"\['a_staypoints\.csv', 'b_staypoints\.csv'\]",
    ):
        load_dir(tmp_path)


def test_vocabulary_coordinates_errors():
    import pandas as pd

    table = pd.DataFrame({"loc": [2, 9], "lat": [1.0, 2.0], "lon": [3.0, 4.0]})
    with pytest.raises(
        DataFormatError, match=r"x: location table row 1: loc 9 is not an encoded id in \[0, 5\)"
    ):
        vocabulary_coordinates(table, 5, source="x")
    empty = pd.DataFrame({"loc": [2], "lat": [np.nan], "lon": [np.nan]})
    with pytest.raises(
        DataFormatError, match=r"no location has coordinates .* use a tree that needs none"
    ):
        vocabulary_coordinates(empty, 5)
    xy = vocabulary_coordinates(table.iloc[:1], 4)
    assert xy.shape == (4, 2) and np.all(xy == [1.0, 3.0])


def test_bad_id_map_files(tmp_path):
    from hsoftmax.data.samples import load_id_maps

    (tmp_path / "vocab_locations.csv").write_text("loc,id,lat,lon\n2,10,1.0,2.0\n7,11,1.0,2.0\n")
    (tmp_path / "vocab_users.csv").write_text("user,id\n1,101\n")
    with pytest.raises(
        DataFormatError,
        match=r"vocab_locations\.csv: row 1: loc '7' is not an encoded id in \[1, 4\)",
    ):
        load_id_maps(tmp_path, n_locations=4)
    (tmp_path / "vocab_users.csv").write_text("who,id\n1,101\n")
    with pytest.raises(DataFormatError, match=r"vocab_users\.csv: needs columns 'user' and 'id'"):
        load_id_maps(tmp_path, n_locations=8)


def test_own_samples_dir_with_broken_companions(tmp_path):
    import json

    import pandas as pd

    from hsoftmax.data.samples import load_preset

    data = load_preset("small", seed=0, cache_dir=tmp_path / "cache", progress=False)
    d = tmp_path / "mhsa"
    data.write_mhsa(d)
    assert load_dir(d, progress=False).n_locations == data.n_locations
    vocab = pd.read_csv(d / "vocab_locations.csv")
    vocab.drop(columns=["loc"]).to_csv(d / "vocab_locations.csv", index=False)
    with pytest.raises(
        DataFormatError, match=r"vocab_locations\.csv: missing column\(s\) \['loc'\]"
    ):
        load_dir(d, progress=False)
    vocab.assign(loc=vocab["loc"] + data.n_locations).to_csv(d / "vocab_locations.csv", index=False)
    with pytest.raises(DataFormatError, match=r"row 0: loc \d+ is not a location id in \[0, "):
        load_dir(d, progress=False)
    vocab.to_csv(d / "vocab_locations.csv", index=False)
    (d / "meta.json").write_text(json.dumps({"n_locations": 3}))
    with pytest.raises(
        DataFormatError, match=r"train\.pk: sample \d+ key '(X|Y)' has value \d+ out"
    ):
        load_dir(d, progress=False)


@pytest.mark.parametrize("value", [0, -2, 1.5, "seven", True])
def test_load_dir_previous_day_and_min_history_checked(tmp_path, value):
    with pytest.raises(ValueError, match=rf"previous_day must be an integer >= 1, got {value!r}"):
        load_dir(tmp_path, previous_day=value)
    with pytest.raises(ValueError, match=rf"min_history must be an integer >= 1, got {value!r}"):
        load_dir(tmp_path, min_history=value)
