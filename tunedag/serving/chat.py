"""Chat with the model in the terminal (XTuner's `xtuner chat`): `tunedag chat`.

Two ways, both multi-turn and streamed token by token:
  - against a running server (default: the one `tunedag serve` starts, from serve.*):
        tunedag chat [--url http://127.0.0.1:8000/v1] [--model tunedag]
  - directly against a model folder, no server (HF generate in this process):
        tunedag chat --model-dir models/merged
Either way the model's own chat template renders the conversation, so the system-prompt policy
is the one training used. Commands: /reset starts over, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Callable, Iterator

from tunedag.core.errors import UserError, command_main
from tunedag.core.params import load_params

Generate = Callable[[list[dict]], Iterator[str]]


def server_generate(url: str, model: str, api_key: str | None, temperature: float, max_tokens: int) -> Generate:
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0)

    def generate(messages: list[dict]) -> Iterator[str]:
        try:
            stream = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                    max_tokens=max_tokens, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIConnectionError:
            raise UserError(f"no server at {url}: start one with `tunedag serve`, or chat with a "
                            "model folder directly: --model-dir models/merged.") from None
        except openai.APIStatusError as exc:
            raise UserError(f"the server at {url} refused the request ({exc.status_code}): {exc.message}") from None

    return generate


def local_generate(model_dir: str, temperature: float, max_tokens: int, threads: int) -> Generate:
    import torch

    from tunedag.data.chat import end_of_turn_id, render
    from tunedag.model.loading import load_model, load_tokenizer
    from tunedag.serving.hf_server import TokenStreamer

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    eot = end_of_turn_id(tokenizer)

    def generate(messages: list[dict]) -> Iterator[str]:
        ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False,
                        return_tensors="pt")
        streamer = TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        kwargs = dict(**ids, max_new_tokens=max_tokens, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id,
                      streamer=streamer, **sampling)
        # generate() runs in a thread and hands text to the streamer as it goes.
        thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()

    return generate


def chat_loop(generate: Generate, system: str | None, read: Callable[[str], str] = input, write=sys.stdout) -> None:
    """Read a line, stream the answer, keep the history; /reset and /exit are commands."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write.write("\n")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(start)
            write.write("(new conversation)\n")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        write.write("bot> ")
        pieces = []
        for piece in generate(messages):
            pieces.append(piece)
            write.write(piece)
            write.flush()
        write.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces).strip()})


@command_main("chat")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="the server's OpenAI base URL (default: from serve.host/port)")
    parser.add_argument("--model", help="the served model name (default: serve.served_model_name)")
    parser.add_argument("--api-key", help="default: serve.api_key")
    parser.add_argument("--model-dir", help="chat with this model folder directly instead of a server")
    parser.add_argument("--system", help="a system prompt (default: none, so the template's policy applies)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    params = load_params()
    serve = params.serve
    if args.model_dir:
        generate = local_generate(args.model_dir, args.temperature, args.max_tokens, params.threads)
        where = args.model_dir
    else:
        url = args.url or f"http://{serve.host}:{serve.port}/v1"
        generate = server_generate(url, args.model or serve.served_model_name, args.api_key or serve.api_key,
                                   args.temperature, args.max_tokens)
        where = url
    print(f"chatting with {where} (/reset starts over, /exit quits)")
    chat_loop(generate, args.system)


if __name__ == "__main__":
    main()
