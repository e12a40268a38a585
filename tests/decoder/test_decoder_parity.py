"""Decoder parity: official golden tensors, transformers' DeepseekV3ForCausalLM, padding, input errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kimivl.configuration import DeepseekV3Config, KimiVLConfig
from kimivl.decoder import DeepseekV3ForCausalLM
from kimivl.errors import KimiVLInputError

ATOL = RTOL = 1e-4  # float32 activations/logits vs the official implementation (golden README)
REPO = Path(__file__).resolve().parents[2]
QLORA_CONFIG = REPO / "configs" / "test-tiny-qlora" / "config.json"
PREFIX = "language_model."


def _text_config(path: Path) -> DeepseekV3Config:
    return KimiVLConfig.from_json_file(path).text_config


def _build_loaded(cfg: DeepseekV3Config, state_dict: dict[str, torch.Tensor]) -> DeepseekV3ForCausalLM:
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _random_state_dict(cfg: DeepseekV3Config, seed: int) -> dict[str, torch.Tensor]:
    """The golden set's recipe (kimivl.training.init.golden_recipe_state_dict) for this config."""
    from kimivl.training.init import golden_recipe_state_dict

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DeepseekV3ForCausalLM(cfg).state_dict().items()}
    return golden_recipe_state_dict(shapes, seed)


