"""Loading and saving in the official layout: key set, parameter count, round trip, readable errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimivl import CheckpointError, KimiVLConfig, KimiVLForConditionalGeneration


def official_a3b_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the released checkpoint with its shape, written out from spec §2's table."""
    s: dict[str, tuple[int, ...]] = {}
    v = "vision_tower."
    s[v + "patch_embed.proj.weight"] = (1152, 3, 14, 14)
    s[v + "patch_embed.proj.bias"] = (1152,)
    s[v + "patch_embed.pos_emb.weight"] = (64, 64, 1152)
    for i in range(27):
        b = f"{v}encoder.blocks.{i}."
        for n in ("norm0", "norm1"):
            s[b + n + ".weight"] = s[b + n + ".bias"] = (1152,)
        s[b + "wqkv.weight"], s[b + "wqkv.bias"] = (3456, 1152), (3456,)
        s[b + "wo.weight"], s[b + "wo.bias"] = (1152, 1152), (1152,)
        s[b + "mlp.fc0.weight"], s[b + "mlp.fc0.bias"] = (4304, 1152), (4304,)
        s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = (1152, 4304), (1152,)
    s[v + "encoder.final_layernorm.weight"] = s[v + "encoder.final_layernorm.bias"] = (1152,)
    p = "multi_modal_projector."
    s[p + "pre_norm.weight"] = s[p + "pre_norm.bias"] = (1152,)
    s[p + "linear_1.weight"], s[p + "linear_1.bias"] = (4608, 4608), (4608,)
    s[p + "linear_2.weight"], s[p + "linear_2.bias"] = (2048, 4608), (2048,)
    m = "language_model.model."
    s[m + "embed_tokens.weight"] = (163840, 2048)
    for i in range(27):
        b = f"{m}layers.{i}."
        s[b + "input_layernorm.weight"] = s[b + "post_attention_layernorm.weight"] = (2048,)
        s[b + "self_attn.q_proj.weight"] = (3072, 2048)
        s[b + "self_attn.kv_a_proj_with_mqa.weight"] = (576, 2048)
        s[b + "self_attn.kv_a_layernorm.weight"] = (512,)
        s[b + "self_attn.kv_b_proj.weight"] = (4096, 512)
        s[b + "self_attn.o_proj.weight"] = (2048, 2048)
        if i == 0:
            s[b + "mlp.gate_proj.weight"] = s[b + "mlp.up_proj.weight"] = (11264, 2048)
            s[b + "mlp.down_proj.weight"] = (2048, 11264)
            continue
        for e in range(64):
            s[f"{b}mlp.experts.{e}.gate_proj.weight"] = s[f"{b}mlp.experts.{e}.up_proj.weight"] = (1408, 2048)
            s[f"{b}mlp.experts.{e}.down_proj.weight"] = (2048, 1408)
        s[b + "mlp.gate.weight"], s[b + "mlp.gate.e_score_correction_bias"] = (64, 2048), (64,)
        s[b + "mlp.shared_experts.gate_proj.weight"] = s[b + "mlp.shared_experts.up_proj.weight"] = (2816, 2048)
        s[b + "mlp.shared_experts.down_proj.weight"] = (2048, 2816)
    s[m + "norm.weight"] = (2048,)
    s["language_model.lm_head.weight"] = (163840, 2048)
    return s


@pytest.mark.parametrize("name", ["Kimi-VL-A3B-Instruct", "Kimi-VL-A3B-Thinking-2506"])
def test_real_config_on_meta_device_has_official_keys_and_count(name, configs_dir):
    config = KimiVLConfig.from_pretrained(configs_dir / name)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    expected = official_a3b_shapes()
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert len(expected) == 5652
    assert set(got) == set(expected)
    assert got == expected
    assert model.num_parameters() == 16_407_656_048
    assert sum(p.numel() for p in model.vision_tower.parameters()) == 416_866_032
    assert sum(p.numel() for p in model.multi_modal_projector.parameters()) == 30_679_808
    assert sum(p.numel() for p in model.language_model.parameters()) == 15_960_110_208
    assert all(t.is_meta for t in model.state_dict().values())


def test_state_dict_keys_equal_golden_checkpoint(golden_dir, golden_weights):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    sd = model.state_dict()
    assert set(sd) == set(golden_weights)
    for k, t in golden_weights.items():
        assert torch.equal(sd[k], t), k
    assert model.num_parameters() == 514_928
    assert not any(b.is_meta for b in model.buffers()) and not any(p.is_meta for p in model.parameters())


