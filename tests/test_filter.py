"""moefy data filter and train-classifier on small data: exact quantile drops, determinism, kept ∪ dropped = input,
pass-through domains, malformed records, a resumable score cache, the report, the classifier, and errors."""

from __future__ import annotations

import json
import random

import pytest

from moefy import api, cli
from moefy.data.corpus import load_corpus
from moefy.data.scoring.ads import ad_score

PROSE = ["The function returns a sorted list of the unique values in the input.",
         "Each module keeps one job, and the tests check what users rely on.",
         "A tokenizer splits text into pieces that the model can embed.",
         "The report lists every domain with the documents it kept and dropped."]
ADS = ["BUY NOW!!! Best price $19.99 at www.cheap-deals.com call 555-123-4567 free shipping, limited time",
       "Discount coupon: 50% off, order now at https://shop.example.com, call (800) 555-0199. Sale sale sale!",
       "Click here to subscribe and get a promo code. $5 deal, add to cart now! www.bargains.biz"]


def make_corpus(path, seed=0, n=40):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(PROSE) for _ in range(3))
        if i % 5 == 0:
            text = rng.choice(ADS)
        lines.append(json.dumps({"text": text, "domain": "cc" if i % 2 else "code", "id": i}))
    lines.insert(7, "{not json")  # malformed: must be reported and kept in dropped.jsonl
    lines.insert(12, json.dumps({"title": "no text"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(corpus, out, *extra):
    return cli.main(["data", "filter", str(corpus), "--out", str(out), *extra])


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "web.jsonl")


def test_filter_keeps_nothing_lost_and_is_deterministic(corpus, tmp_path, tiny_llama):
    args = ["--fluency", str(tiny_llama), "--cache", str(tmp_path / "cache.jsonl"), "--domains", "cc",
            "--drop-quantile", "fluency=0.25", "--threshold", "ads=0.5"]
    assert run(corpus, tmp_path / "a", *args) == 0
    kept = (tmp_path / "a" / "data" / "web.jsonl").read_bytes().splitlines()
    dropped = [json.loads(line) for line in (tmp_path / "a" / "dropped.jsonl").read_text().splitlines()]
    original = [line for line in corpus.read_bytes().splitlines() if line.strip()]
    # kept ∪ dropped = input: kept lines are byte-identical, dropped ones carry the record itself
    dropped_lines = {d["index"] for d in dropped}
    assert sorted(kept) == sorted(line for i, line in enumerate(original) if i not in dropped_lines)
    assert len(kept) + len(dropped) == len(original)
    for d in dropped:
        if d["reasons"][0].startswith("malformed"):
            continue
        assert json.loads(original[d["index"]]) == d["record"]
    reasons = [d["reasons"] for d in dropped]
    assert sum(r[0].startswith("malformed") for r in reasons) == 2
    # the quantile drops exactly round(0.25 × n) of the filtered domain, never of the pass-through one
    valid_cc = sum(1 for line in original if line.startswith(b"{\"") and b"\"cc\"" in line)
    assert sum(any(w.startswith("fluency in top") for w in r) for r in reasons) == round(0.25 * valid_cc)
    assert all(d["domain"] == "cc" for d in dropped if not d["reasons"][0].startswith("malformed"))
    # every advertisement in cc was dropped by the heuristic
    ads_cc = [json.loads(line) for line in original if line.startswith(b"{\"text\"")]
    ads_cc = [r for r in ads_cc if r["domain"] == "cc" and r["text"] in ADS]
    assert ads_cc and {r["id"] for r in ads_cc} <= {d["record"].get("id") for d in dropped if isinstance(d["record"], dict)}
    # the second run reads every perplexity from the cache and writes identical files
    assert run(corpus, tmp_path / "b", *args) == 0
    for name in ("data/web.jsonl", "dropped.jsonl", "scores.jsonl", "report/report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    report = json.loads((tmp_path / "a" / "report" / "report.json").read_text())
    assert report["per_domain"]["code"]["dropped"] == 0 and report["malformed"]
    assert len(report["examples"]["ads"]["cc"]["highest"]) == 10
    assert (tmp_path / "a" / "report" / "hist_fluency.png").stat().st_size > 5000
    assert "## ads, cc: highest-scored" in (tmp_path / "a" / "report" / "report.md").read_text()
    # train reads a filter output directly
    assert len(load_corpus(tmp_path / "a").docs) == len(kept)


def test_score_cache_resumes(corpus, tmp_path, tiny_llama, monkeypatch):
    from moefy.data.scoring.fluency import FluencyScorer

    cache = tmp_path / "cache.jsonl"
    args = ["--fluency", str(tiny_llama), "--cache", str(cache), "--ads", "none"]
    assert run(corpus, tmp_path / "a", *args) == 0
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:10]) + "\n" + lines[10][:15])  # a run killed mid-write
    calls = []
    original = FluencyScorer._batch
    monkeypatch.setattr(FluencyScorer, "_batch", lambda self, seqs: calls.append(len(seqs)) or original(self, seqs))
    assert run(corpus, tmp_path / "b", *args) == 0
    assert sum(calls) == len(lines) - 10  # only what the cache lacked
    # Recomputed documents sit in differently shaped batches than before, which can move fp32 sums in the last bits.
    a, b = ([json.loads(line) for line in (tmp_path / d / "scores.jsonl").read_text().splitlines()] for d in "ab")
    assert [{**r, "scores": None} for r in a] == [{**r, "scores": None} for r in b]
    for x, y in zip(a, b):
        assert x["scores"].keys() == y["scores"].keys()
        for k, v in x["scores"].items():
            assert v == (None if y["scores"][k] is None else pytest.approx(y["scores"][k], rel=1e-5))


