"""WiSE-FT: exact interpolation, the rule that chooses `a`, the run's table and saved model, the standalone command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from remote_code import custom_code_model, record_prompts
from safetensors.torch import load_file
from transformers import CLIPModel

from clip_trainer.arguments import ConfigError
from clip_trainer.run import main
from clip_trainer.wise_ft import choose_alpha, interpolate_state_dicts
from clip_trainer.wise_ft import main as wise_ft_main


def two_models(tiny_clip_dir: Path) -> tuple[CLIPModel, CLIPModel]:
    pretrained = CLIPModel.from_pretrained(tiny_clip_dir)
    fine_tuned = CLIPModel.from_pretrained(tiny_clip_dir)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in fine_tuned.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return pretrained, fine_tuned


def test_interpolation_is_exact_at_the_ends_and_an_average_in_the_middle(tiny_clip_dir):
    pretrained, fine_tuned = (model.state_dict() for model in two_models(tiny_clip_dir))
    for name, tensor in interpolate_state_dicts(pretrained, fine_tuned, 0.0).items():
        assert torch.equal(tensor, pretrained[name]) and tensor.dtype == pretrained[name].dtype, name
    for name, tensor in interpolate_state_dicts(pretrained, fine_tuned, 1.0).items():
        assert torch.equal(tensor, fine_tuned[name]), name
    middle = interpolate_state_dicts(pretrained, fine_tuned, 0.5)
    for name, tensor in middle.items():
        if tensor.is_floating_point():
            # The average written out in float64, rounded once to float32.
            average = (pretrained[name].double() * 0.5 + fine_tuned[name].double() * 0.5).float()
            assert torch.equal(tensor, average), name
        else:  # integer buffers (position ids) are the fine-tuned model's
            assert torch.equal(tensor, fine_tuned[name]), name
    assert middle["logit_scale"] == (pretrained["logit_scale"] + fine_tuned["logit_scale"]) / 2
    assert any(not torch.equal(middle[name], pretrained[name]) for name in middle)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        interpolate_state_dicts(pretrained, fine_tuned, 1.5)


def test_the_rule_keeps_the_reference_and_maximises_the_domain():
    rows = [
        {"alpha": 0.0, "eval_m": 0.20, "eval_ref_m": 0.50},
        {"alpha": 0.5, "eval_m": 0.40, "eval_ref_m": 0.46},  # keeps 92%
        {"alpha": 0.75, "eval_m": 0.45, "eval_ref_m": 0.44},  # keeps 88%
        {"alpha": 1.0, "eval_m": 0.50, "eval_ref_m": 0.30},
    ]
    assert choose_alpha(rows, "m", ["ref"], 0.9)[0] == 0.5
    assert choose_alpha(rows, "m", ["ref"], 0.85)[0] == 0.75
    assert choose_alpha(rows, "m", ["ref"], 0.0)[0] == 1.0
    assert choose_alpha(rows, "m", ["ref"], 1.0)[0] == 0.0  # only the pretrained model keeps everything
    assert choose_alpha(rows, "m", ["ref"], 0.9, alpha=0.75) == (0.75, "a = 0.75 was given (`wise_ft_alpha`).")
    reason = choose_alpha(rows, "m", ["ref"], 0.9)[1]
    assert "ref" in reason and "90%" in reason


def test_a_run_evaluates_every_alpha_and_saves_the_chosen_one(base_args, shapes_csv, tiny_clip_dir, tmp_path):
    out = Path(base_args[base_args.index("--output_dir") + 1])
    # The rule would pick some a; an explicit a = 0 saves exactly the pretrained weights, whatever training did.
    main([*base_args, "--do_train", "--do_eval", "--num_train_epochs", "1", "--wise_ft_alphas", "0.5",
          "--wise_ft_alpha", "0", "--extra_eval_sets", json.dumps({"ref": str(shapes_csv)})])  # fmt: skip
    table = json.loads((out / "wise_ft_results.json").read_text())
    assert [row["alpha"] for row in table["rows"]] == [0.0, 0.5, 1.0]
    assert table["alpha"] == 0.0 and "wise_ft_alpha" in table["reason"]
    assert table["metric"] == "mean_recall" and table["reference_sets"] == ["ref"]
    for row in table["rows"]:
        assert "eval_t2i_recall@10" in row and "eval_ref_t2i_recall@10" in row
    assert table["rows"][0]["eval_mean_recall"] != table["rows"][2]["eval_mean_recall"]  # training changed something
    saved = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_clip_dir / "model.safetensors"))
    assert all(torch.equal(saved[name], original[name]) for name in original)
    # The final evaluation measures the saved model: the pretrained one.
    final = json.loads((out / "eval_results.json").read_text())
    assert final["eval_mean_recall"] == table["rows"][0]["eval_mean_recall"]
    card = (out / "README.md").read_text()
    assert "## WiSE-FT" in card and "**0** (saved)" in card and "![WiSE-FT trade-off](wise_ft.png)" in card
    assert (out / "wise_ft.png").is_file()


def test_the_command_saves_the_interpolated_model_with_its_processor(tiny_clip_dir, tmp_path, capsys):
    pretrained, fine_tuned = two_models(tiny_clip_dir)
    fine_tuned.save_pretrained(tmp_path / "tuned")  # a model folder without a processor: the pretrained one's is used
    code = wise_ft_main(["--pretrained", str(tiny_clip_dir), "--fine_tuned", str(tmp_path / "tuned"), "--alpha",
                         "0.5", "--output_dir", str(tmp_path / "mixed")])  # fmt: skip
    assert code == 0
    mixed = CLIPModel.from_pretrained(tmp_path / "mixed").state_dict()
    expected = interpolate_state_dicts(pretrained.state_dict(), fine_tuned.state_dict(), 0.5)
    assert all(torch.equal(mixed[name], expected[name]) for name in expected)
    assert (tmp_path / "mixed" / "tokenizer.json").is_file() and (
        tmp_path / "mixed" / "processor_config.json"
    ).is_file()
    # What other libraries read, as in a run's output folder: transformers.js's image settings, sentence-transformers'.
    assert (tmp_path / "mixed" / "preprocessor_config.json").is_file()
    assert (tmp_path / "mixed" / "modules.json").is_file()
    assert wise_ft_main(["--pretrained", str(tiny_clip_dir), "--fine_tuned", str(tmp_path / "tuned"), "--alpha",
                         "2", "--output_dir", str(tmp_path / "bad")]) == 2  # fmt: skip
    assert "`--alpha` is 2.0; it must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        wise_ft_main(["--help"])
    assert exit_info.value.code == 0 and "--fine_tuned" in capsys.readouterr().out


def test_wise_ft_needs_a_pretrained_model_and_evaluation(shapes_csv, tiny_clip_dir, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    with pytest.raises(ConfigError, match="trained from scratch"):
        main(["--config_name", str(repo / "configs" / "models" / "clip-tiny-64px.json"), "--train_file",
              str(shapes_csv), "--output_dir", str(tmp_path / "o"), "--wise_ft_alphas", "0.5", "--report_to",
              "none"])  # fmt: skip
    with pytest.raises(ConfigError, match="this run does not evaluate"):
        main(["--model_name_or_path", str(tiny_clip_dir), "--train_file", str(shapes_csv), "--wise_ft_alphas", "0.5",
              "--eval_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    with pytest.raises(ConfigError, match="`wise_ft_alphas` has -0.1"):
        main(["--model_name_or_path", "m", "--train_file", str(shapes_csv), "--wise_ft_alphas", "0.5", "-0.1"])


@pytest.mark.slow  # a subprocess, about 5 s
def test_the_command_prints_a_short_summary(tiny_clip_dir, tmp_path):
    """`python -m clip_trainer.wise_ft` in its own process, stdin closed: the command's two lines, no library INFO."""
    _, fine_tuned = two_models(tiny_clip_dir)
    fine_tuned.save_pretrained(tmp_path / "tuned")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "clip_trainer.wise_ft", "--pretrained", str(tiny_clip_dir), "--fine_tuned", "tuned",
         "--alpha", "0.25", "--output_dir", "mixed"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert lines == [
        f"WiSE-FT: (1 - 0.25) x {tiny_clip_dir} + 0.25 x tuned: {len(fine_tuned.state_dict())} tensors of a CLIPModel "
        f"interpolated; processor from {tiny_clip_dir}.",
        "Saved the WiSE-FT model at alpha 0.25 to mixed.",
    ], lines[:20]
    assert (tmp_path / "mixed" / "model.safetensors").is_file()


