"""The graph decode step (kimivl.generation.cuda_graph) and the sync-free MoE path it relies on.

On the CPU the static step runs eagerly (``capture=False``): same buffers, windows, masks and slot writes as
the captured graph, checked against the plain decode step and the golden logits. With a CUDA device the
captured graphs are checked against the golden continuation and the eager GPU path.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from kimivl.decoder import DeepseekV3MoE, MLACache
from kimivl.generation import cuda_graph, decode_step, prefill, stream
from kimivl.generation.cuda_graph import GraphDecoder, window_for
from kimivl.modeling import KimiVLForConditionalGeneration
from kimivl.ops.moe import moe_dispatch, moe_gathered, moe_grouped

STEP_ATOL = STEP_RTOL = 1e-4  # fp32 logits vs the official implementation (golden README)
GOLDEN_NEW = [525, 638, 345, 480, 168, 557, 83, 743]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: bf16 paths that sum in another order differ by rounding, elementwise up to a
    bf16 ulp of the larger terms, so they are compared as a whole (MoE outputs here are ~1; 1e-2 ~ 3 ulp)."""
    return float((got.float() - want.float()).norm() / want.float().norm())


def _prompt(golden: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
    return {"input_ids": golden["prompt.input_ids"].to(device), "pixel_values": golden["prompt.pixel_values"].to(device),
            "image_grid_hws": golden["prompt.image_grid_hws"]}


def test_windows_cover_the_slot_grow_geometrically_and_stop_at_max_len() -> None:
    previous = 0
    for slot in range(0, 40_000, 7):
        w = window_for(slot, 1 << 20)
        assert w > slot and w >= previous
        assert w <= max(cuda_graph.MIN_WINDOW, (slot + 1) * cuda_graph.WINDOW_GROWTH + cuda_graph.MIN_WINDOW // 2)
        previous = w
    assert window_for(5, 100) == 100 and window_for(99, 100) == 100
    distinct = {window_for(s, 1 << 20) for s in range(16_384)}
    assert len(distinct) <= 25  # captures over a 16K-token run


def test_weights_key_changes_when_parameters_are_replaced_not_when_updated(golden_dir: Path) -> None:
    """The kept runner's graphs read weights at fixed addresses: the key must follow every replacement (even of
    the last expert alone, or by a LoRA wrapper) and stay put for in-place updates."""
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    lm = model.language_model
    key = cuda_graph._weights_key(lm)
    lm.load_state_dict({k: v.clone() for k, v in lm.state_dict().items()})  # copies into the same storage
    assert cuda_graph._weights_key(lm) == key
    last = lm.model.layers[-1].mlp.experts[-1].down_proj
    last.weight = torch.nn.Parameter(last.weight.detach().clone())
    moved = cuda_graph._weights_key(lm)
    assert moved != key
    lm.load_state_dict(lm.state_dict(), assign=True)  # same tensors assigned: nothing moved
    assert cuda_graph._weights_key(lm) == moved
    model.to(torch.bfloat16)
    assert cuda_graph._weights_key(lm) != moved
    peft = pytest.importorskip("peft")
    before = cuda_graph._weights_key(lm)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=r".*layers\.0\.self_attn\.o_proj"), lm)
    assert cuda_graph._weights_key(lm) != before


def test_static_step_matches_golden_step_logits(model: KimiVLForConditionalGeneration,
                                                golden: dict[str, torch.Tensor], monkeypatch) -> None:
    """The eager form of the captured step, with windows small enough that the 7 steps cross several."""
    monkeypatch.setattr(cuda_graph, "MIN_WINDOW", 8)
    _golden_steps(model, GraphDecoder(model.language_model, 1, 62, torch.float32, "cpu", capture=False), golden, "cpu")


