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
