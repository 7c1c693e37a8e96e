"""ONNX export of a pruned model, checked against PyTorch with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import prunekit as pk
from prunekit.cli.main import main
from prunekit.zoo import create_model

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'prunekit[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'prunekit[export]')")


def test_export_pruned_model_matches_onnxruntime(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    from prunekit.export import export_onnx

    model = create_model("small_cnn", in_chans=1).eval()
    x = torch.randn(1, 1, 16, 16)
    small = pk.prune(model, x, ratio=0.5)
    fig = export_onnx(small, x, tmp_path / "m.onnx")
    assert fig["match"] and fig["max_abs_diff"] < 1e-4 and fig["opset"] == 17
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, 1, 16, 16)  # the batch axis is dynamic
    got = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), small(batch), atol=1e-4, rtol=1e-3)
    # the pruned graph really is smaller than the original one
    export_onnx(model, x, tmp_path / "orig.onnx")
    assert (tmp_path / "m.onnx").stat().st_size < 0.7 * (tmp_path / "orig.onnx").stat().st_size


def test_export_cli_on_a_saved_pruned_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "small_cnn", "--in-chans", "1", "--input-shape", "1,1,16,16", "--ratio", "0.5",
                 "--out", str(tmp_path / "p"), "--no-latency"]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "p"), "--out", str(tmp_path / "p" / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and "match" in out and (tmp_path / "p" / "model.onnx").is_file()


def test_a_mismatch_exits_1_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.export import OnnxCheckError, export_onnx

    target = tmp_path / "m.onnx"
    with pytest.raises(OnnxCheckError) as exc:  # a negative tolerance can never be met
        export_onnx(create_model("small_cnn", in_chans=1), torch.randn(1, 1, 16, 16), target, atol=-1.0)
    assert exc.value.figures["match"] is False and not target.exists()
    rc = main(["export", "--model", "small_cnn", "--in-chans", "1", "--input-shape", "1,1,16,16", "--atol", "-1",
               "--out", str(target)])
    assert rc == 1 and "differs" in capsys.readouterr().err and not target.exists()
    assert not list(tmp_path.iterdir())


def test_a_pruned_transformers_model_exports_with_its_keyword_inputs(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")
    import onnxruntime as ort

    out = tmp_path / "bert"
    assert main(["prune", "--model", "hf:bert", "--ratio", "0.5", "--out", str(out), "--no-latency"]) == 0
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "bert.onnx")]) == 0
    assert "outputs match" in capsys.readouterr().out
    sess = ort.InferenceSession(str(tmp_path / "bert.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    # Another batch size and other tokens than the check's, against the saved pruned model.
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 10:] = 0
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    small = pk.load(out).eval()
    with torch.no_grad():
        want = small(input_ids=ids, attention_mask=mask)[0]
    assert got.shape == tuple(want.shape) and torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=1e-3)
