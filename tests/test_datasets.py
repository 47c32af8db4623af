"""HF ``datasets`` sources beside JSONL (save_to_disk, parquet, hf:NAME), column mapping, and streaming."""

from __future__ import annotations

from pathlib import Path

import pytest

from opdistill.data.examples import (
    Example,
    JsonlSource,
    LazyExampleStream,
    open_source,
    read_examples,
    read_jsonl,
    write_jsonl,
)
from opdistill.data.tasks import corpus_text, load_task
from opdistill.errors import UserError

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

ROWS = [{"prompt": f"{i}+{i}=", "answer": 2 * i, "id": f"p{i}"} for i in range(23)]
EXAMPLES = [Example(prompt=f"{i}+{i}=", answer=str(2 * i), id=f"p{i}") for i in range(23)]


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """Nothing from (or into) the user's HF cache: a hub name resolves against an empty one."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _jsonl(tmp_path, examples=EXAMPLES):
    write_jsonl(examples, tmp_path / "d.jsonl")
    return str(tmp_path / "d.jsonl")


def test_save_to_disk_parquet_csv_and_json_read_like_jsonl(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    table.save_to_disk(tmp_path / "saved")
    table.to_parquet(tmp_path / "d.parquet")
    table.to_csv(tmp_path / "d.csv", index=False)
    table.to_json(tmp_path / "d.json", lines=False)  # one JSON array: read by the datasets json builder
    for spec in ("saved", "d.parquet", "d.csv", "d.json"):
        assert read_examples(str(tmp_path / spec)) == EXAMPLES, spec
    assert read_examples(_jsonl(tmp_path)) == EXAMPLES == read_jsonl(tmp_path / "d.jsonl")
    chat = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}]
    datasets.Dataset.from_list(chat).to_parquet(tmp_path / "chat.parquet")
    assert read_examples(str(tmp_path / "chat.parquet")) == [
        Example(prompt=(("system", "be brief"), ("user", "hi")))
    ]


def test_splits_default_to_train_and_test_or_are_named(tmp_path):
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:20]), test=datasets.Dataset.from_list(ROWS[20:])
    )
    splits.save_to_disk(tmp_path / "dd")
    task = load_task(train_file=str(tmp_path / "dd"), eval_file=str(tmp_path / "dd"))
    assert task.test == EXAMPLES[20:] and sorted(task.train.batch(0, 20), key=EXAMPLES.index) == EXAMPLES[:20]
    assert read_examples(f"hf:{tmp_path / 'dd'}:test") == EXAMPLES[20:]
    with pytest.raises(UserError, match=r"has no split validation \(splits: train, test\); name one as hf:"):
        read_examples(f"hf:{tmp_path / 'dd'}:validation")
    (tmp_path / "files").mkdir()  # a directory of data files: load_dataset names splits by file
    datasets.Dataset.from_list(ROWS[:20]).to_parquet(tmp_path / "files" / "train.parquet")
    datasets.Dataset.from_list(ROWS[20:]).to_parquet(tmp_path / "files" / "test.parquet")
    files = load_task(train_file=str(tmp_path / "files"), eval_file=str(tmp_path / "files"))
    assert files.test == EXAMPLES[20:]


def test_column_mapping(tmp_path):
    rows = [{"question": r["prompt"], "solution": r["answer"], "source": "gen"} for r in ROWS]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "q.parquet")
    columns = {"prompt": "question", "answer": "solution"}
    expected = [Example(prompt=ex.prompt, answer=ex.answer) for ex in EXAMPLES]
    assert read_examples(str(tmp_path / "q.parquet"), columns) == expected  # other columns ignored
    with pytest.raises(UserError, match=r"has no column 'prompt' \(columns: question, solution, source\)"):
        read_examples(str(tmp_path / "q.parquet"))
    (tmp_path / "q.jsonl").write_text(
        '{"question": "1+1=", "solution": "2"}\n{"question": "2", "sol": "4"}\n'
    )
    with pytest.raises(UserError, match=r"q.jsonl:2: unknown field 'sol'; fields are .*question.*solution"):
        read_examples(str(tmp_path / "q.jsonl"), columns)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"prompt": "", "answer": 1}, "row 2: field 'prompt' must be a non-empty string"),
        ({"prompt": None, "answer": 1}, "row 2: field 'prompt' is missing"),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "row 2: field 'prompt'[0]: role must be"),
    ],
)
def test_malformed_row_names_dataset_row_and_field(tmp_path, bad, message):
    good = {"prompt": "a" if not isinstance(bad["prompt"], list) else [{"role": "user", "content": "a"}]}
    rows = [good, good, bad]  # one column type per table: chat rows beside chat rows
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(UserError) as err:
        read_examples(str(tmp_path / "bad.parquet"))
    assert f"{tmp_path / 'bad.parquet'} [train] {message}" in str(err.value)


def test_a_mapped_field_is_named_by_its_column(tmp_path):
    datasets.Dataset.from_list([{"question": "a", "solution": [1]}]).to_parquet(tmp_path / "q.parquet")
    with pytest.raises(UserError, match=r"row 0: field 'solution' \(data.columns answer\) must be a string"):
        read_examples(str(tmp_path / "q.parquet"), {"prompt": "question", "answer": "solution"})


def test_a_hub_name_is_never_downloaded(tmp_path):
    with pytest.raises(UserError, match="local HF cache only"):
        read_examples("hf:someone/not-cached:train")
    with pytest.raises(UserError, match="does not exist .*hf:NAME"):
        read_examples("someone/not-cached")
    with pytest.raises(UserError, match="must look like hf:NAME"):
        read_examples("hf:a:b:c:d")


def _batches(stream, steps, size=4, start=0):
    return [stream.batch(step, size) for step in range(start, steps)]


def test_streaming_is_a_function_of_seed_and_index_and_covers_each_epoch(tmp_path):
    source = JsonlSource(Path(_jsonl(tmp_path)))
    stream = LazyExampleStream(source, seed=3, buffer=5)
    batches = _batches(stream, 15)  # 60 examples: two full epochs of 23 and part of a third
    assert batches == _batches(LazyExampleStream(JsonlSource(source.path), seed=3, buffer=5), 15)
    resumed = LazyExampleStream(JsonlSource(source.path), seed=3, buffer=5)
    assert _batches(resumed, 15, start=7) == batches[7:]  # a resumed run skips ahead to the same examples
    assert stream.batch(2, 4) == batches[2]  # and reading back is allowed
    flat = [ex for batch in batches for ex in batch]
    for epoch in range(2):
        assert sorted(flat[23 * epoch : 23 * (epoch + 1)], key=EXAMPLES.index) == EXAMPLES
    assert flat[:23] != EXAMPLES and flat[:23] != flat[23:46]  # shuffled, differently each epoch
    other_seed = LazyExampleStream(JsonlSource(source.path), seed=4, buffer=5)
    assert _batches(other_seed, 3) != batches[:3]
    # a dataset streamed from parquet, with the same rows in the same order, gives the same batches
    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "d.parquet")
    assert _batches(LazyExampleStream(open_source(str(tmp_path / "d.parquet")), 3, 5), 15) == batches
    # a save_to_disk table knows its size, so a resumed reader jumps straight to the right epoch
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    saved = LazyExampleStream(open_source(str(tmp_path / "saved")), 3, 5)
    assert saved.length == 23 and _batches(saved, 15, start=12) == batches[12:]


def test_streamed_task_and_its_errors(tmp_path):
    task = load_task(train_file=_jsonl(tmp_path), streaming=True, shuffle_buffer=100, seed=1)
    assert isinstance(task.train, LazyExampleStream)
    assert sorted(task.train.batch(0, 23), key=EXAMPLES.index) == EXAMPLES  # buffer >= N: a full shuffle
    assert list(corpus_text(task)) == [ex.text() for ex in EXAMPLES]
    limited = load_task(train_file=_jsonl(tmp_path), streaming=True, n_train_prompts=3, seed=1)
    assert [limited.train[i] for i in range(6)] == [task.train[i] for i in range(3)] * 2
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:20] + ['{"prompt": 5}'] + lines[20:]) + "\n")
    stream = LazyExampleStream(JsonlSource(tmp_path / "bad.jsonl"), seed=1, buffer=100)  # checked when read
    with pytest.raises(UserError, match=r"bad.jsonl:21: field 'prompt' must be a non-empty string"):
        stream.batch(0, 24)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no examples"):
        LazyExampleStream(JsonlSource(tmp_path / "empty.jsonl"), seed=1)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.columns.promt=question", "data.columns maps example fields (prompt, answer, completion"),
        ("data.columns.prompt=", "data.columns maps example fields"),
        ("data.shuffle_buffer=0", "data.shuffle_buffer and data.pool_size must be at least 1"),
    ],
)
def test_bad_data_options_name_the_fix(override, message):
    from opdistill.config import load_config

    with pytest.raises(UserError) as err:
        load_config(None, ["data.train_file=d.parquet", override])
    assert message in str(err.value)
    config = load_config(
        None, ["data.train_file=d.parquet", "data.columns.prompt=question", "data.streaming=true"]
    )
    assert config.data.columns == {"prompt": "question"} and config.data.streaming


def test_opd_eval_reads_the_evaluation_split_of_a_dataset(tmp_path, capsys):
    """A dataset with only a test split evaluates (opd eval needs no training split)."""
    import json

    from opdistill.cli import app
    from opdistill.cli.demo import asset_dir

    rows = [{"prompt": f"{1000 + i}+{2000 + i}=", "answer": 3000 + 2 * i} for i in range(6)]
    datasets.DatasetDict(test=datasets.Dataset.from_list(rows)).save_to_disk(tmp_path / "only-test")
    code = app.main(
        [
            "eval",
            "--model",
            str(asset_dir("addition-teacher")),
            "--data",
            str(tmp_path / "only-test"),
            "--max-new-tokens",
            "52",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["greedy_acc"] >= 5 / 6  # the teacher is right ~99% of the time