def _transformers_model(text_config: dict, state_dict: dict[str, torch.Tensor], directory: Path):
    """transformers' native DeepseekV3ForCausalLM from the same per-expert keys (spec §11)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the optional second reference")
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(text_config))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"))
    return transformers.DeepseekV3ForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def golden_state_dict(golden_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in golden_weights.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def golden_model(golden_dir: Path, golden_state_dict: dict[str, torch.Tensor]) -> DeepseekV3ForCausalLM:
    return _build_loaded(_text_config(golden_dir / "config.json"), golden_state_dict)


# --- official golden tensors ---------------------------------------------------------------------------

def test_keys_equal_official_and_no_buffers(golden_dir: Path, golden_state_dict: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(_text_config(golden_dir / "config.json"))
    assert set(model.state_dict()) == set(golden_state_dict)
    assert list(model.buffers()) == []


def test_prompt_embeds_reproduce_golden_hidden_states_and_logits(golden_model: DeepseekV3ForCausalLM,
                                                                 golden: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        out = golden_model(inputs_embeds=golden["prompt.hidden_states.0"], output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 4
    torch.testing.assert_close(out.hidden_states[0], golden["prompt.hidden_states.0"], atol=0, rtol=0)
    for i in (1, 2, 3):
        torch.testing.assert_close(out.hidden_states[i], golden[f"prompt.hidden_states.{i}"], atol=ATOL, rtol=RTOL)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, golden["prompt.logits"], atol=ATOL, rtol=RTOL)


def test_text_only_ids_reproduce_golden_logits(golden_model: DeepseekV3ForCausalLM,
                                               golden: dict[str, torch.Tensor]) -> None:
    ids = golden["text_only.input_ids"]
    with torch.no_grad():
        logits = golden_model(input_ids=ids).logits
        masked = golden_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits, golden["text_only.logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(masked, logits, atol=1e-6, rtol=1e-6)  # boolean-mask path == is_causal path


# --- transformers' DeepseekV3ForCausalLM as a second reference ---------------------------------------

def test_matches_transformers_on_golden_weights(golden_dir: Path, golden_state_dict: dict[str, torch.Tensor],
                                                golden_model: DeepseekV3ForCausalLM,
                                                golden: dict[str, torch.Tensor], tmp_path: Path) -> None:
    text_config = json.loads((golden_dir / "config.json").read_text())["text_config"]
    hf = _transformers_model(text_config, golden_state_dict, tmp_path)
    embeds = golden["prompt.hidden_states.0"]
    with torch.no_grad():
        ours = golden_model(inputs_embeds=embeds, output_hidden_states=True)
        ref = hf(inputs_embeds=embeds, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, ref.logits.float(), atol=ATOL, rtol=RTOL)
    for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_matches_transformers_with_q_lora_and_group_routing(tmp_path: Path) -> None:
    cfg = _text_config(QLORA_CONFIG)
    assert cfg.q_lora_rank and cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    sd = _random_state_dict(cfg, seed=7)
    ours = _build_loaded(cfg, sd)
    assert {"q_a_proj", "q_a_layernorm", "q_b_proj"} <= {n for n, _ in ours.model.layers[0].self_attn.named_children()}
    hf = _transformers_model(json.loads(QLORA_CONFIG.read_text())["text_config"], sd, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits.float()[real], atol=ATOL, rtol=RTOL)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x[real], y[real], atol=ATOL, rtol=RTOL)


# --- padding, positions, tying, training ---------------------------------------------------------------

def test_left_padded_row_equals_row_alone(golden_model: DeepseekV3ForCausalLM,
                                          golden: dict[str, torch.Tensor]) -> None:
    ids = golden["text_only.input_ids"][0]
    short, pad = ids[:20], 997
    batch = torch.stack([ids, torch.cat((torch.full((15,), pad), short))])
    mask = torch.ones_like(batch)
    mask[1, :15] = 0
    with torch.no_grad():
        both = golden_model(input_ids=batch, attention_mask=mask).logits
        alone = golden_model(input_ids=short[None]).logits
    assert torch.isfinite(both).all()  # pad queries attend to themselves: no NaN rows
    torch.testing.assert_close(both[1, 15:], alone[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(both[0], golden["text_only.logits"][0], atol=ATOL, rtol=RTOL)


def test_explicit_positions_equal_default(golden_model: DeepseekV3ForCausalLM,
                                          golden: dict[str, torch.Tensor]) -> None:
    ids = golden["text_only.input_ids"]
    with torch.no_grad():
        default = golden_model(input_ids=ids).logits
        explicit = golden_model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits
        shifted = golden_model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None] + 3).logits
    torch.testing.assert_close(explicit, default, atol=0, rtol=0)
    # RoPE only sees relative positions: a global shift changes logits by rounding only
    torch.testing.assert_close(shifted, default, atol=ATOL, rtol=RTOL)


def test_tied_embeddings_survive_meta_build_and_assign_load() -> None:
    cfg = _text_config(QLORA_CONFIG)
    cfg.tie_word_embeddings = True
    sd = _random_state_dict(cfg, seed=3)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model = _build_loaded(cfg, sd)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model(input_ids=ids).logits, h @ sd["model.embed_tokens.weight"].T)


def test_backward_reaches_attention_router_and_experts() -> None:
    cfg = _text_config(QLORA_CONFIG)
    model = _build_loaded(cfg, _random_state_dict(cfg, seed=5)).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)).backward()
    layer = model.model.layers[1]
    for p in (layer.self_attn.q_a_proj.weight, layer.self_attn.kv_b_proj.weight, layer.mlp.gate.weight,
              layer.mlp.shared_experts.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.mlp.gate.e_score_correction_bias.grad is None
    assert any(e.down_proj.weight.grad is not None for e in layer.mlp.experts)


# --- input validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(), "pass exactly one of input_ids and inputs_embeds (got neither)"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.long), inputs_embeds=torch.zeros(1, 3, 64)),
     "pass exactly one of input_ids and inputs_embeds (got both)"),
    (dict(input_ids=torch.tensor([[5, 1000]])), "input_ids contains 1000, outside the vocabulary [0, 1000)"),
    (dict(input_ids=torch.tensor([[-1, 5]])), "input_ids contains -1, outside the vocabulary [0, 1000)"),
    (dict(input_ids=torch.tensor([1, 2, 3])), "input_ids must have shape (batch, seq) with seq >= 1, got (3,)"),
    (dict(input_ids=torch.ones(1, 3)), "input_ids must be an integer tensor, got torch.float32"),
    (dict(inputs_embeds=torch.zeros(1, 3, 48)), "inputs_embeds must have shape (batch, seq, 64), got (1, 3, 48)"),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5)),
     "attention_mask must be a 2-D padding mask of shape (2, 4) like the inputs, got (2, 5)"),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=torch.arange(3)[None]),
     "position_ids must have shape (2, 4) or (1, 4), got (1, 3)"),
])
def test_input_errors_name_the_numbers(golden_model: DeepseekV3ForCausalLM, kwargs: dict, message: str) -> None:
    with pytest.raises(KimiVLInputError) as err:
        golden_model(**kwargs)
    assert str(err.value) == message
