"""The ``kimivl`` command: one entry point with subcommands (argparse, like the serving engines).

Subcommands: ``info`` (config summary, parameter counts, memory per dtype), ``train`` (one fine-tuning
run from a YAML config, see ``docs/finetune.md``), ``chat`` (one-shot or interactive, streamed),
``serve`` (OpenAI-compatible HTTP server with a chat page, see ``docs/serving.md``) and ``run-batch`` (an OpenAI
batch file answered offline by the server's code).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_summary(path: str) -> dict:
    """Architecture numbers of a checkpoint or config directory, computed on the meta device."""
    import torch

    from kimivl.configuration import KimiVLConfig
    from kimivl.modeling import KimiVLForConditionalGeneration

    config = KimiVLConfig.from_pretrained(path)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    t = config.text_config
    routed = sum(count(layer.mlp.experts) for layer in model.language_model.model.layers if hasattr(layer.mlp, "experts"))
    active_routed = routed * t.num_experts_per_tok // t.n_routed_experts if t.n_routed_experts else 0
    total = count(model)
    lm = count(model.language_model)
    from kimivl.quantization.int8 import quantizable

    # quantization="int8": the decoder's linear layers at one byte a weight (+ a float32 scale per row), the rest bf16
    layers = [m for _, m in quantizable(model)]
    int8_weights = sum(m.weight.numel() for m in layers)
    int8_bytes = (total - int8_weights) * 2 + int8_weights + 4 * sum(m.out_features for m in layers)
    return {
        "path": str(path),
        "parameters": {
            "total": total,
            "vision_tower": count(model.vision_tower),
            "multi_modal_projector": count(model.multi_modal_projector),
            "language_model": lm,
            "language_model_active_per_token": lm - routed + active_routed,
        },
        "weights_bytes": {**{name: total * size for name, size in _DTYPE_BYTES.items()}, "int8": int8_bytes},
        "mla_cache_bytes_per_token_bf16": (t.kv_lora_rank + t.qk_rope_head_dim) * t.num_hidden_layers * 2,
        "vision": {k: getattr(config.vision_config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "patch_size")},
        "text": {k: getattr(t, k) for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                           "num_experts_per_tok", "n_shared_experts", "kv_lora_rank",
                                           "q_lora_rank", "vocab_size", "max_position_embeddings")},
    }


def _cmd_info(args: argparse.Namespace) -> int:
    summary = model_summary(args.path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    p = summary["parameters"]
    print(f"{summary['path']}")
    print(f"  parameters        {p['total']:>16,}")
    print(f"    vision_tower    {p['vision_tower']:>16,}")
    print(f"    projector       {p['multi_modal_projector']:>16,}")
    print(f"    language_model  {p['language_model']:>16,}  (active per token: {p['language_model_active_per_token']:,})")
    for name, size in summary["weights_bytes"].items():
        print(f"  weights {name:<9} {size / 2**30:>12.2f} GiB")
    print(f"  MLA cache (bf16)  {summary['mla_cache_bytes_per_token_bf16']:>12,} bytes/token")
    print(f"  vision {summary['vision']}")
    print(f"  text   {summary['text']}")
    return 0


def _parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists), else kept as a string."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected key=value")
    key, value = text.split("=", 1)
    try:
        import yaml

        return key.strip(), yaml.safe_load(value)
    except ImportError:
        return key.strip(), value


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from kimivl.training import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = dict(_parse_override(o) for o in args.overrides)
    import torch.distributed as dist

    rank = 0
    try:
        result = train(args.config, overrides=overrides)
    finally:
        if dist.is_available() and dist.is_initialized():  # under torchrun: leave the group cleanly
            rank = dist.get_rank()
            dist.barrier()
            dist.destroy_process_group()
    if rank == 0:
        logging.getLogger("kimivl.train").info("done: %d steps, final loss %s, export %s, metrics %s", result.step,
                                               f"{result.losses[-1]:.4f}" if result.losses else "n/a",
                                               result.export_dir, result.metrics_file)
    return 0


CHAT_HELP = """commands: /image PATH, /video PATH, /document PATH (attach to the next question),
          /reset (new conversation), /quit (or Ctrl-D)"""


def _generation_settings(args: argparse.Namespace) -> dict:
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed}
    if args.temperature is not None and args.temperature > 0:
        settings["do_sample"] = True
    elif args.temperature == 0:
        settings.pop("temperature")
        settings["do_sample"] = False
    return {k: v for k, v in settings.items() if v is not None}


def _print_turn(session, question: str, show_thinking: bool, out) -> None:
    """Stream the answer; a Thinking model's reasoning (``◁think▷…◁/think▷``) is printed as it comes with
    ``--show-thinking``, else left out (only the answer after it is printed)."""
    from kimivl.processing import ThinkingStream

    split = ThinkingStream()
    for delta in session.ask(question):
        text = delta if show_thinking else split.push(delta)[1]
        if text:
            out.write(text)
            out.flush()
    if not show_thinking:
        out.write(split.flush()[1])
    out.write("\n")
    out.flush()


def _cmd_chat(args: argparse.Namespace) -> int:
    import logging

    from kimivl.chat.session import ChatSession

    logging.basicConfig(level=logging.WARNING)
    session = ChatSession.from_pretrained(args.model, dtype=args.dtype, device=args.device, progress=True,
                                          quantization=args.quantization, system=args.system,
                                          generation=_generation_settings(args))
    for kind in ("image", "video", "document"):
        for source in getattr(args, kind) or []:
            session.attach(kind, source)
    if args.prompt:
        _print_turn(session, " ".join(args.prompt), args.show_thinking, sys.stdout)
        return 0
    print(f"kimivl chat ({args.model or 'demo model'}); {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
        elif command in ("/image", "/video", "/document"):
            if not rest.strip():
                print(f"usage: {command} PATH", file=sys.stderr)
                continue
            session.attach(command[1:], rest.strip())
            print(f"(attached {command[1:]} {rest.strip()})", file=sys.stderr)
        elif command.startswith("/"):
            print(CHAT_HELP, file=sys.stderr)
        else:
            try:
                _print_turn(session, line, args.show_thinking, sys.stdout)
            except ValueError as e:  # bad media or an over-long conversation: the session dropped the media
                print(f"error: {e}", file=sys.stderr)


def _limits(args: argparse.Namespace) -> Any:
    """The ``ServerLimits`` of the flags (each flag is a field's name with dashes)."""
    from dataclasses import fields

    from kimivl.chat.limits import ServerLimits

    return ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits) if hasattr(args, f.name)})


