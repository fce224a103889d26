"""Chat with the model in the terminal (XTuner's `xtuner chat`): `tunedag chat`.

Two ways, both multi-turn:
  - against a running server (default: the one `tunedag serve` starts, from serve.*):
        tunedag chat [--url http://127.0.0.1:8000/v1] [--model tunedag]
    It checks that the server answers before it asks anything.
  - directly against a model folder, no server needed (HF generate in this process):
        tunedag chat --model-dir models/merged
Either way the model's own chat template renders the conversation, so the system-prompt policy
is the one training used.

It reads the questions from stdin:
  - interactive (a terminal): a `you>` prompt, the answer streamed token by token after `bot>`.
  - piped (`tunedag chat < questions.txt`): no prompts or banner; one question per line -> one
    answer per line on stdout, in order (newlines inside an answer become spaces). The lines are
    one conversation, as if typed: put /reset between questions to ask them independently.
    Blank lines are skipped and print nothing.
Commands: /reset starts over, /exit (or Ctrl-D / end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Callable, Iterator

from tunedag.core.errors import UserError, command_main
from tunedag.core.params import load_params

Generate = Callable[[list[dict]], Iterator[str]]

CHECK_TIMEOUT_S = 5  # a server that is up lists its models at once; a dead one must not leave the user waiting


def check_server(client, url: str, model: str) -> None:
    """Fail before the first prompt, not after the user has typed a question, when nothing answers
    at `url` (or it does not serve `model`)."""
    import openai

    try:
        served = [m.id for m in client.with_options(timeout=CHECK_TIMEOUT_S).models.list().data]
    except openai.APIConnectionError:  # refused, unreachable or timed out
        raise UserError(f"no server answers at {url}. Start one with `tunedag serve` (in another terminal), "
                        "pass its address with --url, or chat with a model folder without any server: "
                        "`tunedag chat --model-dir models/merged`.") from None
    except openai.AuthenticationError:
        raise UserError(f"the server at {url} refused the API key: pass the one it was started with "
                        "(--api-key, default serve.api_key).") from None
    except openai.APIStatusError as exc:
        raise UserError(f"the server at {url} refused to list its models ({exc.status_code}): {exc.message}. "
                        "Is --url the server's OpenAI base URL (ending in /v1)?") from None
    if model not in served:
        raise UserError(f"the server at {url} does not serve a model named {model!r} (it serves: "
                        f"{', '.join(served) or 'none'}): pass one of those with --model.")


def server_generate(url: str, model: str, api_key: str | None, temperature: float, max_tokens: int) -> Generate:
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0)
    check_server(client, url, model)

    def generate(messages: list[dict]) -> Iterator[str]:
        try:
            stream = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                    max_tokens=max_tokens, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIConnectionError:  # it answered the check, then went away
            raise UserError(f"the server at {url} stopped answering: restart it with `tunedag serve`, or chat "
                            "with a model folder directly: `tunedag chat --model-dir models/merged`.") from None
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


def one_line(answer: str) -> str:
    """The answer on one line, so that a script reading the output finds answer i on line i."""
    return " ".join(answer.splitlines())


def chat_loop(generate: Generate, system: str | None, read: Callable[[str], str] = input, write=sys.stdout,
              piped: bool = False) -> None:
    """Read a line, answer it, keep the history; /reset and /exit are commands. `piped`: no prompts
    or notices, each answer written whole on one line (the output is for a program, not a person)."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = read("" if piped else "you> ").strip()
        except EOFError:
            if not piped:
                write.write("\n")  # end the prompt line Ctrl-D left open
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(start)
            if not piped:
                write.write("(new conversation)\n")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        if piped:
            answer = "".join(generate(messages)).strip()
            write.write(one_line(answer) + "\n")
            write.flush()  # a program that writes a question and waits for its answer gets it now
        else:
            write.write("bot> ")
            pieces = []
            for piece in generate(messages):
                pieces.append(piece)
                write.write(piece)
                write.flush()
            write.write("\n")
            answer = "".join(pieces).strip()
        messages.append({"role": "assistant", "content": answer})


@command_main("chat")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="the server's OpenAI base URL (default: from serve.host/port)")
    parser.add_argument("--model", help="the served model name (default: serve.served_model_name)")
    parser.add_argument("--api-key", help="default: serve.api_key")
    parser.add_argument("--model-dir", help="chat with this model folder directly, without any server "
                                            "(e.g. models/merged)")
    parser.add_argument("--system", help="a system prompt (default: none, so the template's policy applies)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    params = load_params()
    serve = params.serve
    # Both ways fail (no server, no model) before anything is read from stdin.
    if args.model_dir:
        generate = local_generate(args.model_dir, args.temperature, args.max_tokens, params.threads)
        where = args.model_dir
    else:
        url = args.url or f"http://{serve.host}:{serve.port}/v1"
        generate = server_generate(url, args.model or serve.served_model_name, args.api_key or serve.api_key,
                                   args.temperature, args.max_tokens)
        where = url
    piped = not sys.stdin.isatty()
    if not piped:
        print(f"chatting with {where} (/reset starts over, /exit quits)")
    chat_loop(generate, args.system, piped=piped)


if __name__ == "__main__":
    main()