def _padded_teacher_forced(lm: torch.nn.Module, golden: dict[str, torch.Tensor], device: str, dtype: torch.dtype,
                           steps: int, capture: bool, tol: float) -> GraphDecoder:
    """Two rows of different lengths (left padded) fed the same tokens through the runner and the plain decode
    step; their logits must agree at every step."""
    long_ids = golden["text_only.input_ids"]  # (1, 35)
    ids = torch.cat((long_ids, torch.cat((torch.full((1, 10), 997), long_ids[:, 10:]), dim=1))).to(device)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    full = torch.cat((mask, torch.ones_like(mask[:, :1]).expand(2, steps)), dim=1)
    runner = GraphDecoder(lm, 2, 35 + steps, dtype, device, capture=capture)
    plain = MLACache.from_config(lm.config, 2, 35 + steps, dtype=dtype, device=device)
    with torch.inference_mode():
        a = prefill(lm, ids, runner.cache, mask)
        b = prefill(lm, ids, plain, mask)
        runner.start(mask)
        for _ in range(steps):
            token = b.argmax(-1)
            a = runner.step(token)
            b = decode_step(lm, token, plain, full[:, :plain.length + 1])
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return runner


def _golden_steps(model: KimiVLForConditionalGeneration, runner: GraphDecoder,
                  golden: dict[str, torch.Tensor], device: str) -> None:
    """Prefill the golden prompt into the runner's cache and take the 7 golden greedy steps through it."""
    p = _prompt(golden, device)
    with torch.inference_mode():
        logits = [prefill(model, p["input_ids"], runner.cache, None, p["pixel_values"], p["image_grid_hws"])]
        runner.start(None)
        for _ in range(7):
            logits.append(runner.step(logits[-1].argmax(-1)))
    torch.testing.assert_close(torch.cat(logits).cpu(), golden["generate.step_logits"], rtol=STEP_RTOL,
                               atol=STEP_ATOL)
    assert torch.cat(logits).argmax(-1).tolist() == GOLDEN_NEW
    assert runner.cache.length == 62


def test_static_step_matches_plain_decode_under_left_padding(model: KimiVLForConditionalGeneration,
                                                             golden: dict[str, torch.Tensor]) -> None:
    """Positions and the key mask of every row are right (float32: the two paths agree to rounding)."""
    runner = _padded_teacher_forced(model.language_model, golden, "cpu", torch.float32, 6, False, 1e-5)
    assert runner.cache.length == 35 + 6 and not runner.graphs


def test_generate_through_the_runner_equals_plain_generate(model: KimiVLForConditionalGeneration,
                                                           golden: dict[str, torch.Tensor], monkeypatch) -> None:
    """generate() wired to the runner (as on CUDA; eager steps here) gives the golden tokens, twice (reuse);
    another prompt length reuses the runner too."""
    monkeypatch.setattr(cuda_graph, "applies", lambda lm, b, device: True)
    used = []
    real = cuda_graph.graph_decoder_for
    monkeypatch.setattr(cuda_graph, "graph_decoder_for", lambda *a: used.append(real(*a)) or used[-1])
    for _ in range(2):
        out = model.generate(**_prompt(golden), max_new_tokens=8, eos_token_id=[])
        assert torch.equal(out, golden["generate.sequences"])
    model.generate(input_ids=golden["text_only.input_ids"], max_new_tokens=5, eos_token_id=[])  # 35 + 4 slots
    assert len(used) == 3 and used[0] is used[1] is used[2]  # cache lengths are rounded: one runner for both
    assert used[0].cache.max_len == cuda_graph.MIN_WINDOW
    lm = model.language_model
    old = lm.model.layers[-1].self_attn.o_proj.weight
    try:  # a replaced parameter (e.g. assign-loading) invalidates the kept runner and its graphs
        lm.model.layers[-1].self_attn.o_proj.weight = torch.nn.Parameter(old.detach().clone())
        model.generate(**_prompt(golden), max_new_tokens=2, eos_token_id=[])
        assert used[-1] is not used[0]
    finally:
        lm.model.layers[-1].self_attn.o_proj.weight = old


