"""The benchmarks take the recipe from the configs: bench_train's optimiser and schedule are the module's, and
bench_train, time_to_bleu and bench_decode run end to end on tiny models (CPU, seconds)."""

from __future__ import annotations

import json

import lightning as L
import pytest
from conftest import MULTI30K, REPO, load_script

from translator.module import DecoderOnlyModule, Seq2SeqModule

pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K}")


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer") / "multi30k-1000.model"
    tokenizer.save(path)
    return str(path)


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "cosine"])
@pytest.mark.parametrize("cls", [Seq2SeqModule, DecoderOnlyModule])
def test_bench_train_optimiser_and_schedule_are_the_modules(cls, schedule):
    """The same parameter groups (the same tensors, decay and hyper-parameters) and the same learning rate at every
    step as TranslationModule.configure_optimizers, for a horizon of 60 steps."""
    bench = load_script("bench_train")
    module = cls(preset="tiny", vocab_size=100, lr=2e-3, warmup_steps=7, weight_decay=0.05, schedule=schedule)
    module.trainer = L.Trainer(max_steps=60, logger=False, enable_progress_bar=False)
    config = module.configure_optimizers()
    ours, ours_schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    theirs, theirs_schedule = bench.make_optimizer(module, module.model, total_steps=60)
    assert len(ours.param_groups) == len(theirs.param_groups) == 2
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert {k: v for k, v in a.items() if k not in ("params", "fused")} == \
            {k: v for k, v in b.items() if k not in ("params", "fused")}
    assert ours.param_groups[0]["weight_decay"] == 0.05 and ours.param_groups[1]["weight_decay"] == 0.0
    lrs = []
    for _ in range(60):
        lrs.append((ours.param_groups[0]["lr"], theirs.param_groups[0]["lr"]))
        for optimizer, lr_schedule in ((ours, ours_schedule), (theirs, theirs_schedule)):
            optimizer.step()
            lr_schedule.step()
    assert all(a == b for a, b in lrs) and max(a for a, _ in lrs) == pytest.approx(2e-3)


def test_bench_train_runs_the_configs(tokenizer_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bench = load_script("bench_train")
    out = tmp_path / "train.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--tokens", "1024", "--steps", "2", "--warmup", "1",
                       "--batches", "2", "--variants", "eager", "sdpa-auto", "lightning", "--no-sdpa-report",
                       "--rounds", "2", "--data", str(MULTI30K),
                       "--tokenizer", tokenizer_file, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["arch"], r["variant"]) for r in result["results"]] == [
        (arch, variant) for arch in ("seq2seq", "decoder_only") for variant in ("eager", "sdpa-auto", "lightning")]
    assert not result["failures"] and all(r["tok_per_s"] > 0 and r["steps_timed"] == 2 for r in result["results"])
    for r in result["results"]:  # two rounds each, the row the lower one's
        assert len(r["rounds_tok_per_s"]) == 2 and r["tok_per_s"] == min(r["rounds_tok_per_s"])
    # the configs' models at the tiny preset: the same parameters in the bare loop and under Lightning
    params = {(r["arch"], r["variant"]): r["params"] for r in result["results"]}
    assert params["seq2seq", "eager"] == params["seq2seq", "lightning"] == Seq2SeqModule(
        preset="tiny", vocab_size=1000).model.num_parameters()


@pytest.mark.parametrize("impl, attention, kernel", [
    ("ours", None, "math"), ("ours", "auto", "flash"), ("hf", None, "flash"), ("hf", "math", "math")])
def test_bench_train_attention_variants_choose_the_kernel(impl, attention, kernel):
    """On a CPU ours trains on SDPA's math kernel (`recipe.training_attention`), HF on SDPA's own choice (flash);
    `sdpa-auto` gives ours SDPA's choice, `hf-math` gives HF the math kernel."""
    pytest.importorskip("transformers")
    import torch

    from translator.bench import hf_model

    bench = load_script("bench_train")
    module = Seq2SeqModule(preset="tiny", vocab_size=100)
    model = module.model if impl == "ours" else hf_model("seq2seq", module.config)
    loss = bench.loss_fn(impl, "seq2seq", model, 0.1, attention)
    src, tgt = torch.randint(4, 100, (3, 7)), torch.randint(4, 100, (3, 6))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss(src, tgt).backward()
    ops = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    assert ("aten::_scaled_dot_product_attention_math" in ops) is (kernel == "math")
    assert any("flash" in op for op in ops) is (kernel == "flash"), ops


