"""The ``kimivl`` command."""
from __future__ import annotations

import json

from kimivl.cli import main


def test_info_reports_official_parameter_counts(configs_dir, capsys):
    assert main(["info", str(configs_dir / "Kimi-VL-A3B-Instruct"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == 16_407_656_048
    assert info["parameters"]["vision_tower"] == 416_866_032
    assert info["parameters"]["language_model"] == 15_960_110_208
    # 26 MoE layers x 58 inactive experts x 3 x 1408 x 2048 fewer parameters per token
    assert info["parameters"]["language_model_active_per_token"] == 15_960_110_208 - 26 * 58 * 3 * 1408 * 2048
    assert info["weights_bytes"]["bfloat16"] == 2 * 16_407_656_048
    assert info["mla_cache_bytes_per_token_bf16"] == (512 + 64) * 27 * 2


def test_info_on_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