def test_interleaved_generations_never_share_a_runner(model: KimiVLForConditionalGeneration,
                                                      golden: dict[str, torch.Tensor], tokenizer, monkeypatch) -> None:
    """Two streams advanced in turn (as two threads would): the second gets a private runner, both answers
    equal their runs alone, and the kept runner is free afterwards."""
    monkeypatch.setattr(cuda_graph, "applies", lambda lm, b, device: True)
    image, text = _prompt(golden), {"input_ids": golden["text_only.input_ids"]}
    settings = dict(tokenizer=tokenizer, max_new_tokens=8, eos_token_id=[])
    alone = ["".join(stream(model, **inputs, **settings)) for inputs in (image, text)]
    first, second = stream(model, **image, **settings), stream(model, **text, **settings)
    got = ["", ""]
    for a, b in itertools.zip_longest(first, second, fillvalue=""):
        got[0] += a
        got[1] += b
    assert got == alone
    assert not cuda_graph._RUNNERS[model.language_model].busy


def test_graphs_apply_only_on_cuda_with_few_rows_per_expert(model: KimiVLForConditionalGeneration,
                                                            monkeypatch) -> None:
    lm = model.language_model  # 8 experts, top-2
    assert not cuda_graph.applies(lm, 1, torch.device("cpu"))
    assert cuda_graph.applies(lm, 4, torch.device("cuda"))
    assert not cuda_graph.applies(lm, 5, torch.device("cuda"))
    monkeypatch.setenv(cuda_graph.ENV_SWITCH, "0")
    assert not cuda_graph.applies(lm, 1, torch.device("cuda"))


# ------------------------------------------------------------------------------------------ sync-free MoE

def _moe(golden_dir: Path) -> DeepseekV3MoE:
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir)
    return model.language_model.model.layers[1].mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_moe_equals_grouped_dispatch(golden_dir: Path, dtype: torch.dtype) -> None:
    moe = _moe(golden_dir).to(dtype)
    x = torch.randn(3, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        idx, w, _ = moe.gate(x)
        want = moe_dispatch(x, idx, w, moe.experts)
        got = moe_gathered(x, idx, w, *moe.stacked_experts())
    assert _rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_stacked_experts_are_the_parameters(golden_dir: Path, tmp_path: Path) -> None:
    moe = _moe(golden_dir)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    gate, up, down = moe.stacked_experts()
    assert gate.shape == (8, *moe.experts[0].gate_proj.weight.shape)
    assert down.shape == (8, *moe.experts[0].down_proj.weight.shape)
    for e, expert in enumerate(moe.experts):  # views, not copies: the weights exist once
        assert expert.gate_proj.weight.data_ptr() == gate[e].data_ptr()
        assert expert.down_proj.weight.data_ptr() == down[e].data_ptr()
        # on the CPU an expert's up rows follow its gate rows: one (2I, D) matrix (DeepseekV3MoE._cpu_stack)
        assert expert.up_proj.weight.data_ptr() == gate[e].data_ptr() + gate[e].numel() * gate.element_size()
        assert expert.gate_proj.weight.is_contiguous() and expert.up_proj.weight.is_contiguous()
    assert moe.stacked_experts()[0] is gate  # cached
    state = moe.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    from kimivl.checkpoint import save_weights  # views of one storage still save (safetensors refuses shared memory)
    save_weights(state, tmp_path)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in before)
    moe.to(torch.float64)  # replaced parameters: the old stack is dropped at once and rebuilt on demand
    assert "_stacked" not in moe.__dict__
    assert moe.stacked_experts()[0].dtype == torch.float64


