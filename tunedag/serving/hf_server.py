"""The fallback server (serve.backend: hf) for machines where vLLM cannot run.

A small OpenAI-compatible API over HF `generate`, one request at a time, with the endpoints tunedag
uses: /health, /v1/models, /v1/chat/completions (streaming too) and vLLM's /tokenize. Errors have
OpenAI's shape and vLLM's status codes (401 bad key, 404 unknown model, 400 over-long prompt), so
clients, serve_check and the tests treat both backends alike. Started by tunedag/serving/server.py:
`python -m tunedag.serving.hf_server --model DIR [--adapter DIR] ...`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from typing import Iterator

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from transformers import TextIteratorStreamer

from tunedag.data.chat import end_of_turn_id, render
from tunedag.model.loading import load_model, load_tokenizer

BACKEND = "hf-fallback"


class TokenStreamer(TextIteratorStreamer):
    """Hands out text after every generated token. HF's streamer holds text back until a word
    ends, so a long run without spaces (or a random model) would arrive in one piece; this one
    holds back only an incomplete UTF-8 character (a split multi-byte character decodes to U+FFFD)."""

    def put(self, value) -> None:
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend((value[0] if value.dim() > 1 else value).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if not text.endswith("\ufffd"):
            self.on_finalized_text(text[self.print_len :])
            self.print_len = len(text)


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def create_app(model, tokenizer, served_model_name: str, max_model_len: int, api_key: str | None) -> FastAPI:
    app = FastAPI(title=f"tunedag fallback server ({BACKEND})")
    eot = end_of_turn_id(tokenizer)
    lock = threading.Lock()  # HF generate serves one request at a time: that is the fallback's limit

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        # Like vLLM: only the /v1 API needs the key.
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, 401)
        return await call_next(request)

    @app.get("/health")
    def health():
        return {}

    @app.get("/v1/models")
    def models():
        card = {"id": served_model_name, "object": "model", "created": int(time.time()), "max_model_len": max_model_len,
                "owned_by": f"tunedag {BACKEND}: HF generate, one request at a time (vLLM fallback)"}
        return {"object": "list", "data": [card]}

    def prompt_ids(body: dict) -> list[int]:
        if "messages" in body:
            text = render(tokenizer, body["messages"], body.get("add_generation_prompt", True))
            return tokenizer(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]
        return tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]

    def check_request(body: dict) -> JSONResponse | None:
        if body.get("model") not in (None, served_model_name):
            return error(404, f"The model `{body.get('model')}` does not exist. Valid aliases: {served_model_name}.",
                         "NotFoundError", "model")
        if not isinstance(body.get("messages", body.get("prompt")), (list, str)):
            return error(400, "give `messages` (a list of {role, content}) or `prompt`", "BadRequestError", "messages")
        return None

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await request.json()
        if (bad := check_request(body)) is not None:
            return bad
        ids = prompt_ids(body)
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.json()
        if (bad := check_request(body)) is not None:
            return bad
        ids = prompt_ids(body)
        if len(ids) >= max_model_len:
            return error(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                         f"contains {len(ids)} input tokens. Please reduce the length of the input prompt.",
                         "BadRequestError", "input_tokens")
        max_tokens = min(body.get("max_tokens") or body.get("max_completion_tokens") or max_model_len, max_model_len - len(ids))
        temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
        sampling = {"do_sample": temperature > 0}
        if temperature > 0:
            sampling.update(temperature=temperature, top_p=float(body.get("top_p") or 1.0))
        if body.get("seed") is not None:
            torch.manual_seed(int(body["seed"]))
        stream = generate_stream(ids, max_tokens, sampling)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served_model_name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse(stream, meta, len(ids), include_usage), media_type="text/event-stream")
        # Not streamed: the whole answer, generated off the event loop like the streamed one.
        text, n_out, finish = await run_in_threadpool(lambda: drain(stream))
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}

    def generate_stream(ids: list[int], max_tokens: int, sampling: dict) -> Iterator[str | tuple[int, str]]:
        """Yields text pieces as they are generated, then (completion tokens, finish reason)."""
        with lock:
            streamer = TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict = {}

            def work():
                try:
                    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=max_tokens, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id,
                                         streamer=streamer, **sampling)
                    result["new"] = out[0, len(ids):].tolist()
                except BaseException as exc:  # surface it in the request, do not hang the streamer
                    result["error"] = exc
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
            if "error" in result:
                raise result["error"]
            new = result["new"]
            finished = eot in new
            yield (new.index(eot) + 1 if finished else len(new)), ("stop" if finished else "length")

    return app


def drain(stream: Iterator) -> tuple[str, int, str]:
    pieces = list(stream)
    n_out, finish = pieces.pop()
    return "".join(pieces), n_out, finish


def sse(stream: Iterator, meta: dict, n_prompt: int, include_usage: bool) -> Iterator[str]:
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in stream:
        if isinstance(piece, tuple):
            n_out, finish = piece
            yield chunk({}, finish)
            if include_usage:
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
                yield chunk({}, usage=usage, choices=False)
        else:
            yield chunk({"content": piece})
    yield "data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", help="a PEFT adapter folder to apply on top of --model")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    print(f"tunedag {BACKEND} server (vLLM fallback: HF generate, one request at a time): "
          f"{args.served_model_name} at http://{args.host}:{args.port}/v1", flush=True)
    app = create_app(model, tokenizer, args.served_model_name, args.max_model_len, args.api_key)
    # A short graceful shutdown: queued requests would otherwise hold SIGTERM up for minutes.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
