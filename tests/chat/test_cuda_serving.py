"""The server with its model on a CUDA device: concurrent requests, each generation replaying CUDA graphs from
the model worker's thread, get the CPU model's answers. Skipped without CUDA (``scripts/gpu_check.sh`` runs it)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kimivl import KimiVLForConditionalGeneration

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture()
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on the CPU
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_concurrent_requests_on_cuda_get_the_cpu_answers(_no_tf32, tiny, golden_dir, golden_answer, h):
    text = [{"role": "user", "content": "Tell me a story."}]
    text_answer = h.reference_answer(tiny, text, max_new_tokens=16)  # the CPU model's
    jobs = [({"model": "kimivl-tiny", "messages": h.golden_messages(golden_dir)}, golden_answer) if i % 2 == 0
            else ({"model": "kimivl-tiny", "messages": text, "max_tokens": 16}, text_answer) for i in range(6)]
    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    server = h.start_server((model, tiny[1]), **h.TEST_LIMITS)
    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            replies = list(pool.map(lambda job: h.post_json(server, job[0]), jobs))
        for (status, body), (_, want) in zip(replies, jobs, strict=True):
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == want
        assert h.health(server)["requests"]["completed"] == len(jobs)
    finally:
        server.stop()


def test_logprobs_and_n_answers_on_cuda(_no_tf32, tiny, golden_dir, golden, h):
    """The logprobs recorded from replayed graph steps are the official step distributions; n sampled answers are
    the rows of the CUDA library's batch."""
    from kimivl.generation import generate

    model = KimiVLForConditionalGeneration.from_pretrained(golden_dir, device="cuda")
    processor = tiny[1]
    server = h.start_server((model, processor), **h.TEST_LIMITS)
    try:
        messages = h.golden_messages(golden_dir)
        status, body = h.post_json(server, {"model": "kimivl-tiny", "messages": messages, "logprobs": True,
                                            "top_logprobs": 3})
        assert status == 200, body
        entries = body["choices"][0]["logprobs"]["content"]
        rows = torch.log_softmax(golden["generate.step_logits"].double(), -1)
        assert len(entries) == 7  # the answer's tokens; the stop id adds no content
        for token, entry, row in zip(h.GOLDEN_ANSWER_IDS, entries, rows):
            assert abs(entry["logprob"] - float(row[token])) < 1e-4
            best = row.topk(3).values.tolist()
            assert all(abs(t["logprob"] - lp) < 1e-4 for t, lp in zip(entry["top_logprobs"], best, strict=True))

        status, body = h.post_json(server, {"model": "kimivl-tiny", "messages": messages, "n": 3,
                                            "temperature": 1.0, "seed": 5, "max_tokens": 6})
        assert status == 200, body
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": str(golden_dir / "inputs" / "image_70x98.png")},
                                          {"type": "text", "text": h.GOLDEN_QUESTION}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = generate(model, **inputs, max_new_tokens=6, do_sample=True, temperature=1.0, seed=5,
                           num_return_sequences=3, tokenizer=processor)
        expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
        assert [c["message"]["content"] for c in body["choices"]] == expected and len(set(expected)) > 1
    finally:
        server.stop()