def test_moe_takes_the_sync_free_paths_only_off_cpu_without_autograd(golden_dir: Path) -> None:
    moe = _moe(golden_dir)
    x = torch.randn(2, moe.gate.weight.shape[1])
    idx = torch.zeros(2, 2, dtype=torch.long)
    assert moe._accelerator_path(x, idx) is None  # the CPU has its own decode path
    meta = torch.empty(2, x.shape[1], device="meta")
    with torch.no_grad():
        assert moe._accelerator_path(meta, idx) == "gather"  # 4 pairs <= 8 experts, no grouped GEMM off CUDA
        # 10 pairs > 8 experts: grouped GEMMs, which need bf16 CUDA tensors
        assert moe._accelerator_path(meta, torch.zeros(5, 2, dtype=torch.long)) is None
    assert moe._accelerator_path(meta, idx) is None  # autograd must reach the experts' own parameters


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason=f"torch {torch.__version__} has no _grouped_mm")
def test_grouped_moe_equals_grouped_dispatch(golden_dir: Path) -> None:
    moe = _moe(golden_dir).to(torch.bfloat16)
    x = torch.randn(40, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        idx, w, _ = moe.gate(x)
        want = moe_dispatch(x, idx, w, moe.experts)
        try:
            got = moe_grouped(x, idx, w, *moe.stacked_experts())
        except (RuntimeError, NotImplementedError) as e:  # older torch: CUDA-only kernel
            pytest.skip(f"torch._grouped_mm does not run on the CPU here: {e}")
    assert _rel(got, want) < 1e-2


# ------------------------------------------------------------------------------------------ CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")


@cuda
def test_captured_graphs_give_the_golden_continuation(golden_dir: Path, golden: dict[str, torch.Tensor],
                                                      monkeypatch) -> None:
    monkeypatch.setattr(cuda_graph, "MIN_WINDOW", 8)  # 7 steps over several windows: one capture each
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding's convolution
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    runner = GraphDecoder(model.language_model, 1, 62, torch.float32, "cuda")
    _golden_steps(model, runner, golden, "cuda")
    assert runner.capture and len(runner.graphs) == len({window_for(slot, 62) for slot in range(55, 62)}) > 1
    out = model.generate(**_prompt(golden, "cuda"), max_new_tokens=8, eos_token_id=[])
    assert out.cpu().tolist() == golden["generate.sequences"].tolist()


@cuda
def test_graph_steps_equal_eager_gpu_steps_in_bf16_with_padding(golden_dir: Path,
                                                                golden: dict[str, torch.Tensor]) -> None:
    """The replayed graphs and the eager GPU decode step differ only in the attention window (masked slots),
    so the logits agree to bf16 rounding."""
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, dtype=torch.bfloat16, device="cuda")
    runner = _padded_teacher_forced(model.language_model, golden, "cuda", torch.bfloat16, 24, True, 3e-2)
    assert runner.capture and runner.graphs


