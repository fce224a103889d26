"""A small web chat page over the model server: `tunedag web             [--port 8080]`.

Serves tunedag/serving/static/index.html on 127.0.0.1 and relays the page's requests to the server's OpenAI
API (default: the one `tunedag serve` starts, from serve.*). Relaying, rather than the
browser calling the server itself, keeps serve.api_key out of the browser and needs no CORS.
Answers stream to the page as server-sent events, unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tunedag.core.errors import command_main
from tunedag.core.params import load_params
from tunedag.release.registry import serving_release

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(backend_url: str, model: str, api_key: str | None) -> FastAPI:
    """`backend_url`: the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1."""
    app = FastAPI(title="tunedag web chat")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.AsyncClient(base_url=backend_url, headers=headers, timeout=httpx.Timeout(600, connect=10))

    @app.get("/")
    def page():
        return FileResponse(PAGE)

    @app.get("/api/config")
    async def config():
        # The sidebar lists the server's models; the default one is preselected.
        try:
            models = [m["id"] for m in (await client.get("/models")).json()["data"]]
        except (httpx.HTTPError, KeyError, ValueError):
            models = []
        return {"model": model, "models": models or [model], "backend": backend_url,
                "release": serving_release(backend_url)}

    @app.post("/api/chat")
    async def chat(request: Request):
        body = {**(await request.json()), "stream": True}
        upstream = await client.send(client.build_request("POST", "/chat/completions", json=body), stream=True)
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            return Response(content, upstream.status_code, media_type="application/json")
        return StreamingResponse(upstream.aiter_raw(), media_type="text/event-stream",
                                 background=BackgroundTask(upstream.aclose))

    return app


@command_main("web")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tunedag web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--url", help="the server's OpenAI base URL (default: from serve.host/port)")
    parser.add_argument("--model", help="default: serve.served_model_name")
    parser.add_argument("--api-key", help="default: serve.api_key")
    args = parser.parse_args(argv)
    serve = load_params().serve
    url = args.url or f"http://{serve.host}:{serve.port}/v1"
    app = create_app(url, args.model or serve.served_model_name, args.api_key or serve.api_key)
    print(f"web chat at http://{args.host}:{args.port}/ (model server: {url})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