def test_bench_attention_times_both_kernels_and_checks_them_against_float64(tmp_path, monkeypatch, capsys):
    bench = load_script("bench_attention")
    monkeypatch.setattr(bench, "SHAPES", [(2, 2, 5, 5, "causal"), (4, 2, 3, 8, "padding"), (6, 2, 1, 7, "padding")])
    out = tmp_path / "attention.json"
    assert bench.main(["--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"][2], r["dtype"], r["kernel"]) for r in rows] == [
        (L, d, k) for L in (5, 3, 1) for d in ("fp32", "bf16") for k in ("flash", "math")]
    for r in rows:
        train = r["shape"][2] > 1  # a decode step is timed without autograd only
        assert "error" not in r and ("train_ms" in r) is train and r["infer_ms"] > 0
        assert len(r["rel_error"]) == (4 if train else 1)
        assert max(r["rel_error"]) < (1e-5 if r["dtype"] == "fp32" else 0.02), r
    assert "| 2 x 2 x 5 x 5 | causal | bf16 | math |" in capsys.readouterr().out


def test_time_to_bleu_builds_the_recipe_with_fit_arguments(tokenizer_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ttb = load_script("time_to_bleu")
    out = tmp_path / "ttb.json"
    configs = [str(REPO / "configs" / "encdec.yaml"), str(REPO / "configs" / "data" / "multi30k.yaml")]
    assert ttb.main(["--config", *configs,
                     "--data", str(MULTI30K), "--tokenizer", tokenizer_file, "--device", "cpu", "--preset", "tiny",
                     "--max-steps", "4", "--num-workers", "0", "--max-tokens", "1024", "--eval-every-steps", "2",
                     "--eval-limit", "8", "--beam", "2", "--json", str(out),
                     "--model.init_args.lr", "2e-3", "--model.init_args.config.dropout", "0.0"]) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 4 and [h["step"] for h in result["history"]] == [2, 4] and result["test_pairs"] == 8
    init = result["recipe"]["model"]["init_args"]
    assert init["lr"] == 2e-3 and init["config"] == {"positions": "sinusoidal", "dropout": 0.0}  # yaml + override
    assert result["recipe"]["gradient_clip_val"] == 1.0 and result["recipe"]["max_steps"] == 4


def test_bench_decode_runs(tokenizer_file, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    bench = load_script("bench_decode")
    out = tmp_path / "decode.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--limit", "6", "--beams", "1", "2", "--static", "no",
                       "--tokenizer", tokenizer_file, "--vocab-size", "1000", "--data", str(MULTI30K),
                       "--src", str(MULTI30K / "test_2016_flickr.de.gz"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["arch"], r["search"]) for r in rows} >= {
        ("ours (random init)", "seq2seq", "greedy"), ("ours (random init)", "decoder_only", "beam2"),
        ("hf MarianMTModel", "seq2seq", "beam2"), ("hf GPT2LMHeadModel", "decoder_only", "greedy")}
    assert all(r["sentences"] == 6 for r in rows)


def test_bench_decode_checkpoint_rows_cover_every_cpu_engine(checkpoints, tmp_path):
    """A trained checkpoint gets the search rows, translate(), int8, CTranslate2 and ONNX Runtime rows, each with a
    BLEU; int8 and ONNX translate (BLEU within reach of fp32), as the issue's decoding table needs."""
    pytest.importorskip("ctranslate2")
    pytest.importorskip("onnxruntime")
    bench = load_script("bench_decode")
    out = tmp_path / "decode.json"
    assert bench.main(["--device", "cpu", "--checkpoint", str(checkpoints["seq2seq"]), "--limit", "24", "--beams",
                       "2", "--static", "no", "--no-hf", "--quantize", "int8", "--ctranslate2", "int8", "--onnx",
                       "--src", str(MULTI30K / "val.de.gz"), "--ref", str(MULTI30K / "val.en.gz"),
                       "--json", str(out)]) == 0
    rows = {r["model"].split(":")[0]: r for r in json.loads(out.read_text())["rows"] if "translate()" in r["search"]}
    assert set(rows) == {"ours", "ours int8", "ctranslate2 int8", "onnxruntime"}
    assert all(r["sentences"] == 24 and r["bleu"] is not None for r in rows.values())
    assert rows["onnxruntime"]["bleu"] == pytest.approx(rows["ours"]["bleu"], abs=0.5)  # the same search, in ORT
    assert rows["ours int8"]["bleu"] > 0.5 * rows["ours"]["bleu"]