@cuda
@pytest.mark.parametrize("tokens", [1, 4, 40])
def test_moe_layer_on_cuda_bf16_takes_the_sync_free_paths_and_equals_dispatch(golden_dir: Path, tokens: int) -> None:
    """1 token (2 pairs <= 8 experts / 4) takes the gather path, 4 and 40 the grouped GEMMs; under capture (up to
    8 pairs) the gather path again, since torch._grouped_mm copies from the host and cannot be captured."""
    moe = _moe(golden_dir).to("cuda", torch.bfloat16)
    x = torch.randn(1, tokens, moe.gate.weight.shape[1], device="cuda").to(torch.bfloat16)
    with torch.inference_mode():
        idx, w, _ = moe.gate(x.view(tokens, -1))
        assert moe._accelerator_path(x, idx) == ("gather" if tokens == 1 else "grouped")
        want = moe_dispatch(x.view(tokens, -1), idx, w, moe.experts) + moe.shared_experts(x.view(tokens, -1))
        eager = moe(x)
        assert _rel(eager.view(tokens, -1), want) < 1e-2
        if tokens * 2 > 8:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            moe(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # raises if the layer synchronised with the host
            static = moe(x)
        graph.replay()
    assert _rel(static, eager) < 1e-2


@cuda
def test_compiled_graph_step_gives_the_golden_continuation(golden_dir: Path, golden: dict[str, torch.Tensor],
                                                           monkeypatch) -> None:
    """KIMIVL_COMPILE_DECODE=1: the step compiled by inductor (one compilation for every window), then captured."""
    monkeypatch.setenv(cuda_graph.COMPILE_SWITCH, "1")
    monkeypatch.setattr(cuda_graph, "MIN_WINDOW", 8)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    runner = GraphDecoder(model.language_model, 1, 62, torch.float32, "cuda")
    _golden_steps(model, runner, golden, "cuda")
    assert runner.capture and runner.graphs


@cuda
def test_transformers_generate_options_through_captured_graphs(golden_dir: Path, golden: dict[str, torch.Tensor],
                                                               monkeypatch) -> None:
    """generate's transformers options on the replayed graphs: each recorded step is its own tensor (a graph
    rewrites its output buffer every replay), and processors, min_new_tokens, inputs_embeds and
    num_return_sequences act on the replayed steps as on the CPU."""
    monkeypatch.setattr(cuda_graph, "MIN_WINDOW", 8)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    p = _prompt(golden, "cuda")
    out = model.generate(**p, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    assert out.sequences.cpu().tolist() == golden["generate.sequences"].tolist()
    for steps in (out.scores, out.logits):
        assert len({t.data_ptr() for t in steps}) == 8
        torch.testing.assert_close(torch.cat(steps).cpu(), golden["generate.step_logits"], rtol=STEP_RTOL,
                                   atol=STEP_ATOL)

    seen: list[list[int]] = []

    def ban_first_golden_token(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(ids[0].tolist())
        return scores.index_fill(1, torch.tensor([GOLDEN_NEW[0]], device=scores.device), float("-inf"))

    banned = model.generate(**p, max_new_tokens=3, eos_token_id=[], logits_processor=[ban_first_golden_token])
    assert int(banned[0, -3]) == int(golden["generate.step_logits"][0].topk(2).indices[1])
    assert seen[-1] == banned[0, :-1].tolist()

    held = model.generate(**p, max_new_tokens=8, eos_token_id=743, min_new_tokens=8)
    assert held[0, -8:-1].tolist() == GOLDEN_NEW[:7] and int(held[0, -1]) != 743

    with torch.inference_mode():
        embeds = model.embed_inputs(p["input_ids"], p["pixel_values"], p["image_grid_hws"])
    assert model.generate(inputs_embeds=embeds, max_new_tokens=8, eos_token_id=[])[0].tolist() == GOLDEN_NEW

    settings = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1.0, seed=0)
    copies = model.generate(**p, num_return_sequences=3, **settings)
    by_hand = model.generate(p["input_ids"].repeat(3, 1), pixel_values=p["pixel_values"].repeat(3, 1, 1, 1),
                             image_grid_hws=p["image_grid_hws"].repeat(3, 1), **settings)
    assert torch.equal(copies, by_hand) and len({tuple(r) for r in copies[:, -6:].tolist()}) > 1
    runner = cuda_graph._RUNNERS[model.language_model]
    assert runner.capture and runner.graphs


@cuda
def test_prompt_cache_through_captured_graphs(golden_dir: Path, golden: dict[str, torch.Tensor], monkeypatch) -> None:
    """The graph runner's cache is filled from a PromptCache and copied back: a repeated prompt reads all but its
    last token and gives the golden continuation again."""
    from kimivl.generation import PromptCache

    monkeypatch.setattr(cuda_graph, "MIN_WINDOW", 8)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    cache = PromptCache()
    for _ in range(2):
        out = model.generate(**_prompt(golden, "cuda"), max_new_tokens=8, eos_token_id=[], prompt_cache=cache)
        assert out.cpu().tolist() == golden["generate.sequences"].tolist()
    assert cache.reused == 54 and cache.cache.length == 62 and cache.cache.data.is_cuda
    assert cuda_graph._RUNNERS[model.language_model].graphs


@cuda
def test_structured_output_and_penalties_on_cuda(golden_dir: Path, golden: dict[str, torch.Tensor]) -> None:
    """The grammar's CPU bitmask and the penalties' tensors meet CUDA logits (graphs replaying the steps)."""
    import json

    pytest.importorskip("llguidance", reason="structured output needs llguidance")
    from kimivl.generation import GrammarConstraint, LogitBias, PresenceFrequencyPenalty
    from kimivl.processing import KimiVLProcessor

    processor = KimiVLProcessor.from_pretrained(golden_dir)
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    p = _prompt(golden, "cuda")
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    processors = [PresenceFrequencyPenalty(55, 0.5, 0.5), LogitBias({915: -100}, 1000),
                  GrammarConstraint.json_schema(processor, schema)]
    out = model.generate(**p, max_new_tokens=20, logits_processor=processors)
    assert json.loads(processor.decode(out[0, 55:].tolist(), skip_special_tokens=True))["color"] in ("red", "blue")