def test_directory_and_parquet_corpora_keep_their_format(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    (src / "books").mkdir(parents=True)
    (src / "books" / "a.txt").write_text(PROSE[0])
    (src / "books" / "b.txt").write_text(ADS[0])
    pq.write_table(pa.Table.from_pylist([{"text": t, "extra": i} for i, t in enumerate(PROSE + ADS)]),
                   src / "web.parquet")
    assert cli.main(["data", "filter", str(src), "--out", str(tmp_path / "f"), "--fluency", "none"]) == 0
    kept = tmp_path / "f" / "data"
    assert (kept / "books" / "a.txt").read_text() == PROSE[0] and not (kept / "books" / "b.txt").exists()
    rows = pq.read_table(kept / "web.parquet").to_pylist()
    assert rows == [{"text": t, "extra": i} for i, t in enumerate(PROSE)]  # every column kept, ads gone


def test_heuristic_ad_score():
    assert all(ad_score(a) > 0.5 for a in ADS)
    assert all(ad_score(p) < 0.2 for p in PROSE)
    assert ad_score("\n".join(["Home", "About", "Contact", "Login"] * 5)) > 0.5  # boilerplate + repetition


def labelled(path, seed=0):
    rng = random.Random(seed)
    words = "cheap deal buy now price offer discount shop sale click".split()
    prose = "function module returns value list test report domain token model".split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(12)), "label": "ad"} for _ in range(60)]
    rows += [{"text": " ".join(rng.choice(prose) for _ in range(12)), "label": "ok"} for _ in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_classifier_train_report_and_use(capsys, corpus, tmp_path):
    assert cli.main(["data", "train-classifier", str(labelled(tmp_path / "l.jsonl")), "--out",
                     str(tmp_path / "clf")]) == 0
    report = json.loads((tmp_path / "clf" / "report.json").read_text())
    assert report["heldout_examples"] == 24 and report["precision"] > 0.9 and report["recall"] > 0.9
    assert "precision" in capsys.readouterr().out
    assert run(corpus, tmp_path / "f", "--fluency", "none", "--ads", str(tmp_path / "clf")) == 0
    assert json.loads((tmp_path / "f" / "report" / "report.json").read_text())["documents"] == 42
    # same data, same seed: the same model bytes
    assert cli.main(["data", "train-classifier", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "clf2")]) == 0
    assert (tmp_path / "clf" / "model.bin").read_bytes() == (tmp_path / "clf2" / "model.bin").read_bytes()


def test_filter_errors(capsys, corpus, tmp_path):
    def err(argv):
        assert cli.main(argv) == 2
        message = capsys.readouterr().err
        assert message.startswith("moefy: error:") and message.count("\n") == 1
        return message

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n{bad\n")
    assert "has no readable documents" in err(["data", "filter", str(empty), "--out", str(tmp_path / "o")])
    assert "unknown domain 'wiki'" in err(["data", "filter", str(corpus), "--out", str(tmp_path / "o"),
                                           "--domains", "wiki", "--fluency", "none"])
    assert "corpus not found" in err(["data", "filter", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert "no such model directory or file" in err(["data", "filter", str(corpus), "--out", str(tmp_path / "o"),
                                                     "--fluency", str(tmp_path / "no-model")])
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    assert "no .safetensors weights" in err(["data", "filter", str(corpus), "--out", str(tmp_path / "o"),
                                             "--fluency", str(tmp_path / "not-a-model")])
    bad = tmp_path / "bad-clf"
    bad.mkdir()
    (bad / "model.bin").write_bytes(b"junk")
    (bad / "report.json").write_text(json.dumps({"positive": "ad"}))
    assert "cannot read classifier" in err(["data", "filter", str(corpus), "--out", str(tmp_path / "o"),
                                            "--fluency", "none", "--ads", str(bad)])
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"t {i}", "label": "ad"}) + "\n" for i in range(5)))
    assert "at least two classes" in err(["data", "train-classifier", str(one), "--out", str(tmp_path / "c")])
    assert "drop_quantile for fluency must be in [0, 1)" in err(
        ["data", "filter", str(corpus), "--out", str(tmp_path / "o"), "--drop-quantile", "fluency=1.5"])
    with pytest.raises(SystemExit) as usage:  # a malformed flag is a usage error, caught by argparse
        cli.main(["data", "filter", str(corpus), "--out", str(tmp_path / "o"), "--drop-quantile", "fluency"])
    message = capsys.readouterr().err
    assert usage.value.code == 2 and "KEY=NUMBER" in message and message.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_filter_as_a_training_stage(corpus, tmp_path, tiny_moe):
    import yaml

    recipe = tmp_path / "r.yaml"
    # no fluency model named: the MoE's dense source (tiny_llama) scores fluency
    recipe.write_text(yaml.safe_dump({"filter": {"domains": ["cc"], "fluency": {"cache": str(tmp_path / "c.jsonl")}},
                                      "stages": [{"tokens": 2 * 4 * 32, "seq_len": 32}]}))
    api.train(tiny_moe, str(corpus), recipe, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "filtered" / "report" / "report.json").read_text())
    assert report["reasons"]["ads"] > 0 and report["reasons"]["fluency"] > 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    from moefy.data.scoring.fluency import doc_key
    from moefy.sources import resolve_model

    first_cc = next(json.loads(line)["text"] for line in corpus.read_text().splitlines()[1:]
                    if line.startswith("{\"text") and json.loads(line)["domain"] == "cc")
    dense_id = str(resolve_model(json.loads((tiny_moe / "moefy_plan.json").read_text())["source"]).directory.resolve())
    keys = {json.loads(line)["key"] for line in (tmp_path / "c.jsonl").read_text().splitlines()}
    assert doc_key(dense_id, 256, first_cc) in keys