def test_save_load_round_trip_is_bit_exact_and_sharded(golden_dir, tmp_path):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    model.save_pretrained(tmp_path, max_shard_size="400KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / f).is_file() for f in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    again = KimiVLForConditionalGeneration.from_pretrained(tmp_path)
    for k, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], t), k
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((golden_dir / "config.json").read_text())
    # a single-file save replaces the shards (no stale files left behind)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))


def test_dtype_cast_keeps_router_bias_in_fp32(golden_dir, tmp_path):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype=torch.bfloat16)
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    assert {d for k, d in dtypes.items() if not k.endswith("e_score_correction_bias")} == {torch.bfloat16}
    assert {d for k, d in dtypes.items() if k.endswith("e_score_correction_bias")} == {torch.float32}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert model.config.torch_dtype == "float32"  # saving did not edit the live config


def _copy_checkpoint(golden_dir, dst):
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(golden_dir / f, dst / f)
    return dst


def test_mismatched_checkpoint_names_missing_unexpected_and_shapes(golden_dir, tmp_path):
    ckpt = _copy_checkpoint(golden_dir, tmp_path / "bad")
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd["language_model.model.layers.1.mlp.experts.3.up_proj.weight"]
    sd["language_model.model.layers.1.mlp.experts.99.up_proj.weight"] = torch.zeros(32, 64)
    sd["multi_modal_projector.linear_2.weight"] = torch.zeros(64, 100)
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        KimiVLForConditionalGeneration.from_pretrained(ckpt)
    msg = str(e.value)
    assert "1 missing key(s)" in msg and "layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "1 unexpected key(s)" in msg and "experts.99.up_proj.weight" in msg
    assert "multi_modal_projector.linear_2.weight: checkpoint (64, 100) vs model (64, 256)" in msg


def test_config_that_does_not_match_weights(golden_dir, tmp_path):
    ckpt = _copy_checkpoint(golden_dir, tmp_path / "cfg")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["num_hidden_layers"] = 4
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"missing key\(s\)[\s\S]*layers\.3\."):
        KimiVLForConditionalGeneration.from_pretrained(ckpt)


def test_missing_weights_and_pickle_only(golden_dir, tmp_path):
    ckpt = tmp_path / "pickle"
    ckpt.mkdir()
    shutil.copy(golden_dir / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*pickle weights \['pytorch_model.bin'\]"):
        KimiVLForConditionalGeneration.from_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard"):
        KimiVLForConditionalGeneration.from_pretrained(ckpt)


def test_unknown_local_path_and_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KimiVLForConditionalGeneration.from_pretrained(tmp_path / "missing" / "dir")
    with pytest.raises(FileNotFoundError, match=r"moonshotai/Kimi-VL-A3B-Instruct.*HF_HUB_OFFLINE"):
        KimiVLForConditionalGeneration.from_pretrained("moonshotai/Kimi-VL-A3B-Instruct")


def test_loading_assigns_the_read_tensors_without_copies(golden_dir, monkeypatch):
    """Parameters *are* the tensors read from the file (one copy), built on meta (no random init)."""
    import kimivl.checkpoint as ckpt

    read: dict[str, int] = {}
    original = ckpt.iter_checkpoint_tensors

    def recording(*args, **kwargs):
        for key, tensor in original(*args, **kwargs):
            read[key] = tensor.data_ptr()
            yield key, tensor

    monkeypatch.setattr(ckpt, "iter_checkpoint_tensors", recording)
    init_calls = []
    linear_reset = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: init_calls.append(self.weight.device) or linear_reset(self))
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    assert {k: t.data_ptr() for k, t in model.state_dict().items()} == read
    assert init_calls and all(device.type == "meta" for device in init_calls)


def test_loaded_weights_own_their_memory_not_the_file(golden_dir, tmp_path):
    """Overwriting the checkpoint file in place after loading changes nothing in the model (no mmap views
    of the file: those would show the new bytes, or die with SIGBUS if the file were truncated)."""
    ckpt = _copy_checkpoint(golden_dir, tmp_path / "own")
    model = KimiVLForConditionalGeneration.from_pretrained(ckpt)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    size = (ckpt / "model.safetensors").stat().st_size
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * (size - size // 2))
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_converting_load_gives_separate_exact_tensors(golden_dir, tmp_path):
    """bf16 -> fp32 goes through one reused read buffer: no loaded tensor may alias it or another tensor."""
    KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype=torch.bfloat16).save_pretrained(
        tmp_path, max_shard_size="400KB")
    stored = {}
    for f in tmp_path.glob("model-*.safetensors"):
        stored |= load_file(str(f))
    model = KimiVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    sd = model.state_dict()
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)
    for k, t in sd.items():
        assert t.dtype == torch.float32 and t.untyped_storage().nbytes() == t.numel() * 4, k
        assert torch.equal(t, stored[k].float()), k


