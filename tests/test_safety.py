"""The README's Safety promises, one test per class of defect: no command destroys user data, outputs are locked
and swapped atomically, every bad input is one line and exit 2, nothing is silently skipped or sent to the hub."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moefy import cli
from conftest import write_domain_corpus
from test_errors import assert_one_line_error, leftovers, run_cli

TRAIN_STAGE = {"name": "s", "trainable": "router", "tokens": 2 * 4 * 32, "seq_len": 32, "lr": 1e-3}


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def model(tiny_llama, tmp_path) -> Path:
    return copy_dir(tiny_llama, tmp_path / "dense")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_domain_corpus(tmp_path_factory.mktemp("safety") / "c.jsonl", {"a": "ab ", "d": "012 "},
                               {"a": 6, "d": 6}, {"a": 120, "d": 120}, seed=0)


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"stages": [TRAIN_STAGE]}))
    return path


# -- data loss ---------------------------------------------------------------------------------------------------

def test_build_never_writes_over_its_input(capsys, model, tmp_path):
    before = digest(model)
    code, err = run_cli(capsys, "build", model, "--out", model, "--overwrite", "--experts", "4")
    assert_one_line_error(code, err, "is, contains or lies inside the input")
    code, err = run_cli(capsys, "build", model, "--out", model / "moe", "--experts", "4")
    assert_one_line_error(code, err, "is, contains or lies inside the input")
    code, err = run_cli(capsys, "build", model, "--out", tmp_path, "--overwrite", "--experts", "4")
    assert_one_line_error(code, err, "is, contains or lies inside the input")  # the output would contain the input
    assert digest(model) == before and not leftovers(model) and not leftovers(tmp_path)


def test_train_never_writes_over_its_inputs(capsys, tiny_moe, corpus, recipe, tmp_path):
    moe = copy_dir(tiny_moe, tmp_path / "moe")
    before = digest(moe)
    code, err = run_cli(capsys, "train", moe, "--data", corpus, "--recipe", recipe, "--out", moe, "--overwrite")
    assert_one_line_error(code, err, "is, contains or lies inside the input")
    code, err = run_cli(capsys, "train", moe, "--data", corpus.parent, "--recipe", recipe,
                        "--out", corpus.parent / "run")
    assert_one_line_error(code, err, "is, contains or lies inside the input")
    assert digest(moe) == before


def test_overwrite_keeps_the_old_output_when_inputs_are_bad(capsys, model, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_cli(capsys, "build", model, "--out", out, "--overwrite", "--method", "carve", "--calib", empty,
                        "--experts", "4")
    assert_one_line_error(code, err, "no documents")
    code, err = run_cli(capsys, "build", model, "--out", out, "--overwrite", "--experts", "4", "--top-k", "9")
    assert_one_line_error(code, err, "top_k")
    assert (out / "precious.txt").read_text() == "keep me" and not leftovers(tmp_path)


def test_train_overwrite_keeps_the_old_run_until_the_new_one_is_complete(capsys, tiny_moe, corpus, recipe, tmp_path,
                                                                        monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("old run")
    code, err = run_cli(capsys, "train", tiny_moe, "--data", tmp_path / "missing.jsonl", "--recipe", recipe,
                        "--out", run, "--overwrite")
    assert_one_line_error(code, err, "corpus not found")
    assert (run / "precious.txt").read_text() == "old run"

    import moefy.train.loop

    def killed(*args, **kwargs):  # the new run dies midway: the old one must still be there
        raise KeyboardInterrupt

    monkeypatch.setattr(moefy.train.loop, "export", killed)
    code, _ = run_cli(capsys, "train", tiny_moe, "--data", corpus, "--recipe", recipe, "--out", run, "--overwrite")
    assert code == 130 and (run / "precious.txt").read_text() == "old run"
    monkeypatch.undo()
    assert run_cli(capsys, "train", "--resume", run)[0] == 0  # resumes the unfinished replacement, then swaps it in
    assert not (run / "precious.txt").exists() and (run / "final" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_output_that_appears_during_the_run_is_not_replaced(capsys, model, tmp_path, monkeypatch):
    import moefy.api

    out = tmp_path / "moe"
    real = moefy.api.write_checkpoint

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("written by someone else")
        return real(*args, **kwargs)

    monkeypatch.setattr(moefy.api, "write_checkpoint", meanwhile)
    code, err = run_cli(capsys, "build", model, "--out", out, "--experts", "4")
    assert_one_line_error(code, err, "appeared while this run was working")
    assert (out / "theirs.txt").read_text() == "written by someone else" and not leftovers(tmp_path)


def test_a_second_run_on_the_same_output_is_refused(capsys, model, tmp_path):
    out = tmp_path / "moe"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from moefy.atomic import claim\n"
        f"with claim({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_cli(capsys, "build", model, "--out", out, "--experts", "4")
        assert_one_line_error(code, err, "another moefy run is writing")
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(capsys, "build", model, "--out", out, "--experts", "4")[0] == 0  # the lock died with its holder


def test_leftovers_of_a_killed_run_are_reclaimed(capsys, model, tmp_path):
    out = tmp_path / "moe"
    dead = 2**22 + 12345  # above the default pid_max: no live process has it
    stale = tmp_path / f".moe.moefy-tmp-{dead}"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"half")
    half_swapped = tmp_path / f".moe.moefy-old-{dead}"  # killed between the two renames: the user's old output
    half_swapped.mkdir()
    (half_swapped / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, "build", model, "--out", out, "--experts", "4")
    assert code == 2 and "already exists" in err.splitlines()[-1]  # the old output is back, so it is not replaced
    assert f"restored {out}" in err and f"removed .moe.moefy-tmp-{dead}" in err
    assert (out / "precious.txt").read_text() == "keep me" and not stale.exists()


def test_unwritable_output_fails_before_any_work(capsys, model, tmp_path, monkeypatch):
    import moefy.api

    monkeypatch.setattr(moefy.api, "resolve_model", lambda *a: pytest.fail("work started"))
    code, err = run_cli(capsys, "build", model, "--out", "/proc/moefy-out", "--experts", "4")
    assert_one_line_error(code, err, "cannot write /proc/moefy-out")
    (tmp_path / "file").write_text("")
    code, err = run_cli(capsys, "build", model, "--out", tmp_path / "file" / "moe", "--experts", "4")
    assert_one_line_error(code, err, "is not a directory")


def test_disk_full_midway_is_one_line_and_leaves_nothing(capsys, model, tmp_path, monkeypatch):
    import errno
    import os

    import moefy.api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(moefy.api, "write_checkpoint", full)
    code, err = run_cli(capsys, "build", model, "--out", tmp_path / "moe", "--experts", "4")
    assert_one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "moe").exists() and not leftovers(tmp_path)


# -- one line, exit 2 ----------------------------------------------------------------------------------------------

def _edit_config(model: Path, edit) -> Path:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(edit(config)))
    return model


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: [c], "expected a JSON object, found a list"),
    (lambda c: {k: v for k, v in c.items() if k != "intermediate_size"}, "intermediate_size must be a positive"),
    (lambda c: {**c, "num_hidden_layers": 1}, "config says 1 layers but the weights hold 2"),
])
def test_damaged_configs(capsys, model, tmp_path, edit, fragment):
    _edit_config(model, edit)
    code, err = run_cli(capsys, "build", model, "--out", tmp_path / "moe", "--experts", "4")
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("argv,fragment", [
    (["--layers", "0,x"], "layers takes all, every_other, last:N or comma-separated"),
    (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["--scale", "nan"], "scale: Input should be a finite number"),
    (["--scale", "inf"], "scale: Input should be a finite number"),
    (["--experts", "four"], "invalid int value"),
    (["--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),  # choices generated from the recipe's Literal
])
def test_bad_options(capsys, model, tmp_path, argv, fragment):
    try:
        code = cli.main([str(a) for a in ("build", model, "--out", tmp_path / "moe", *argv)])
    except SystemExit as exit_:  # argparse's own errors leave through SystemExit, also as one line
        code = exit_.code
    assert_one_line_error(code, capsys.readouterr().err.strip(), fragment)
    assert not (tmp_path / "moe").exists()


def test_recipe_not_utf8(capsys, model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model: \xff\xfe\n")
    code, err = run_cli(capsys, "build", "--recipe", recipe, "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "is not UTF-8 text")


def test_bad_corpora(capsys, model, tmp_path):
    garbage = tmp_path / "c.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    code, err = run_cli(capsys, "build", model, "--out", tmp_path / "moe", "--method", "carve", "--calib", garbage,
                        "--experts", "4")
    assert_one_line_error(code, err, "not a readable Parquet file")

    stray = tmp_path / "corpus"
    stray.mkdir()
    (stray / "state.json").write_text("{}")  # a stray file, not a saved dataset
    (stray / "docs.jsonl").write_text(json.dumps({"text": "hello world " * 20}) + "\n")
    from moefy.data.corpus import load_corpus

    assert len(load_corpus(stray).docs) == 1


def test_truncated_weights_for_every_reader(capsys, tiny_moe, tiny_llama, tmp_path, corpus):
    moe = copy_dir(tiny_moe, tmp_path / "moe")
    data = (moe / "model.safetensors").read_bytes()
    (moe / "model.safetensors").write_bytes(data[: len(data) // 2])
    for argv in (["verify", moe, "--dense", tiny_llama], ["eval", moe, "--data", corpus],
                 ["analyze", moe, "--data", corpus, "--out", tmp_path / "report"]):
        code, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "could not load")


def test_pickle_weights_never_reach_torch_load(capsys, tiny_llama, tmp_path, corpus, monkeypatch):
    import torch

    src = copy_dir(tiny_llama, tmp_path / "p")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    code, err = run_cli(capsys, "eval", src, "--data", corpus)
    assert_one_line_error(code, err, "holds only pickle weights")


def test_corrupt_optimizer_state_on_resume(capsys, tiny_moe, corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [TRAIN_STAGE], "checkpoint_every": 1}))
    run = tmp_path / "run"
    assert run_cli(capsys, "train", tiny_moe, "--data", corpus, "--recipe", recipe, "--out", run)[0] == 0
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "optimizer.pt").write_bytes(b"\x80\x02garbage")
    code, err = run_cli(capsys, "train", "--resume", run)
    assert_one_line_error(code, err, "corrupt checkpoint")


def test_eval_and_analyze_check_options_first(capsys, tiny_moe, corpus, tmp_path, monkeypatch):
    import moefy.api

    monkeypatch.setattr(moefy.api, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    code, err = run_cli(capsys, "analyze", tiny_moe, "--data", corpus, "--out", tmp_path / "r", "--seq-len", "0")
    assert_one_line_error(code, err, "--seq-len must be at least 2")
    code, err = run_cli(capsys, "eval", tiny_moe, "--data", corpus, "--json", "/proc/nowhere/x.json")
    assert_one_line_error(code, err, "cannot write /proc/nowhere/x.json")
    code, err = run_cli(capsys, "eval", tiny_moe, "--data", corpus, "--tokens-per-domain", "0")
    assert_one_line_error(code, err, "--tokens-per-domain must be at least 1")


def test_nothing_but_moefy_errors_escape(capsys, tmp_path):
    """Bad input of every kind ends in one line; a traceback would fail assert_one_line_error."""
    missing = tmp_path / "missing"
    for argv in (["verify", missing, "--dense", missing], ["eval", missing, "--data", missing],
                 ["analyze", missing, "--data", missing, "--out", tmp_path / "r"],
                 ["train", "--resume", missing], ["data", "filter", missing, "--out", tmp_path / "f"]):
        code, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("moefy: error: "), (argv, err)


# -- silent wrong results ------------------------------------------------------------------------------------------

def test_skipped_records_are_counted_everywhere(capsys, model, tiny_moe, tmp_path):
    corpus = tmp_path / "c.jsonl"
    good = [json.dumps({"text": "abc " * 60, "domain": d}) for d in ("x", "y") for _ in range(4)]
    corpus.write_text("\n".join(good + ["{not json", json.dumps({"txt": "wrong field"})]) + "\n")
    code, err = run_cli(capsys, "build", model, "--out", tmp_path / "moe", "--method", "carve", "--calib", corpus,
                        "--experts", "4")
    assert code == 0 and "skipped 1 malformed JSON lines, 1 records without a string 'text' field" in err
    plan = json.loads((tmp_path / "moe" / "moefy_plan.json").read_text())
    assert plan["calibration"]["skipped"] == {"malformed JSON lines": 1, "records without a string 'text' field": 1}

    code, err = run_cli(capsys, "eval", tiny_moe, "--data", corpus, "--json", tmp_path / "e" / "eval.json")
    assert code == 0 and "skipped 1 malformed JSON lines" in err
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["corpus"]["skipped"]["malformed JSON lines"] == 1


def test_runs_store_absolute_paths_and_resume_from_anywhere(capsys, tiny_moe, corpus, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "c.jsonl").write_bytes(corpus.read_bytes())
    (work / "r.yaml").write_text(yaml.safe_dump({"stages": [TRAIN_STAGE]}))
    monkeypatch.chdir(work)
    assert run_cli(capsys, "train", tiny_moe, "--data", "c.jsonl", "--recipe", "r.yaml", "--out", "run")[0] == 0
    spec = json.loads((work / "run" / "run.json").read_text())
    assert Path(spec["data"]) == work / "c.jsonl" and Path(spec["heldout"]).is_absolute()
    assert spec["read"]["data"]["documents"] == 12


def test_typos_are_not_sent_to_the_hub(capsys, tmp_path, monkeypatch):
    import moefy.sources

    monkeypatch.setattr(moefy.sources, "_download", lambda *a: pytest.fail("the hub was asked"))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "build", "out/mo", "--out", tmp_path / "moe")
    assert_one_line_error(code, err, "no such model directory or file: out/mo")
    assert moefy.sources.is_hub_id("hf://org/model") and moefy.sources.is_hub_id("HuggingFaceTB/SmolLM2-135M")


def test_one_flag_overrides_one_nested_field(capsys, model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model), "experts": 4, "router": {"kind": "zero", "std": 0.5}}))
    assert run_cli(capsys, "build", "--recipe", recipe, "--router-std", "0.1", "--out", tmp_path / "moe")[0] == 0
    saved = yaml.safe_load((tmp_path / "moe" / "moefy.yaml").read_text())
    assert saved["router"]["kind"] == "zero" and saved["router"]["std"] == 0.1


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    from moefy.atomic import claim
    from moefy.errors import MoefyError

    out = tmp_path / "x"
    with pytest.raises(MoefyError):
        with claim(out):
            raise MoefyError("boom")
    probe = subprocess.run([sys.executable, "-c", f"from moefy.atomic import claim\nwith claim({str(out)!r}): pass"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert not list(tmp_path.iterdir())  # no lock file left behind


def test_demo_refuses_a_directory_it_did_not_write(capsys, tmp_path):
    from moefy import demo

    (tmp_path / "notes.txt").write_text("mine")
    before = digest(tmp_path)
    code = demo.main(["--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, "was not written by the demo")
    assert digest(tmp_path) == before and not (tmp_path / demo.MARKER).exists()
