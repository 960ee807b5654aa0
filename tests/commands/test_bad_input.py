"""Bad input answered in one line, exit 2, before anything starts: damaged study files and data
folders (each case found by trying them as a new user would), the same for
`python -m apollo_ray.train` and `python -m apollo_ray.data prepare`, and a fuzz test that
draws more damage (Hypothesis; `HYPOTHESIS_PROFILE=deep` for a longer run by hand)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_study
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apollo_ray.data.__main__ import main as data_main
from apollo_ray.study.schema import StudyConfig
from apollo_ray.train import main as train_main
from apollo_ray.tune import main as tune_main

NOBODY = "127.0.0.1:9"  # a Ray address nothing answers: bad input let through would reach it


def a_study(root: Path, gpt_data: Path) -> tuple[Path, dict[str, Any], Path]:
    """A valid study in `root` (the tiny one) on its own copy of the prepared data: (its file,
    its dict, the data folder)."""
    data = root / "data"
    shutil.copytree(gpt_data, data)
    path = tiny_study(root, data)
    return path, yaml.safe_load(path.read_text()), data


def shard(data: Path, index: int = 0) -> Path:
    """The `index`th training shard of prepared data."""
    return (
        data
        / json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"][index][
            "file"
        ]
    )


def edit_manifest(data: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    """The one line a refused command printed (asserted: exit 2, one `error:` line on stderr,
    no traceback)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "pydantic" not in err, err
    return err


def set_field(study: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = study
    for key in parents:
        node = node[key]
    node[leaf] = value


# (what is damaged, how, what the one line must say)
CASES: list[tuple[str, Callable[[Path, dict[str, Any], Path], None], list[str]]] = [
    (
        "a study file that is not text",
        lambda path, study, data: path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 20),
        ["not a text file"],
    ),
    (
        "output_dir naming a file",
        lambda path, study, data: (
            (path.parent / "a-file").write_text("x"),
            set_field(study, "output_dir", str(path.parent / "a-file")),
        ),
        ["output_dir:", "a-file is a file, not a folder"],
    ),
    (
        "an infinite learning rate",
        lambda path, study, data: set_field(study, "base.train.lr", float("inf")),
        ["base.train.lr:", "finite"],
    ),
    (
        "more steps than any run takes",
        lambda path, study, data: set_field(study, "base.train.steps", 10**15),
        ["base.train.steps:", "less than or equal to 1000000000"],
    ),
    (
        "a deleted training shard",
        lambda path, study, data: shard(data).unlink(),
        ["base.data.path:", ".arrow: missing; prepare again"],
    ),
    (
        "a training shard truncated to 100 bytes",
        lambda path, study, data: shard(data).write_bytes(shard(data).read_bytes()[:100]),
        ["base.data.path:", ".arrow: not an Arrow shard", "prepare again"],
    ),
    (
        "a manifest whose vocab_size disagrees",
        lambda path, study, data: edit_manifest(data, lambda m: m.update(vocab_size=3)),
        ["base.data.path:", "vocab_size 3, but its tokenizer tokenizer.json has"],
    ),
    (
        "a tokenizer that is not JSON",
        lambda path, study, data: (data / "tokenizer.json").write_text("{not json"),
        ["base.data.path:", "tokenizer.json: not a tokenizers JSON file"],
    ),
    (
        "a manifest naming a shard outside the folder",
        lambda path, study, data: edit_manifest(
            data, lambda m: m["splits"]["train"]["shards"][0].update(file="../../../etc/passwd")
        ),
        ["manifest.json: splits.train.shards.0.file: not a plain file name", "prepare again"],
    ),
]


@pytest.mark.parametrize(("damage", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_damaged_study_or_data_folder_is_one_line_before_anything_starts(
    tmp_path, gpt_data, capsys, damage, expected
):
    path, study, data = a_study(tmp_path, gpt_data)
    damage(path, study, data)
    if path.read_bytes().isascii():  # not the binary file: the study as edited
        path.write_text(yaml.safe_dump(study))
    before = snapshot(data)
    # as a user runs it: were the checks to let it through, the study would start MLflow and
    # reach for Ray at an address where nothing answers
    err = refused(capsys, tune_main([str(path), "--address", NOBODY]))
    for text in expected:
        assert text in err, (text, err)
    assert snapshot(data) == before
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_a_run_refuses_damaged_data_in_one_line(tmp_path, gpt_data, capsys):
    _, study, data = a_study(tmp_path, gpt_data)
    run = {**study["base"], "name": "r", "out_dir": str(tmp_path / "r")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(run))
    shard(data).write_bytes(b"\x00" * 64)
    err = refused(capsys, train_main([str(tmp_path / "r.yaml"), "--no-track"]))
    assert "data.path:" in err and "not an Arrow shard" in err
    (tmp_path / "r.yaml").write_bytes(b"\xff\xfe\x00")
    assert "not a text file" in refused(capsys, train_main([str(tmp_path / "r.yaml")]))


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.parquet", b"PAR1 this is not parquet", "bad.parquet: cannot be read as parquet"),
        ("bad.txt", b"ok text\n\n" * 50 + b"\xff\xfe broken", "bad.txt: not UTF-8 text"),
        ("bad.jsonl", b'{"text": "\xff"}\n', "bad.jsonl: not UTF-8 text"),
    ],
)
def test_prepare_refuses_a_corrupted_source_in_one_line(tmp_path, capsys, name, content, expected):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    argv = ["prepare", str(tmp_path / name), "--out", str(out), "--kind", "gpt"]
    assert expected in refused(capsys, data_main([*argv, "--vocab-size", "300"]))
    assert not out.exists() or not any(out.iterdir())