def test_a_model_that_needs_its_own_code_is_refused_without_asking(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    asked = record_prompts(monkeypatch)
    custom = custom_code_model(tmp_path / "custom")
    for pretrained, fine_tuned, key in ((custom, tiny_clip_dir, "pretrained"), (tiny_clip_dir, custom, "fine_tuned")):
        code = wise_ft_main(["--pretrained", str(pretrained), "--fine_tuned", str(fine_tuned), "--alpha", "0.5",
                             "--output_dir", str(tmp_path / "out")])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 2 and asked == [] and "Do you wish to run the custom code" not in captured.out + captured.err
        assert captured.err.splitlines() == [
            f"python -m clip_trainer.wise_ft: error: Cannot load `--{key}` {str(custom)!r}: it needs its own Python "
            "code (`auto_map` in its config.json), which clip-trainer never runs; use a model that transformers "
            "implements itself (CLIP, SigLIP, SigLIP 2, a vision-text dual encoder)."
        ]
    assert not (custom / "RAN").exists() and not (tmp_path / "out").exists()


def test_exactly_the_retention_asked_for_is_enough():
    """315 of 515 recalls against 350 of 515 keeps exactly 90%; in floating point 315/515 < 0.9 * 350/515."""
    assert 315 / 515 < 0.9 * (350 / 515)  # why the rule needs its tolerance
    rows = [
        {"alpha": 0.0, "eval_m": 0.20, "eval_ref_m": 350 / 515},
        {"alpha": 0.6, "eval_m": 0.40, "eval_ref_m": 315 / 515},
        {"alpha": 1.0, "eval_m": 0.50, "eval_ref_m": 0.30},
    ]
    assert choose_alpha(rows, "m", ["ref"], 0.9)[0] == 0.6
