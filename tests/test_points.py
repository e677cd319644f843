"""Named operating points (docs/FORMAT.md sections 2 and 3): the grammar and every rejection on
tiny GGUFs written by tests/ggufs.py, attach / stamp round trips byte for byte, inspect and the
CLI; then FirstModel on a tiny runnable FiRST-GGUF (each point runs exactly the configuration it
names, logits bit for bit), and one slow test on the real default model's shipped points.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType as T

import ggufs
from first_gguf import constants as C
from first_gguf import format as fmt
from first_gguf.cli import cli
from first_gguf.errors import FirstError, FormatError
from first_gguf.format.points import Point, Points, parse_spec

# docs/FORMAT.md section 2: first.points array[string], first.points.default string
POINT_TYPES = {C.KEY_POINTS: (T.ARRAY, T.STRING), C.KEY_POINTS_DEFAULT: (T.STRING, None)}
JSON_POINTS = {"default": "quality", "points": {"quality": {"skip": [1]}, "fast": {"threshold": 0.35}}}


def _first_file(path: Path, points: list[str] | None = None, default: str | None = None,
                protected: list[int] | None = None, types: dict | None = None) -> Path:
    """A tiny FiRST-GGUF (3 layers, protected 0 and 2) with these first.points values, written directly."""
    kv = ggufs.base_kv() | ggufs.first_kv()
    types = POINT_TYPES | (types or {})
    if protected is not None:
        kv[C.KEY_PROTECTED_LAYERS] = (protected, T.ARRAY, T.INT32)
    if points is not None:
        kv[C.KEY_POINTS] = (points, *types[C.KEY_POINTS])
    if default is not None:
        kv[C.KEY_POINTS_DEFAULT] = (default, *types[C.KEY_POINTS_DEFAULT])
    tensors = ggufs.base_tensors() | ggufs.router_tensors(ggufs.random_router_arrays())
    from first_gguf.format.writer import CopyWriter

    with pytest.MonkeyPatch.context() as mp:  # gguf-py's writer refuses empty arrays; the copy writer writes them
        mp.setattr(ggufs.gguf, "GGUFWriter", CopyWriter)
        return ggufs.write_gguf(path, kv, tensors)


# --- the grammar ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, point", [
    ("fast=threshold:0.35", Point("fast", threshold=0.35)),
    ("a=threshold:0", Point("a", threshold=0.0)),
    ("b-2=threshold:1", Point("b-2", threshold=1.0)),
    ("quality=skip:4", Point("quality", skip=(4,))),
    ("balanced=skip:4,9,10", Point("balanced", skip=(4, 9, 10))),
    ("healed=skip:4,9;heal:qwen.skip-4-9.heal.gguf", Point("healed", skip=(4, 9), heal="qwen.skip-4-9.heal.gguf")),
    ("fast=threshold:0.5;thin:0,1,2", Point("fast", threshold=0.5, thin=(0, 1, 2))),
    ("lean=thin:" + ",".join(map(str, range(24))), Point("lean", thin=tuple(range(24)))),
    ("mid=skip:4;thin:0,1,2,3,5", Point("mid", skip=(4,), thin=(0, 1, 2, 3, 5))),
    ("warm=skip:3,4;warmup:3", Point("warm", skip=(3, 4), warmup=3)),
    ("w=threshold:0.5;thin:1,2;warmup:12;vocab", Point("w", threshold=0.5, thin=(1, 2), warmup=12, vocab=True)),
    ("h=skip:4;heal:h.gguf;warmup:1", Point("h", skip=(4,), heal="h.gguf", warmup=1)),
    ("t=thin:0,1;warmup:4096", Point("t", thin=(0, 1), warmup=4096)),
])
def test_spec_parses_and_writes_back_the_same_string(spec, point):
    assert parse_spec(spec, "f") == point and point.spec() == spec
    assert fmt.load_points({"points": {point.name: point.as_json()}}, 24, [0, 23]).items == (point,)
    assert fmt.load_points(Points((point,)), 24, [0, 23], thin_layers=range(24)).items == (point,)


def test_thin_masks_and_kinds():
    lean, mid, fast = Point("lean", thin=(0, 2)), Point("mid", skip=(1,), thin=(2,)), Point("f", threshold=0.5)
    assert (lean.kind, mid.kind, fast.kind, Point("f", threshold=0.5, thin=(1,)).kind) == (
        "thin", "skip", "threshold", "threshold")
    assert lean.mask(3) == [True, True, True] and lean.thin_mask(3) == [True, False, True]  # mask mode, nothing skipped
    assert mid.mask(3) == [True, False, True] and mid.thin_mask(3) == [False, False, True]
    assert fast.mask(3) is None and fast.thin_mask(3) is None
    assert lean.as_json() == {"thin": [0, 2]} and mid.as_json() == {"skip": [1], "thin": [2]}
    with pytest.raises(FormatError, match=r"^points: point 'x': a point is a threshold, a skip set, thin layers or "
                                          r"the short vocabulary$"):
        fmt.load_points(Points((Point("x"),)), 3, [0])
    with pytest.raises(FormatError, match=r"^points: point 'x': a point is a threshold or a skip set, not both$"):
        fmt.load_points(Points((Point("x", threshold=0.5, skip=(1,)),)), 3, [0])


def test_thresholds_are_written_without_exponent():
    for t, text in ((1e-5, "0.00001"), (0.5, "0.5"), (1, "1"), (0.1 + 0.2, "0.30000000000000004")):
        spec = Point("p", threshold=t).spec()
        assert spec == f"p=threshold:{text}" and parse_spec(spec, "f").threshold == float(t)


def test_a_file_with_points_is_valid_and_reads_them_in_order(tmp_path):
    path = _first_file(tmp_path / "m.gguf", ["quality=skip:1", "fast=threshold:0.35"], "fast")
    fmt.validate_first_gguf(path)
    points = fmt.read_points(path)
    assert points == Points((Point("quality", skip=(1,)), Point("fast", threshold=0.35)), "fast")
    assert points.names == ["quality", "fast"] and points.get("fast").threshold == 0.35 and points.get("x") is None
    assert points.metadata() == {C.KEY_POINTS: ["quality=skip:1", "fast=threshold:0.35"], C.KEY_POINTS_DEFAULT: "fast"}
    no_default = _first_file(tmp_path / "n.gguf", ["fast=threshold:0.35"])
    assert fmt.read_points(no_default).default is None
    assert fmt.read_points(ggufs.write_first(tmp_path / "plain-first.gguf")) == Points()


BAD_SPECS = {  # entry of a 3-layer file, protected layers 0 and 2 -> message after "<file>: "
    "no =": ("quality", r"first\.points entry 'quality': expected NAME=threshold:T or NAME=skip:"),
    "unknown kind": ("q=mask:1", r"entry 'q=mask:1': expected NAME=threshold:T"),
    "no colon": ("q=skip", r"entry 'q=skip': expected NAME="),
    "threshold .5": ("q=threshold:.5", r"entry 'q=threshold:\.5': threshold '\.5' is not a decimal in \[0, 1\]"),
    "threshold exponent": ("q=threshold:5e-1", r"threshold '5e-1' is not a decimal"),
    "threshold nan": ("q=threshold:nan", r"threshold 'nan' is not a decimal"),
    "threshold negative": ("q=threshold:-0.5", r"threshold '-0\.5' is not a decimal"),
    "threshold 1.5": ("q=threshold:1.5", r"point 'q=threshold:1\.5': threshold 1\.5 outside \[0, 1\]$"),
    "skip nothing": ("q=skip:", r"entry 'q=skip:': skip '' is not a comma-separated list of layer numbers"),
    "skip leading zero": ("q=skip:01", r"skip '01' is not a comma-separated list"),
    "skip space": ("q=skip:1, 2", r"skip '1, 2' is not a comma-separated list"),
    "skip descending": ("q=skip:1,0", r"point 'q=skip:1,0': layers \[1, 0\] must be ascending and distinct$"),
    "skip twice": ("q=skip:1,1", r"layers \[1, 1\] must be ascending and distinct$"),
    "skip out of range": ("q=skip:1,3", r"point 'q=skip:1,3': layer 3 outside 0\.\.2$"),
    "skip protected": ("q=skip:0,1", r"skips protected layers \[0\] \(first\.router\.protected_layers always run\)$"),
    "heal on a threshold": ("q=threshold:0.5;heal:h.gguf", r"only a skip point takes ';heal:FILE\.gguf'$"),
    "heal on a thin point": ("q=thin:1;heal:h.gguf", r"only a skip point takes ';heal:FILE\.gguf'$"),
    "heal with thin": ("q=skip:1;thin:2;heal:h.gguf", r"unexpected 'heal:h\.gguf': .* for a skip point without thin"),
    "heal before thin": ("q=skip:1;heal:h.gguf;thin:2", r"unexpected 'thin:2'"),
    "thin twice": ("q=thin:1;thin:2", r"unexpected 'thin:2'"),
    "thin nothing": ("q=thin:", r"entry 'q=thin:': thin '' is not a comma-separated list of layer numbers"),
    "thin space": ("q=skip:1;thin:1, 2", r"thin '1, 2' is not a comma-separated list"),
    "thin descending": ("q=thin:1,0", r"point 'q=thin:1,0': thin layers \[1, 0\] must be ascending and distinct$"),
    "thin out of range": ("q=thin:3", r"point 'q=thin:3': thin layer 3 outside 0\.\.2$"),
    "thin and skip overlap": ("q=skip:1;thin:1", r"point 'q=skip:1;thin:1': layers \[1\] are both skipped and thinned$"),
    "thin without thin FFNs": ("q=thin:1", r"point 'q=thin:1': thin layers \[1\] carry no thinned FFN "
                                           r"\(first\.thin\.layers absent\)$"),
    "unknown suffix": ("q=skip:1;foo:h.gguf", r"unexpected 'foo:h\.gguf': the main part may be followed by ';thin:"),
    "warmup 0": ("q=skip:1;warmup:0", r"warmup '0' is not a whole number of decode steps from 1 \(e\.g\. 3\)$"),
    "warmup leading zero": ("q=skip:1;warmup:03", r"warmup '03' is not a whole number"),
    "warmup empty": ("q=skip:1;warmup:", r"warmup '' is not a whole number"),
    "warmup too long": ("q=skip:1;warmup:4097", r"point 'q=skip:1;warmup:4097': warmup 4097 must be a whole number "
                                               r"of decode steps in 1\.\.4096$"),
    "warmup after vocab": ("q=skip:1;vocab;warmup:2", r"unexpected 'vocab'"),
    "warmup before thin": ("q=threshold:0.5;warmup:2;thin:1", r"unexpected 'thin:1'"),
    "warmup before heal": ("q=skip:1;warmup:2;heal:h.gguf", r"unexpected 'heal:h\.gguf'"),
    "warmup twice": ("q=skip:1;warmup:2;warmup:3", r"unexpected 'warmup:3'"),
    "warmup alone": ("q=warmup:2", r"entry 'q=warmup:2': expected NAME=threshold:T"),
    "heal with a directory": ("q=skip:1;heal:../h.gguf", r"heal '\.\./h\.gguf' is not a file name ending in \.gguf"),
    "heal not gguf": ("q=skip:1;heal:h.bin", r"heal 'h\.bin' is not a file name ending in \.gguf"),
    "heal empty": ("q=skip:1;heal:", r"heal '' is not a file name"),
    "upper-case name": ("Q=skip:1", r"point 'Q=skip:1': name 'Q' must match \[a-z0-9\]\[a-z0-9-\]\*"),
    "name starts with -": ("-q=skip:1", r"name '-q' must match"),
    "underscore in name": ("q_1=skip:1", r"name 'q_1' must match"),
    "empty name": ("=skip:1", r"name '' must match"),
    "long name": ("a" * 33 + "=skip:1", r"name 'a{33}' must match .* \(at most 32 characters\)$"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_a_bad_entry_is_refused_naming_file_and_entry(tmp_path, case):
    spec, message = BAD_SPECS[case]
    path = _first_file(tmp_path / "m.gguf", ["ok=threshold:0.5", spec])
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: .*{message}"):
        fmt.validate_first_gguf(path)
    info = fmt.inspect_gguf(path)
    assert info["first"]["points"] == ["ok=threshold:0.5", spec] and info["first"]["valid"].startswith(str(path))


BAD_FILES = {  # first.points, first.points.default, other changes -> message after "<file>: "
    "two points, one name": (["q=skip:1", "q=threshold:0.5"], None, {},
                             r"point 'q=threshold:0\.5': a second point named 'q'$"),
    "empty list": ([], None, {}, r"first\.points is empty; leave the key out instead$"),
    "default names no point": (["q=skip:1"], "fast", {},
                               r"first\.points\.default is 'fast', not one of the points \(q\)$"),
    "default alone": (None, "q", {}, r"first\.points\.default without first\.points$"),
    "every layer": (["all=skip:0,1,2"], None, {"protected": []}, r"point 'all=skip:0,1,2': skips every layer"),
    "points a string": ("q=skip:1", None, {"types": {C.KEY_POINTS: (T.STRING, None)}},
                        r"first\.points has type STRING, expected ARRAY\[STRING\]$"),
    "points of ints": ([1], None, {"types": {C.KEY_POINTS: (T.ARRAY, T.INT32)}},
                       r"first\.points has type ARRAY\[INT32\], expected ARRAY\[STRING\]$"),
    "default u32": (["q=skip:1"], 0, {"types": {C.KEY_POINTS_DEFAULT: (T.UINT32, None)}},
                    r"first\.points\.default has type UINT32, expected STRING$"),
    "misspelt key": (None, None, {}, r"unknown key first\.point "),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_point_keys_are_refused(tmp_path, case):
    points, default, extra, message = BAD_FILES[case]
    path = _first_file(tmp_path / "m.gguf", points, default, **extra)
    if case == "misspelt key":
        kv = ggufs.base_kv() | ggufs.first_kv() | {"first.point": (["q=skip:1"], T.ARRAY, T.STRING)}
        path = ggufs.write_gguf(path, kv, ggufs.base_tensors() | ggufs.router_tensors(ggufs.random_router_arrays()))
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        fmt.validate_first_gguf(path)


BAD_JSON = {  # the JSON object -> message after "<file>: "
    "not an object": ([], r"expected \{\"default\": NAME, \"points\""),
    "no points": ({"default": "q"}, r"expected \{\"default\""),
    "extra top-level key": ({"points": {}, "fast": {}}, r"expected \{\"default\""),
    "default not a string": ({"default": 1, "points": {"q": {"skip": [1]}}}, r"default is 1, expected a point's name$"),
    "both kinds": ({"points": {"q": {"skip": [1], "threshold": 0.5}}}, r"point 'q': expected \{\"threshold\": T\}"),
    "neither": ({"points": {"q": {}}}, r"point 'q': expected"),
    "heal with threshold": ({"points": {"q": {"threshold": 0.5, "heal": "h.gguf"}}}, r"point 'q': expected"),
    "threshold a string": ({"points": {"q": {"threshold": "0.5"}}}, r"point 'q': threshold '0\.5' is not a number$"),
    "threshold true": ({"points": {"q": {"threshold": True}}}, r"point 'q': threshold True is not a number$"),
    "threshold 2": ({"points": {"q": {"threshold": 2}}}, r"point 'q=threshold:2': threshold 2\.0 outside \[0, 1\]$"),
    "skip an int": ({"points": {"q": {"skip": 1}}}, r"point 'q': skip 1 is not a list of layer numbers$"),
    "skip of bools": ({"points": {"q": {"skip": [True]}}}, r"point 'q': skip \[True\] is not a list of layer numbers$"),
    "skip unsorted": ({"points": {"q": {"skip": [9, 4]}}}, r"point 'q=skip:9,4': layers \[9, 4\] must be ascending"),
    "skip empty": ({"points": {"q": {"skip": []}}}, r"point 'q=skip:': skips no layer \(that is mode full\)$"),
    "heal not a string": ({"points": {"q": {"skip": [4], "heal": 3}}}, r"point 'q': heal 3 is not a file name$"),
    "thin with heal": ({"points": {"q": {"skip": [4], "thin": [5], "heal": "h.gguf"}}}, r"point 'q': expected"),
    "thin not a list": ({"points": {"q": {"thin": 1}}}, r"point 'q': thin 1 is not a list of layer numbers$"),
    "thin empty": ({"points": {"q": {"thin": []}}}, r"point 'q=thin:': thins no layer; leave thin out instead$"),
    "warmup alone": ({"points": {"q": {"warmup": 3}}}, r"point 'q': a point is a threshold, a skip set, thin layers"),
    "warmup with vocab alone": ({"points": {"q": {"vocab": True, "warmup": 3}}},
                                r"point 'q=warmup:3;vocab': a warm-up needs a threshold, skip set or thin layers"),
    "warmup a string": ({"points": {"q": {"skip": [4], "warmup": "3"}}},
                        r"point 'q': warmup '3' is not a whole number of decode steps from 1 \(or left out\)$"),
    "warmup 0": ({"points": {"q": {"skip": [4], "warmup": 0}}}, r"point 'q': warmup 0 is not a whole number"),
    "warmup true": ({"points": {"q": {"skip": [4], "warmup": True}}}, r"point 'q': warmup True is not a whole"),
    "thin overlaps skip": ({"points": {"q": {"skip": [4], "thin": [4, 5]}}},
                           r"point 'q=skip:4;thin:4,5': layers \[4\] are both skipped and thinned$"),
    "bad name": ({"points": {"Fast": {"threshold": 0.5}}}, r"point 'Fast=threshold:0\.5': name 'Fast' must match"),
    "default names no point": ({"default": "x", "points": {"q": {"skip": [4]}}},
                               r"first\.points\.default is 'x', not one of the points \(q\)$"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_json_is_refused_naming_file_and_point(tmp_path, case):
    data, message = BAD_JSON[case]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        fmt.load_points(path, 24, [0, 23])


def test_unreadable_json_is_one_clear_error(tmp_path):
    with pytest.raises(FormatError, match=r"nope\.json: no such file$"):
        fmt.load_points(tmp_path / "nope.json", 24, [0, 23])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FormatError, match=r"bad\.json: not a JSON file"):
        fmt.load_points(tmp_path / "bad.json", 24, [0, 23])


def test_router_files_carry_no_points(tmp_path):
    from safetensors.numpy import load_file, save_file

    routers = fmt.make_identity_routers(3, 64, hidden_size=8)
    tensors = load_file(fmt.save_router_file(routers, tmp_path / "r.safetensors"))
    meta = {k: json.dumps(v) for k, v in routers.metadata().items()} | {C.KEY_POINTS: json.dumps(["q=skip:1"])}
    save_file(tensors, tmp_path / "p.safetensors", metadata=meta)
    with pytest.raises(FormatError, match=r"p\.safetensors: unknown key first\.points "):
        fmt.load_router_file(tmp_path / "p.safetensors")


# --- writing: attach --points and stamping -------------------------------------------------

def _kv_and_tensors(path: Path, without: tuple[str, ...] = ()) -> tuple[list, list]:
    """Every KV (name, raw bytes) but ``without`` and GGUF.*, and every tensor (name, type, bytes)."""
    import gguf

    r = gguf.GGUFReader(path)
    kv = [(f.name, ggufs.kv_raw(f)) for f in r.fields.values()
          if not f.name.startswith("GGUF.") and f.name not in without]
    return kv, [(t.name, t.tensor_type, t.data.tobytes()) for t in r.tensors]


def test_attach_with_points_equals_attach_then_stamp_byte_for_byte(tiny_base, tmp_path):
    routers = fmt.make_identity_routers(3, 64, hidden_size=8)
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(JSON_POINTS))
    hashes = ggufs.sha256(tiny_base), ggufs.sha256(json_file)
    with_points = fmt.attach_routers(tiny_base, routers, tmp_path / "a.gguf", points=json_file)
    plain = fmt.attach_routers(tiny_base, routers, tmp_path / "b.gguf")
    stamped = fmt.stamp_points(plain, JSON_POINTS, tmp_path / "c.gguf")
    assert ggufs.sha256(with_points) == ggufs.sha256(stamped)
    assert fmt.read_points(stamped).as_json() == JSON_POINTS
    # everything but the two keys is the file without points, bytes and order
    assert _kv_and_tensors(stamped, C.POINT_KEYS) == _kv_and_tensors(plain)
    cleared = fmt.stamp_points(stamped, None, tmp_path / "d.gguf")
    assert ggufs.sha256(cleared) == ggufs.sha256(plain) and fmt.read_points(cleared) == Points()
    restamped = fmt.stamp_points(stamped, {"points": {"fast": {"threshold": 0.5}}}, tmp_path / "e.gguf")
    assert fmt.read_points(restamped) == Points((Point("fast", threshold=0.5),))
    assert _kv_and_tensors(restamped, C.POINT_KEYS) == _kv_and_tensors(plain)
    assert (ggufs.sha256(tiny_base), ggufs.sha256(json_file)) == hashes
    # an eval run directory binds a file by its size without points (stamping keeps it valid)
    from first_gguf.format.points import size_without_points

    size = plain.stat().st_size
    assert size_without_points(plain) == size and stamped.stat().st_size != size
    assert size_without_points(stamped) == size_without_points(restamped) == size


def test_stamp_and_attach_refuse_bad_points_and_outputs_before_writing(tiny_base, tmp_path):
    routers = fmt.make_identity_routers(3, 64, hidden_size=8)
    plain = fmt.attach_routers(tiny_base, routers, tmp_path / "a.gguf")
    with pytest.raises(FormatError, match=r"^points: point 'q=skip:0': skips protected layers \[0\]"):
        fmt.stamp_points(plain, {"points": {"q": {"skip": [0]}}}, tmp_path / "b.gguf")
    with pytest.raises(FormatError, match=r"^points: point 'q=skip:3': layer 3 outside 0\.\.2$"):
        fmt.attach_routers(tiny_base, routers, tmp_path / "b.gguf", points={"points": {"q": {"skip": [3]}}})
    with pytest.raises(FirstError, match="would overwrite the input"):
        fmt.stamp_points(plain, JSON_POINTS, plain)
    with pytest.raises(FirstError, match="exists; pass --force"):
        fmt.stamp_points(plain, JSON_POINTS, tiny_base)
    with pytest.raises(FormatError, match=r"base\.gguf: not a FiRST-GGUF"):
        fmt.stamp_points(tiny_base, JSON_POINTS, tmp_path / "c.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def test_reattaching_routers_drops_the_old_points_unless_given(tiny_base, tmp_path):
    routers = fmt.make_identity_routers(3, 64, hidden_size=8)
    with_points = fmt.attach_routers(tiny_base, routers, tmp_path / "a.gguf", points=JSON_POINTS)
    assert fmt.read_points(fmt.attach_routers(with_points, routers, tmp_path / "b.gguf")) == Points()
    again = fmt.attach_routers(with_points, routers, tmp_path / "c.gguf", points=fmt.read_points(with_points))
    assert ggufs.sha256(again) == ggufs.sha256(with_points)


def test_inspect_shows_the_points(tiny_base, tmp_path):
    routers = fmt.make_identity_routers(3, 64, hidden_size=8)
    path = fmt.attach_routers(tiny_base, routers, tmp_path / "a.gguf", points=JSON_POINTS)
    info = json.loads(json.dumps(fmt.inspect_gguf(path)))
    assert info["first"]["points"] == ["quality=skip:1", "fast=threshold:0.35"]
    assert info["first"]["points_default"] == "quality" and info["first"]["valid"] is True
    lines = fmt.format_inspect(info).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("points"))
    assert lines[at:at + 2] == ["points        quality=skip:1 (default)", "              fast=threshold:0.35"]
    plain = fmt.inspect_gguf(fmt.attach_routers(tiny_base, routers, tmp_path / "b.gguf"))
    assert plain["first"]["points"] is None and not any(line.startswith("points") for line in
                                                        fmt.format_inspect(plain).splitlines())


def _run(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_cli_attach_points_and_stamp(tiny_base, tmp_path):
    routers = tmp_path / "r.safetensors"
    fmt.save_router_file(fmt.make_identity_routers(3, 64, hidden_size=8), routers)
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(JSON_POINTS))
    code, out, err = _run("attach", tiny_base, routers, "-o", tmp_path / "a.gguf", "--points", json_file)
    assert code == 0, err
    code, out, err = _run("inspect", tmp_path / "a.gguf")
    assert code == 0 and "points        quality=skip:1 (default)" in out
    code, out, err = _run("points", tmp_path / "a.gguf")
    assert code == 0 and json.loads(out) == JSON_POINTS
    code, out, err = _run("attach", tiny_base, routers, "-o", tmp_path / "b.gguf")
    assert code == 0, err
    code, out, err = _run("points", tmp_path / "b.gguf", "--set", json_file, "-o", tmp_path / "c.gguf")
    assert code == 0 and Path(out.strip()) == tmp_path / "c.gguf", err
    assert ggufs.sha256(tmp_path / "c.gguf") == ggufs.sha256(tmp_path / "a.gguf")
    code, out, err = _run("points", tmp_path / "c.gguf", "--clear", "-o", tmp_path / "d.gguf")
    assert code == 0 and ggufs.sha256(tmp_path / "d.gguf") == ggufs.sha256(tmp_path / "b.gguf"), err
    code, out, err = _run("points", tmp_path / "d.gguf")
    assert code == 0 and json.loads(out) == {"points": {}}
    code, out, err = _run("points", tmp_path / "a.gguf", "--set", json_file)
    assert code != 0 and "-o" in err
    code, out, err = _run("points", tmp_path / "a.gguf", "--set", json_file, "--clear", "-o", tmp_path / "e.gguf")
    assert code != 0 and "either --set or --clear" in err
    code, out, err = _run("points", tmp_path / "a.gguf", "-o", tmp_path / "e.gguf")
    assert code != 0 and "--set" in err


# --- the zoo ---------------------------------------------------------------------------------

def test_first_gguf_path_carries_the_shipped_points_and_follows_their_changes(tiny_base, tmp_path, monkeypatch):
    """shipped.first_gguf_path on a stand-in zoo model (the tiny base): the committed points file is
    attached, the cached FiRST-GGUF is reused while it matches and rebuilt when the points change."""
    from first_gguf import shipped

    points_file = tmp_path / "tiny.points.json"
    points_file.write_text(json.dumps(JSON_POINTS))
    monkeypatch.setenv("FIRST_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shipped, "fetch", lambda name: tiny_base)
    monkeypatch.setattr(shipped, "shipped_routers", lambda name: None)
    monkeypatch.setattr(shipped, "shipped_routers_path", lambda name: None)
    monkeypatch.setattr(shipped, "shipped_points_path", lambda name: points_file)
    path = shipped.first_gguf_path("tiny")
    assert fmt.read_points(path).as_json() == JSON_POINTS
    mtime = path.stat().st_mtime_ns
    assert shipped.first_gguf_path("tiny") == path and path.stat().st_mtime_ns == mtime  # reused
    points_file.write_text(json.dumps({"points": {"fast": {"threshold": 0.25}}}))
    assert fmt.read_points(shipped.first_gguf_path("tiny")) == Points((Point("fast", threshold=0.25),))
    monkeypatch.setattr(shipped, "shipped_points_path", lambda name: None)
    assert fmt.read_points(shipped.first_gguf_path("tiny")) == Points()


def test_the_shipped_points_file_is_valid_for_its_model():
    from first_gguf import models, shipped

    path = shipped.shipped_points_path(models.DEFAULT_MODEL)
    thin, _, qtype, _ = shipped.shipped_thin(models.DEFAULT_MODEL)
    assert sorted(thin) == list(range(24)) and all(v == list(range(4864)) for v in thin.values()) and qtype == "IQ4_NL"
    points = fmt.load_points(path, 24, [0, 23], thin_layers=sorted(thin), has_vocab=True)
    tokens, _, _ = shipped.shipped_vocab(models.DEFAULT_MODEL)
    assert len(tokens) == 49445 and tokens == sorted(set(tokens))
    assert points.as_json() == {"default": "fast-quality-short", "points": {
        "quality": {"skip": [4]}, "balanced": {"skip": [3, 4]}, "balanced-warm": {"skip": [3, 4], "warmup": 3},
        "fast": {"thin": list(range(24))},
        "short": {"vocab": True}, "quality-short": {"skip": [4], "vocab": True},
        "fast-short": {"thin": list(range(24)), "vocab": True},
        "fast-quality-short": {"skip": [4], "thin": [i for i in range(24) if i != 4], "vocab": True}}}


def test_the_1_5b_ships_points_from_its_own_damage_labels_and_the_shared_vocabulary():
    from first_gguf import shipped
    from first_gguf.damage import damage_order, read_labels

    name = "qwen2.5-coder-1.5b-instruct"
    head, rows = read_labels(shipped.shipped_labels_path(name))
    assert head["config"]["model"] == f"{name}.gguf" and len(rows) == 48
    order = damage_order(rows, 28, [0, 27])
    assert shipped.shipped_thin(name) is None
    points = fmt.load_points(shipped.shipped_points_path(name), 28, [0, 27], has_vocab=True)
    assert points.default == "quality-short"
    by_name = {p.name: p for p in points.items}
    # the fixed points skip the least damaging layers by the labels, in their order
    assert by_name["quality"].skip == tuple(order[:1]) and by_name["balanced"].skip == tuple(sorted(order[:2]))
    assert all(by_name[f"{n}-short"].vocab and by_name[f"{n}-short"].skip == by_name[n].skip
               for n in ("quality", "balanced", "routed"))
    assert by_name["routed-short"].threshold == by_name["routed"].threshold == 0.25
    # the two Qwen2.5-Coder models share one tokenizer, hence one counted list; only the 0.5B's
    # rows are requantized (IQ4_NL), the 1.5B's keep the output matrix's bytes
    tokens, source, qtype = shipped.shipped_vocab(name)
    assert (tokens, source) == shipped.shipped_vocab("qwen2.5-coder-0.5b-instruct")[:2] and qtype is None


@pytest.mark.slow
def test_gemma_ships_the_short_vocabulary_as_its_default_point():
    """Gemma 3 270M (tied output matrix, 262,144 tokens) ships one point, `short`, as its default:
    its own counted list with every non-normal token, rows in the output matrix's bytes. On the
    real model the point's greedy tokens are full's up to full's first token outside the list
    (or the prompt), and never one outside them."""
    from first_gguf import shipped
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.greedy import greedy

    name = "gemma-3-270m"
    tokens, source, qtype = shipped.shipped_vocab(name)
    assert len(tokens) == 55615 and tokens == sorted(set(tokens)) and qtype is None and "top 49152" in source
    assert shipped.shipped_thin(name) is None and shipped.shipped_routers_path(name) is None
    points = fmt.load_points(shipped.shipped_points_path(name), 18, [0, 17], has_vocab=True)
    assert points.as_json() == {"default": "short", "points": {"short": {"vocab": True}}}
    path = shipped.first_gguf_path(name)
    assert fmt.read_points(path) == points and fmt.read_vocab(path).tokens == tuple(tokens)
    llm = FirstModel(path, n_ctx=256, n_threads=2)
    try:
        assert llm.point == "short"
        prompt = llm.tokenize(b"def is_palindrome(text: str) -> bool:\n")
        short = greedy(llm, prompt, 32)
        llm.configure(mode="full")
        full = greedy(llm, prompt, 32).tokens
    finally:
        llm.close()
    allowed = set(tokens) | set(prompt)
    k = next((i for i, t in enumerate(full) if t not in allowed), len(full))
    assert short.report.point == "short" and short.report.vocab is not None and set(short.tokens) <= allowed
    assert k >= 8 and short.tokens[:k] == full[:k]
    assert k == len(full) or short.tokens[k] != full[k]


# --- the runtime on a tiny runnable FiRST-GGUF ---------------------------------------------------

PROMPT_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
CONT_TEXT = " and the answer is forty-two, of course."
HEAL_FILE = "tiny.skip-1.heal.gguf"


def _heal_adapter(model, skip: tuple[int, ...], out: Path) -> Path:
    """A healing GGUF for ``skip`` with random (non-zero) B matrices (PEFT, then llama.cpp's converter)."""
    import copy

    import torch

    from first_gguf.format import stamp_heal
    from first_gguf.llama_tools import convert_lora
    from first_gguf.train.heal import HealConfig, attach_adapters

    n_layer = model.config.num_hidden_layers
    pm = attach_adapters(copy.deepcopy(model), HealConfig(skip=skip, rank=2, layers=(2,)), n_layer)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    work = out.parent / "adapter-work"
    pm.save_pretrained(work / "adapter")
    base = pm.get_base_model()
    base.config.architectures = ["Qwen2ForCausalLM"]
    base.config.save_pretrained(work / "config")
    raw = convert_lora(work / "adapter", work / "config", work / "raw.gguf", "f32")
    return stamp_heal(raw, skip, n_layer, "test", out).path


def _model(path: Path, **kw):
    from first_gguf.runtime import FirstModel

    return FirstModel(path, logits_all=True, n_threads=1, n_ctx=128, type_k=0, type_v=0, **kw)  # f32 KV


def _logits(path: Path, tokens, **kw) -> tuple:
    llm = _model(path, **kw)
    try:
        return llm.teacher_forced_logits(*tokens), llm.last_prefill
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(FiRST-GGUF without points, the same with points, (prompt, continuation), threshold of ``fast``).

    Points: one = skip 1, two = skip 1,2 (the default), fast = the threshold between p_1 and p_2
    (so it skips exactly one of them), healed = skip 1 with an adapter beside the file.
    """
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    import tiny_ckpt
    from conftest import spread_routers
    from first_gguf.convert import convert_hf

    work = tmp_path_factory.mktemp("points")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    plain = convert_hf(hf_dir, work / "plain.first.gguf", routers=spread_routers(n_layer, n_embd), outtype="f32")
    llm = _model(plain, mode="first")
    tokens = llm.tokenize(PROMPT_TEXT.encode()), llm.tokenize(CONT_TEXT.encode(), add_bos=False)
    p = llm.prefill(tokens[0]).probs
    llm.close()
    threshold = round((p[1] + p[2]) / 2, 6)
    assert min(p[1], p[2]) < threshold < max(p[1], p[2])
    (work / "out").mkdir()
    _heal_adapter(model, (1,), work / "out" / HEAL_FILE)
    points = {"default": "two", "points": {"one": {"skip": [1]}, "two": {"skip": [1, 2]},
                                           "fast": {"threshold": threshold},
                                           "healed": {"skip": [1], "heal": HEAL_FILE}}}
    with_points = fmt.stamp_points(plain, points, work / "out" / "tiny.first.gguf")
    return plain, with_points, tokens, threshold


def _explicit(tiny) -> dict[str, dict]:
    """Each point's equivalent explicit configuration."""
    plain, path, _, threshold = tiny
    one, two = [True, False, True, True], [True, False, False, True]
    return {"one": dict(mode="mask", mask=one, prefill="full"), "two": dict(mode="mask", mask=two),
            "fast": dict(mode="first", threshold=threshold),
            "healed": dict(mode="mask", mask=one, heal=path.parent / HEAL_FILE)}


@pytest.fixture(scope="module")
def by_point(tiny) -> dict[str, tuple]:
    """Point name -> (logits, PrefillReport) of a fresh model configured by that point."""
    _, path, tokens, _ = tiny
    return {name: _logits(path, tokens, point=name) for name in _explicit(tiny)}


def test_each_point_runs_exactly_what_it_names(tiny, by_point):
    import numpy as np

    _, path, tokens, threshold = tiny
    llm = _model(path)
    assert llm.points.names == ["one", "two", "fast", "healed"] and llm.points.default == "two"
    llm.close()
    for name, kw in _explicit(tiny).items():
        got, rep = by_point[name]
        want, rep_want = _logits(path, tokens, **kw)
        assert np.array_equal(got, want), name
        assert rep.point == name and rep_want.point is None
        assert (rep.mode, rep.mask, rep.healed) == (rep_want.mode, rep_want.mask, rep_want.healed)
    fast = by_point["fast"][1]
    assert fast.threshold == pytest.approx(threshold, abs=1e-7) and len(fast.skipped) == 1
    assert by_point["healed"][1].healed and not by_point["one"][1].healed
    assert not np.array_equal(by_point["healed"][0], by_point["one"][0])  # the adapter acts


def test_the_default_point_applies_when_nothing_is_asked(tiny, by_point):
    import numpy as np

    plain, path, tokens, _ = tiny
    got, rep = _logits(path, tokens)
    assert rep.point == "two" and rep.skipped == (1, 2)
    assert np.array_equal(got, by_point["two"][0])
    for kw in (dict(threshold=0.5), dict(mode="first"), dict(prefill="full")):  # any setting given: no default
        llm = _model(path, **kw)
        assert (llm.mode, llm.point) == ("first", None), kw
        llm.close()
    _, rep_plain = _logits(plain, tokens)  # no points: first at the file's threshold, as before
    assert rep_plain.mode == "first" and rep_plain.point is None and rep_plain.threshold == 0.5


def test_configure_switches_points_in_one_model(tiny, by_point):
    import numpy as np

    _, path, tokens, _ = tiny
    fresh = {name: logits for name, (logits, _) in by_point.items()}
    llm = _model(path, mode="full")
    try:
        for name in ("healed", "one", "fast", "two", "healed", "fast"):
            llm.configure(point=name)
            assert llm.point == name
            assert np.array_equal(llm.teacher_forced_logits(*tokens), fresh[name]), name
            assert llm.last_prefill.point == name
        llm.reset_threshold()  # leaves the threshold point
        assert llm.point is None and llm.teacher_forced_logits(*tokens) is not None
        assert llm.last_prefill.point is None and llm.last_prefill.mode == "first"
        llm.configure(point="one")
        llm.configure(mode="full")
        llm.teacher_forced_logits(*tokens)
        assert llm.point is None and llm.last_prefill.point is None
    finally:
        llm.close()


def test_bad_point_requests_are_clear_errors(tiny, tmp_path, tiny_base):
    import shutil

    plain, path, tokens, _ = tiny
    with pytest.raises(FirstError, match=r"tiny\.first\.gguf: no operating point 'best'; "
                                         r"it has one, two, fast, healed$"):
        _model(path, point="best")
    with pytest.raises(FirstError, match=r"no operating point 'one'; it has no named points$"):
        _model(plain, point="one")
    llm = _model(path)
    try:
        for kw, named in ((dict(mode="first"), "mode"), (dict(threshold=0.5, mask=[True] * 4), "mask, threshold"),
                          (dict(prefill="full"), "prefill"), (dict(heal=True), "heal")):
            with pytest.raises(FirstError, match=rf"point 'one' sets the mode, .* itself; give either the point "
                                                 rf"or {named}$"):
                llm.configure(point="one", **kw)
        assert llm.point == "two"  # a refused call changes nothing
    finally:
        llm.close()
    with pytest.raises(FirstError, match=r"give either the point or mode$"):
        _model(path, point="one", mode="mask")
    lonely = Path(shutil.copy(path, tmp_path / "lonely.first.gguf"))  # its adapter is not beside it
    llm = _model(lonely)
    try:
        with pytest.raises(FirstError, match=rf"lonely\.first\.gguf: point 'healed' is healed by {HEAL_FILE}, "
                                             r"which is not beside it$"):
            llm.configure(point="healed")
    finally:
        llm.close()
    shutil.copy(path.parent / HEAL_FILE, tmp_path / "other.heal.gguf")  # an adapter for skip 1 named by skip 2
    wrong = fmt.stamp_points(lonely, {"points": {"w": {"skip": [2], "heal": "other.heal.gguf"}}}, tmp_path / "w.gguf")
    llm = _model(wrong)
    try:
        with pytest.raises(FirstError, match=r"other\.heal\.gguf: heals skip set \[1\]; point 'w' skips \[2\]$"):
            llm.configure(point="w")
    finally:
        llm.close()
    llm = _model(path, heal=tmp_path / "other.heal.gguf")  # another file for the set of 'healed'
    try:
        with pytest.raises(FirstError, match=r"point 'healed' names .*, but .*other\.heal\.gguf heals skip set \[1\]"):
            llm.configure(point="healed")
    finally:
        llm.close()


WARM = 2  # decode steps at full depth in the warm-up points below


@pytest.fixture(scope="module")
def warm_file(tiny) -> Path:
    """The tiny FiRST-GGUF with warm-up points, beside the healing adapter of ``tiny``."""
    plain, path, _, threshold = tiny
    points = {"points": {"two-warm": {"skip": [1, 2], "warmup": WARM}, "fast-warm": {"threshold": threshold,
                                                                                       "warmup": WARM},
                         "one-warm": {"skip": [1], "warmup": WARM},
                         "healed-warm": {"skip": [1], "heal": HEAL_FILE, "warmup": WARM}}}
    return fmt.stamp_points(plain, points, path.parent / "tiny-warm.first.gguf")


def _switched(path: Path, tokens, first: dict, after: dict) -> np.ndarray:
    """Teacher-forced logits by hand: the prompt under ``first``, the first WARM continuation tokens
    in ``full`` mode, the rest under ``after`` (the mode switched between two decode steps)."""
    prompt, cont = tokens
    llm = _model(path, **first)
    try:
        llm.prefill(prompt)
        llm.configure(mode="full")
        llm.eval(cont[:WARM])
        llm.configure(**after)
        llm.eval(cont[WARM:])
        return np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
    finally:
        llm.close()


def test_a_warmup_point_decodes_its_first_steps_at_full_depth(tiny, warm_file):
    _, _, tokens, threshold = tiny
    n_prompt = len(tokens[0])
    two = [True, False, False, True]
    got, rep = _logits(warm_file, tokens, point="two-warm")
    assert (rep.mode, rep.skipped, rep.warmup, rep.point) == ("mask", (1, 2), WARM, "two-warm")
    assert np.array_equal(got, _switched(warm_file, tokens, dict(mode="mask", mask=two), dict(mode="mask", mask=two)))
    assert np.array_equal(got, _logits(warm_file, tokens, mode="mask", mask=two, warmup=WARM)[0])  # the same by setting
    plain_two = _logits(warm_file, tokens, mode="mask", mask=two)[0]
    full = _logits(warm_file, tokens, mode="full")[0]
    assert not np.allclose(got[n_prompt + WARM:], plain_two[n_prompt + WARM:], atol=1e-3)  # the warm-up changed them
    assert np.allclose(got[:n_prompt + WARM], full[:n_prompt + WARM], atol=1e-5)  # full depth, another batch split

    fast, rep = _logits(warm_file, tokens, point="fast-warm")
    assert rep.mode == "first" and rep.warmup == WARM and len(rep.skipped) == 1  # the routers read the prompt alone
    assert np.array_equal(fast, _switched(warm_file, tokens, dict(mode="first", threshold=threshold),
                                          dict(mode="first")))

    healed, rep = _logits(warm_file, tokens, point="healed-warm")
    one, _ = _logits(warm_file, tokens, point="one-warm")
    assert rep.healed and rep.warmup == WARM
    assert np.array_equal(healed[:n_prompt + WARM], one[:n_prompt + WARM])  # no adapter in the warm-up
    assert not np.allclose(healed[n_prompt + WARM:], one[n_prompt + WARM:], atol=1e-3)  # the adapter after it


def test_warmup_positions_keep_their_kv_for_the_next_prefill(tiny, warm_file):
    """Positions decoded in the warm-up ran every layer, so a later prefill reuses them; those
    decoded under the mask after it are evaluated again."""
    prompt, cont = tiny[2]
    llm = _model(warm_file, point="two-warm")
    try:
        llm.teacher_forced_logits(prompt, cont)
        more = llm.tokenize(b" Next.", add_bos=False)
        rep = llm.extend(more)
        assert rep.n_evaluated == len(cont) - WARM + len(more)
        llm.configure(warmup=0)  # a setting leaves the point, and the warm-up goes
        assert llm.point is None and llm.warmup == 0 and llm.prefill(prompt).warmup == 0
        llm.configure(mode="full", warmup=3)
        assert llm.prefill(prompt).warmup == 0  # full mode has nothing to warm up
        llm.configure(mode="mask", mask=[True, False, True, True], prefill="masked")
        assert llm.prefill(prompt).warmup == 0  # nor a masked prompt (its skipped layers have no KV)
    finally:
        llm.close()


def test_a_branch_of_a_fork_runs_the_warmup_as_a_decode(tiny, warm_file):
    prompt, cont = tiny[2]
    want, _ = _logits(warm_file, (prompt, cont), point="two-warm")
    llm = _model(warm_file, point="two-warm")
    try:
        llm.fork(prompt)
        for _ in range(2):  # each branch starts its warm-up again
            got = llm.branch_logits(cont)
            assert np.allclose(got, want[len(prompt) - 1:len(prompt) - 1 + len(cont)], atol=1e-5)
        llm.configure(mode="mask", mask=[True, False, False, True], prefill="masked")
        llm.fork(prompt)
        masked = _logits(warm_file, (prompt, cont), mode="mask", mask=[True, False, False, True], prefill="masked")[0]
        assert np.allclose(llm.branch_logits(cont), masked[len(prompt) - 1:len(prompt) - 1 + len(cont)], atol=1e-5)
    finally:
        llm.close()


def test_bad_warmup_requests_are_clear_errors(warm_file):
    for bad in (-1, 4097, 1.5, True, "3"):
        with pytest.raises(FirstError, match=r"^warmup .* must be a whole number of decode steps in 0\.\.4096$"):
            _model(warm_file, mode="full", warmup=bad)
    llm = _model(warm_file, mode="full")
    try:
        with pytest.raises(FirstError, match=r"give either the point or warmup$"):
            llm.configure(point="two-warm", warmup=1)
        assert llm.warmup == 0 and llm.point is None
    finally:
        llm.close()


# --- eval: a strategy per point ---------------------------------------------------------------

def test_point_strategies_are_built_named_and_recovered():
    from first_gguf.evaluation.strategies import Controls, build_strategies, strategy_from_name

    points = Points((Point("quality", skip=(4,)), Point("fast", threshold=0.35),
                     Point("healed", skip=(4, 9), heal="h.gguf")), "quality")
    controls = Controls(points={p.name: p for p in points})
    built = build_strategies(24, [0, 23], list(range(1, 23)), (), (), 0, (), controls, points.names)
    assert [s.name for s in built] == ["full", "point:quality", "point:fast", "point:healed"]
    quality, fast, healed = built[1:]
    assert (quality.kind, quality.mode, quality.skip, quality.heal, quality.point) == ("point", "mask", (4,), False,
                                                                                        "quality")
    assert (fast.mode, fast.threshold, fast.skip) == ("first", 0.35, ()) and healed.heal
    assert quality.mask(24) == [i != 4 for i in range(24)] and fast.mask(24) is None
    for s in built:
        assert strategy_from_name(s.name, 24, [0, 23], list(range(1, 23)), controls) == s
    with pytest.raises(FirstError, match=r"no operating point 'best'; the model has quality, fast, healed$"):
        build_strategies(24, [0, 23], [], (), (), 0, (), controls, ["best"])
    with pytest.raises(FirstError, match=r"unknown strategy name 'point:Best'"):
        strategy_from_name("point:Best", 24, [0, 23], [], controls)

    class Recorder:
        n_layer = 24

        def configure(self, **kw):
            self.kw = kw

    llm = Recorder()
    healed.apply(llm)
    assert llm.kw == {"point": "healed"}


def test_a_run_directory_binds_each_point_to_what_its_rows_ran(tmp_path):
    from first_gguf.evaluation.controls import bind_points

    points = Points((Point("quality", skip=(4,)), Point("fast", threshold=0.5)))
    assert bind_points(tmp_path, "m.first.gguf", points, ["quality"]) == {"quality": Point("quality", skip=(4,))}
    assert json.loads((tmp_path / "points.json").read_text()) == {"quality": "quality=skip:4"}
    later = Points((Point("quality", skip=(4, 9)), Point("fast", threshold=0.5)))  # the file changed
    assert bind_points(tmp_path, "m.first.gguf", later, ["fast"]) == {"quality": Point("quality", skip=(4,)),
                                                                      "fast": Point("fast", threshold=0.5)}
    with pytest.raises(FirstError, match=r"point:quality rows ran 'quality=skip:4', the file now says "
                                         r"'quality=skip:4,9': use another --out directory$"):
        bind_points(tmp_path, "m.first.gguf", later, ["quality"])
    with pytest.raises(FirstError, match=r"m\.first\.gguf: no operating point 'x'; it has quality, fast$"):
        bind_points(tmp_path, "m.first.gguf", later, ["x"])


def test_eval_runs_every_point_and_resumes(tiny, tmp_path):
    """`first-gguf eval --strategies points` on the tiny model (teacher-forced and chat tasks): one row
    per point and item, each with the point's skip set; a second command adds nothing."""
    from first_gguf.evaluation.runner import run_eval

    _, path, _, _ = tiny
    opts = dict(tasks=("tf", "chat"), kinds=("points",), ks=(1,), n_per_family=1, n_chat=1, chat_tokens=4,
                cont_tokens=4, n_static=1, threads=1)
    result, _ = run_eval(str(path), tmp_path / "run", **opts)
    names = ["full", "point:one", "point:two", "point:fast", "point:healed"]
    assert list(result["strategies"]) == names
    rows = [json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    skips = {"point:one": [1], "point:two": [1, 2], "point:healed": [1], "full": []}
    for r in rows:
        if r["strategy"] in skips:
            assert r["skipped"] == skips[r["strategy"]], r
        if r["task"] == "chat":
            assert r.get("healed", False) == (r["strategy"] == "point:healed")
    assert {(r["task"], r["strategy"]) for r in rows} == {(t, n) for t in ("tf", "chat") for n in names}
    tf = {r["strategy"]: r for r in rows if r["task"] == "tf"}
    assert tf["point:healed"]["kl"] != tf["point:one"]["kl"]  # the same skip set, healed in the branch too
    n = len(rows)
    run_eval(str(path), tmp_path / "run", **{**opts, "kinds": (), "points": ("one",)})
    assert len((tmp_path / "run" / "rows.jsonl").read_text().splitlines()) == n  # resumed: nothing to do


# --- the real default model ------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_carries_the_shipped_points():
    """first_gguf_path on the real default model (the demo's file, built or rebuilt when it differs
    from the committed data: how the tiny test above covers the build) carries the shipped points,
    FFN copies and short vocabulary; quality-short skips exactly layer 4 in decode with the short
    vocabulary, fast decodes every layer's IQ4_NL copy, and short gives full's greedy tokens."""
    from first_gguf import models, shipped
    from first_gguf.paths import cache_dir
    from first_gguf.runtime.greedy import greedy

    path = shipped.first_gguf_path(models.DEFAULT_MODEL)
    assert path.parent == cache_dir() / "demo"
    thin, source, qtype, attn = shipped.shipped_thin(models.DEFAULT_MODEL)
    want = fmt.load_points(shipped.shipped_points_path(models.DEFAULT_MODEL), 24, [0, 23], thin_layers=sorted(thin),
                           has_vocab=True)
    assert fmt.read_points(path) == want and want.default == "fast-quality-short"
    have = fmt.read_thin(path)
    assert have.source == source and have.qtype == qtype and have.attn == attn and all(list(have.neurons_of(i)) == thin[i] for i in range(24))
    tokens, vocab_source, vocab_type = shipped.shipped_vocab(models.DEFAULT_MODEL)
    assert fmt.read_vocab(path) == fmt.VocabInfo(tuple(tokens), vocab_source, vocab_type)
    from first_gguf.runtime import FirstModel

    llm = FirstModel(path, n_ctx=256, n_threads=1)
    try:
        assert llm.point == "fast-quality-short" and llm.points.names == [
            "quality", "balanced", "balanced-warm", "fast", "short", "quality-short", "fast-short", "fast-quality-short"]
        llm.configure(point="quality-short")
        g = greedy(llm, llm.tokenize(b"def fibonacci(n):"), 4)
        assert g.report.point == "quality-short" and g.report.skipped == (4,) and g.report.mode == "mask"
        assert g.report.vocab is not None and g.report.thin == ()
        llm.configure(point="balanced")
        assert greedy(llm, llm.tokenize(b"def fibonacci(n):"), 2).report.skipped == (3, 4)
        llm.configure(point="balanced-warm")
        report = greedy(llm, llm.tokenize(b"def fibonacci(n):"), 2).report
        assert report.skipped == (3, 4) and report.warmup == 3 and report.point == "balanced-warm"
        llm.configure(point="fast")
        report = greedy(llm, llm.tokenize(b"def fibonacci(n):"), 2).report
        assert report.skipped == () and report.thin == tuple(range(24)) and report.point == "fast"
        llm.configure(point="fast-quality-short")
        report = greedy(llm, llm.tokenize(b"def fibonacci(n):"), 2).report
        assert report.skipped == (4,) and report.thin == tuple(i for i in range(24) if i != 4)
        assert report.vocab is not None
        # the short vocabulary alone: only listed or prompt tokens, and full's greedy tokens (its rows
        # are IQ4_NL, close to the output matrix's) up to full's first token outside them, not past it
        prompt = llm.tokenize(b"def is_palindrome(text: str) -> bool:\n")
        llm.configure(point="short")
        short = greedy(llm, prompt, 24)
        llm.configure(mode="full")
        full = greedy(llm, prompt, 24).tokens
        allowed = set(tokens) | set(prompt)
        k = next((i for i, t in enumerate(full) if t not in allowed), len(full))
        assert short.report.vocab == len(set(prompt) - set(tokens)) and short.report.skipped == ()
        assert k >= 8 and short.tokens[:k] == full[:k] and set(short.tokens) <= allowed
        assert k == len(full) or short.tokens[k] != full[k]  # here full writes " palindrome", not listed
    finally:
        llm.close()