def test_prepare_refuses_an_unreadable_tokenizer_in_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one document\n\nanother one\n\na third\n")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    out = tmp_path / "out"
    argv = ["prepare", str(tmp_path / "a.txt"), "--out", str(out), "--kind", "gpt"]
    err = refused(capsys, data_main([*argv, "--tokenizer", str(tmp_path / "tokenizer.json")]))
    assert "tokenizer.json: not a tokenizers JSON file" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_parquet_source_is_read_when_it_is_one(tmp_path, capsys):
    """The check above refuses damage, not Parquet: a real file prepares."""
    table = pa.table({"text": [f"document number {i} " * 20 for i in range(30)]})
    pq.write_table(table, tmp_path / "a.parquet")
    out = tmp_path / "out"
    argv = ["prepare", str(tmp_path / "a.parquet"), "--out", str(out), "--kind", "gpt"]
    assert data_main([*argv, "--vocab-size", "300"]) == 0, capsys.readouterr().err
    assert (out / "manifest.json").exists()


# --- the fuzz test ---------------------------------------------------------------------------


def leaves(node: Any, path: tuple = ()) -> list[tuple]:
    """The paths of a study dict's values, mappings and lists included; not inside a `choice`
    (its values are whatever the searched field takes)."""
    found = [path] if path else []
    if isinstance(node, dict) and "choice" not in path:
        for key, value in node.items():
            found += leaves(value, (*path, key))
    elif isinstance(node, list) and "choice" not in path:
        for i, value in enumerate(node):
            found += leaves(value, (*path, i))
    return found


def required(path: tuple) -> bool:
    """Whether the study field at `path` (mapping keys only) must be given."""
    model: Any = StudyConfig
    for key in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or key not in fields:
            return False
        field = fields[key]
        if key == path[-1]:
            return field.is_required()
        model = field.annotation
    return False


def damaged_study(study: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    """`study` with one field broken as `draw` chooses: a value of another type, a number out
    of range or not finite, a required key missing, or an unknown key."""
    study = copy.deepcopy(study)
    paths = leaves(study)
    kind = draw(st.sampled_from(["type", "number", "missing", "extra"]))
    if kind == "missing":
        keys = [p for p in paths if isinstance(p[-1], str) and required(p)]
        path = draw(st.sampled_from(keys))
    else:
        path = draw(st.sampled_from(paths))
    *parents, leaf = path
    node = study
    for key in parents:
        node = node[key]
    value = node[leaf]
    if kind == "missing":
        del node[leaf]
    elif kind == "extra":
        target = value if isinstance(value, dict) else node if isinstance(node, dict) else study
        target[draw(st.sampled_from(["bogus", "lr ", "Steps", "schedule.bogus"]))] = {"x": 1}
    elif kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        node[leaf] = draw(st.sampled_from([float("inf"), float("-inf"), float("nan"), -(10**18)]))
    else:
        node[leaf] = draw(st.sampled_from([{"x": [1]}, [{"y": None}]]))
    return study


def damage_folder(data: Path, draw: st.DrawFn) -> None:
    """One file of prepared data deleted, truncated at a drawn length or overwritten with drawn
    bytes."""
    victim = draw(st.sampled_from(sorted(p.name for p in data.iterdir())))
    path = data / victim
    content = path.read_bytes()
    how = draw(st.sampled_from(["delete", "truncate", "overwrite"]))
    if how == "delete":
        path.unlink()
    elif how == "truncate":  # shorter than its content (trailing whitespace is not content)
        path.write_bytes(content[: draw(st.integers(0, len(content.rstrip()) - 1))])
    else:
        path.write_bytes(draw(st.binary(min_size=0, max_size=256)))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_every_damage_is_one_line_and_changes_nothing(gpt_data, capsys, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path, study, folder = a_study(root, gpt_data)
        if data.draw(st.booleans(), label="damage the study (else the data)"):
            path.write_text(yaml.safe_dump(damaged_study(study, data.draw)))
        else:
            damage_folder(folder, data.draw)
        before = snapshot(folder)
        rc = tune_main([str(path), "--check"])
        err = refused(capsys, rc)
        assert str(path) in err or "base.data.path" in err or str(folder) in err, err
        assert snapshot(folder) == before
        assert not (root / "outputs").exists()  # no MLflow store, no study folder