def test_corrupt_safetensors_name_the_file_and_tensor(golden_dir, tmp_path):
    ckpt = _copy_checkpoint(golden_dir, tmp_path / "cut")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*tensor '.*' .*do not fit"):
        KimiVLForConditionalGeneration.from_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="header length 1000000000000 is impossible"):
        KimiVLForConditionalGeneration.from_pretrained(ckpt)


def test_from_pretrained_builds_its_skeleton_without_random_init(golden_dir):
    """The meta skeleton skips the embeddings' normal_ init, whose meta kernel is torch's Python reference: its
    first call imports torch._dynamo, ~3 s of every `kimivl chat` (a fresh process, so nothing imported it before).
    Built off the meta device, the same modules are randomly initialised as nn.Embedding's are."""
    import subprocess
    import sys

    code = ("import sys; from kimivl import KimiVLForConditionalGeneration as M; "
            f"M.from_pretrained({str(golden_dir)!r}); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

    config = KimiVLConfig.from_pretrained(golden_dir)
    torch.manual_seed(0)
    model = KimiVLForConditionalGeneration(config)
    embed = model.language_model.model.embed_tokens
    pos = model.vision_tower.patch_embed.pos_emb.weight
    for weight in (embed.weight, pos):
        assert 0.9 < weight.detach().std().item() < 1.1  # normal_(0, 1)
    if embed.padding_idx is not None:
        assert torch.count_nonzero(embed.weight[embed.padding_idx]) == 0


def test_save_pretrained_keeps_the_decoding_defaults_and_refuses_a_file(golden_dir, tmp_path):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert KimiVLForConditionalGeneration.from_pretrained(tmp_path / "out").generation_config == model.generation_config
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"save_pretrained needs a directory, but .*file is a file"):
        model.save_pretrained(tmp_path / "file")


def test_an_integer_tensor_for_a_float_parameter_is_named(golden_dir, tmp_path):
    ckpt = _copy_checkpoint(golden_dir, tmp_path / "int")
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["multi_modal_projector.linear_2.weight"] = sd["multi_modal_projector.linear_2.weight"].int()
    save_file(sd, str(ckpt / "model.safetensors"))
    for dtype in (None, torch.bfloat16):  # a cast converts float tensors only: the int32 one stays int32
        with pytest.raises(CheckpointError, match=r"1 dtype mismatch\(es\):\n    multi_modal_projector\.linear_2\."
                                                  r"weight: checkpoint int32 \(integer\) vs model floating-point"):
            KimiVLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype)


@pytest.mark.parametrize("dtype, message", [
    ("int8", r"dtype 'int8' is not a floating-point dtype: .*; for int8 weights pass quantization='int8'"),
    (torch.int8, r"dtype torch.int8 is not a floating-point dtype: .*quantization='int8'"),
    (torch.int32, r"dtype torch.int32 is not a floating-point dtype: the weights are cast to it \(try 'bfloat16'"),
    ("bool", r"dtype 'bool' is not a floating-point dtype"),
])
def test_a_dtype_that_is_not_floating_point_is_refused(golden_dir, dtype, message):
    with pytest.raises(ValueError, match=message):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype=dtype)


@pytest.mark.parametrize("size", [0, -1, "0GB", "0.0001KB"])
def test_a_shard_size_of_nothing_is_refused(golden_dir, tmp_path, size):
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    with pytest.raises(ValueError, match=rf"max_shard_size {size!r}: must be more than 0 bytes"):
        model.save_pretrained(tmp_path, max_shard_size=size)
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_missing_path_or_a_file_is_named(golden_dir):
    with pytest.raises(TypeError, match="a checkpoint directory or a hub id like 'org/name' is needed, got None"):
        KimiVLForConditionalGeneration.from_pretrained(None)
    with pytest.raises(FileNotFoundError, match=r"config\.json' is a file, not a directory: pass the directory that "
                                                r"holds it \('.*kimivl-tiny'\)"):
        KimiVLForConditionalGeneration.from_pretrained(golden_dir / "config.json")