def _server_stack(args: argparse.Namespace) -> Any:
    """Logging as ``--log-level`` says, and the server module (a clear error without the serve extra)."""
    import logging

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from kimivl.chat import server
    except ImportError as e:
        raise ValueError(str(e)) from e
    return server


def _cmd_serve(args: argparse.Namespace) -> int:
    _server_stack(args).serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
                              dtype=args.dtype, device=args.device, limits=_limits(args), log_level=args.log_level,
                              reasoning_parser=args.reasoning_parser, quantization=args.quantization)
    return 0


def _cmd_run_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    server = _server_stack(args)
    from kimivl.chat.batch import run_batch

    source = Path(args.input_file)
    if not source.is_file():
        raise ValueError(f"--input-file {source}: no such file")
    model, processor, name = server.load(args.model, args.served_model_name, args.dtype, args.device,
                                         args.quantization)
    lines = source.read_text(encoding="utf-8").splitlines()
    out = Path(args.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for record in run_batch(model, processor, lines, model_name=name, limits=_limits(args),
                                reasoning_parser=args.reasoning_parser, concurrency=args.concurrency):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


def _port(text: str) -> int:
    """``--port``: an integer 0-65535 (the socket layer would fail with an OverflowError traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def _add_model_and_limit_flags(p: argparse.ArgumentParser) -> None:
    """What ``serve`` and ``run-batch`` share: the model, the request bounds and the answer options."""
    from kimivl.chat.limits import ServerLimits

    d = ServerLimits()
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the shipped demo model)")
    p.add_argument("--served-model-name", default=None,
                   help="model id requests must use or leave out (default: the directory name)")
    p.add_argument("--dtype", default="auto",
                   help="auto (config torch_dtype, bfloat16 for the released models) | bfloat16 | float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantization", "-q", choices=["int8"], default=None,
                   help="store the decoder's linear layers as weight-only int8 (docs/quantization.md): about half "
                        "the memory, faster decoding on a CPU")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image and video URLs (refused by default)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="allow file:// URLs / absolute paths of images and videos under DIR (refused by default)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body bound")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-videos", type=int, default=d.max_videos, help="videos per request (video_url parts)")
    p.add_argument("--max-documents", type=int, default=d.max_documents, help="PDFs per request (file parts)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="width x height per image or video frame")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting for the model")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="answer length when a request gives none (default: the model's generation config)")
    p.add_argument("--prompt-caches", type=int, default=d.prompt_caches,
                   help="conversations whose latents are kept for their next turn (0: off)")
    p.add_argument("--prompt-cache-gib", type=float, default=d.prompt_cache_gib,
                   help="memory the kept latents may take; the least recently used are dropped first")
    p.add_argument("--reasoning-parser", default=None, choices=["kimi_vl"],
                   help="Thinking models: return the ◁think▷ block in reasoning_content, the answer in content")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _add_serve_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server + chat page (docs/serving.md)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (0: any free port)")
    _add_model_and_limit_flags(serve)
    serve.set_defaults(func=_cmd_serve)
    batch = sub.add_parser("run-batch", help="answer an OpenAI batch file (JSONL) offline with the server's code "
                                             "(docs/serving.md)")
    batch.add_argument("-i", "--input-file", required=True, help="JSONL: one {custom_id, method, url, body} a line")
    batch.add_argument("-o", "--output-file", required=True, help="JSONL: one {id, custom_id, response, error} a line")
    batch.add_argument("--concurrency", type=int, default=4, help="requests prepared while the model answers one")
    _add_model_and_limit_flags(batch)
    batch.set_defaults(func=_cmd_run_batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimivl", description="Kimi-VL in native PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="config summary, parameter counts, memory per dtype")
    info.add_argument("path", help="checkpoint or config directory (or a config.json)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    train = sub.add_parser("train", help="fine-tune from a YAML config (docs/finetune.md); works under torchrun")
    train.add_argument("config", help="training config (YAML or JSON)")
    train.add_argument("overrides", nargs="*", help="key=value pairs replacing config keys, e.g. max_steps=10")
    train.set_defaults(func=_cmd_train)
    chat = sub.add_parser("chat", help="chat with a model (one-shot with a PROMPT, interactive without)")
    chat.add_argument("prompt", nargs="*", help="question; omit for an interactive session")
    chat.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the shipped demo model)")
    chat.add_argument("--image", action="append", help="image file (repeatable)")
    chat.add_argument("--video", action="append", help="video file (repeatable)")
    chat.add_argument("--document", action="append", help="PDF file (repeatable)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None, help="0 = greedy; > 0 samples")
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--top-k", type=int, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--dtype", default="auto",
                      help="auto (config torch_dtype, bfloat16 for the released models) | bfloat16 | float32")
    chat.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    chat.add_argument("--quantization", "-q", choices=["int8"], default=None,
                      help="store the decoder's linear layers as weight-only int8 (docs/quantization.md): about "
                           "half the memory, faster decoding on a CPU")
    chat.add_argument("--show-thinking", action="store_true", help="print the reasoning of Thinking models")
    chat.set_defaults(func=_cmd_chat)
    _add_serve_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kimivl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
