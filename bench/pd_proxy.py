"""A minimal prefill-decode front end for SGLang, for machines without sglang-router.

    python bench/pd_proxy.py --prefill http://127.0.0.1:30000 8998 \\
        --decode http://127.0.0.1:30001 --port 8000

SGLang 0.5.17 has no mini load balancer and sglang-router is a 30 MB wheel; this does
what the router does for a PD pair: every generation request gets a random
``bootstrap_room`` plus the prefill server's ``bootstrap_host``/``bootstrap_port`` and
is posted to a prefill server and a decode server concurrently; the client gets the
decode server's answer (streamed through chunk by chunk when ``"stream": true``). If
the prefill server answers with an error, that error is returned (or, when streaming,
sent as a last ``data: {"error": ...}`` chunk and the decode request is dropped, which
makes SGLang abort it).

Routes: POST /generate, /v1/completions, /v1/chat/completions (PD); POST/GET
/flush_cache (both servers; best effort: 200 with the failures listed); GET /health,
/health_generate (both); GET /v1/models, /model_info, /get_model_info (decode); GET
/server_info, /get_server_info (``{"prefill": [...], "decode": [...]}`` as the router
answers, which ``sglang.bench_serving`` reads). Several ``--prefill``/``--decode`` may be
given: each request picks one of each at random. Needs only aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from urllib.parse import urlparse

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

log = logging.getLogger("pd_proxy")
PD_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
BOTH_ROUTES = ("/flush_cache",)
DECODE_GET_ROUTES = ("/v1/models", "/model_info", "/get_model_info")
INFO_ROUTES = ("/server_info", "/get_server_info")


def _batch_size(body: dict) -> int | None:
    """Number of prompts of a batched /generate request, None for a single prompt."""
    for key in ("text", "input_ids", "input_embeds"):
        v = body.get(key)
        if v is None:
            continue
        if key == "text":
            return len(v) if isinstance(v, list) else None
        return len(v) if v and isinstance(v[0], list) else None
    return None


class PDProxy:
    def __init__(self, prefill: list[tuple[str, int | None]], decode: list[str]):
        self.prefill = [(url.rstrip("/"), port) for url, port in prefill]
        self.decode = [url.rstrip("/") for url in decode]
        self.session: ClientSession | None = None
        self.n_requests = 0
        self.n_errors = 0

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(
            timeout=ClientTimeout(total=None, sock_connect=30),
            connector=TCPConnector(limit=0, force_close=False),
        )

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------ helpers

    def _pick(self) -> tuple[str, int | None, str]:
        p_url, b_port = random.choice(self.prefill)
        return p_url, b_port, random.choice(self.decode)

    @staticmethod
    def _with_bootstrap(body: dict, p_url: str, b_port: int | None) -> dict:
        host = urlparse(p_url).hostname
        n = _batch_size(body)
        body = dict(body)
        if n is None:
            body.update(
                bootstrap_host=host, bootstrap_port=b_port, bootstrap_room=random.getrandbits(63)
            )
        else:
            body.update(
                bootstrap_host=[host] * n,
                bootstrap_port=[b_port] * n,
                bootstrap_room=[random.getrandbits(63) for _ in range(n)],
            )
        return body

    async def _post(self, url: str, body: dict) -> tuple[int, bytes, str]:
        assert self.session is not None
        async with self.session.post(url, json=body) as r:
            return r.status, await r.read(), r.headers.get("Content-Type", "application/json")

    async def _get(self, url: str) -> tuple[int, bytes, str]:
        assert self.session is not None
        try:
            async with self.session.get(url) as r:
                return r.status, await r.read(), r.headers.get("Content-Type", "application/json")
        except Exception as e:  # a server down: report, do not raise
            return 503, json.dumps({"error": f"{url}: {e!r}"}).encode(), "application/json"

    @staticmethod
    def _resp(status: int, data: bytes, ctype: str) -> web.Response:
        return web.Response(status=status, body=data, headers={"Content-Type": ctype})

    # ------------------------------------------------------------------ PD requests

    async def pd(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": "request body is not JSON"}, status=400)
        path = request.path
        p_url, b_port, d_url = self._pick()
        body = self._with_bootstrap(body, p_url, b_port)
        self.n_requests += 1
        prefill = asyncio.create_task(self._post(p_url + path, body))
        if body.get("stream"):
            return await self._stream(request, prefill, d_url + path, body)
        try:
            (p_status, p_data, p_ct), (d_status, d_data, d_ct) = await asyncio.gather(
                prefill, self._post(d_url + path, body)
            )
        except Exception as e:
            prefill.cancel()
            self.n_errors += 1
            return web.json_response({"error": f"PD request failed: {e!r}"}, status=502)
        if p_status != 200:
            self.n_errors += 1
            log.warning("prefill %s answered %s: %s", p_url, p_status, p_data[:300])
            return self._resp(p_status, p_data, p_ct)
        if d_status != 200:
            self.n_errors += 1
        return self._resp(d_status, d_data, d_ct)

    async def _stream(
        self, request: web.Request, prefill: asyncio.Task, d_url: str, body: dict
    ) -> web.StreamResponse:
        assert self.session is not None
        prefill_error: list[bytes] = []
        try:
            d = await self.session.post(d_url, json=body)
        except Exception as e:
            prefill.cancel()
            self.n_errors += 1
            return web.json_response({"error": f"decode {d_url}: {e!r}"}, status=502)

        def on_prefill(t: asyncio.Task) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                prefill_error.append(json.dumps({"error": f"prefill: {exc!r}"}).encode())
            elif t.result()[0] != 200:
                status, data, _ = t.result()
                prefill_error.append(data or json.dumps({"error": f"prefill {status}"}).encode())
            if prefill_error:
                d.close()  # drop the decode request: SGLang aborts it

        prefill.add_done_callback(on_prefill)
        try:
            if d.status != 200:
                self.n_errors += 1
                return self._resp(d.status, await d.read(), d.headers.get("Content-Type", ""))
            out = web.StreamResponse(
                status=200,
                headers={"Content-Type": d.headers.get("Content-Type", "text/event-stream")},
            )
            await out.prepare(request)
            try:
                async for chunk in d.content.iter_any():
                    await out.write(chunk)
            except Exception as e:
                if not prefill_error:
                    prefill_error.append(json.dumps({"error": f"decode stream: {e!r}"}).encode())
            if prefill_error:
                self.n_errors += 1
                await out.write(b"data: " + prefill_error[0].strip() + b"\n\n")
            await out.write_eof()
            return out
        finally:
            d.release()
            if not prefill.done():  # the decode finished first: let the prefill finish
                try:
                    await asyncio.wait_for(asyncio.shield(prefill), timeout=30)
                except Exception:
                    prefill.cancel()

    # ------------------------------------------------------------------ other routes

    async def both(self, request: web.Request) -> web.Response:
        assert self.session is not None
        urls = [u for u, _ in self.prefill] + self.decode
        method = self.session.post if request.method == "POST" else self.session.get

        async def one(url: str) -> tuple[int, bytes]:
            try:
                async with method(url + request.path) as r:
                    return r.status, await r.read()
            except Exception as e:
                return 503, repr(e).encode()

        res = await asyncio.gather(*(one(u) for u in urls))
        bad = [f"{u}: {s} {d[:200]!r}" for u, (s, d) in zip(urls, res) if s != 200]
        if bad:  # best effort (SGLang refuses while requests are pending): say so, no error
            log.warning("%s not done everywhere: %s", request.path, bad)
            return web.json_response({"success": False, "failed": bad})
        return web.Response(text=res[-1][1].decode(errors="replace"))

    async def health(self, request: web.Request) -> web.Response:
        urls = [u for u, _ in self.prefill] + self.decode
        res = await asyncio.gather(*(self._get(u + request.path) for u in urls))
        bad = [f"{u}: {s}" for u, (s, _, _) in zip(urls, res) if s != 200]
        return web.json_response({"unhealthy": bad}, status=503) if bad else web.Response()

    async def decode_get(self, request: web.Request) -> web.Response:
        return self._resp(*await self._get(random.choice(self.decode) + request.path))

    async def info(self, request: web.Request) -> web.Response:
        async def side(urls: list[str]) -> list:
            out = []
            for s, data, _ in await asyncio.gather(*(self._get(u + request.path) for u in urls)):
                try:
                    out.append(json.loads(data) if s == 200 else {"error": s})
                except ValueError:
                    out.append({"error": data[:200].decode(errors="replace")})
            return out

        prefill, decode = await asyncio.gather(
            side([u for u, _ in self.prefill]), side(self.decode)
        )
        return web.json_response({"prefill": prefill, "decode": decode})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.n_requests, "errors": self.n_errors})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        for r in PD_ROUTES:
            app.router.add_post(r, self.pd)
        for r in BOTH_ROUTES:
            app.router.add_route("*", r, self.both)
        for r in ("/health", "/health_generate"):
            app.router.add_get(r, self.health)
        for r in DECODE_GET_ROUTES:
            app.router.add_get(r, self.decode_get)
        for r in INFO_ROUTES:
            app.router.add_get(r, self.info)
        app.router.add_get("/proxy_stats", self.stats)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app


# ---------------------------------------------------------------------------- self test


async def _self_test() -> None:
    """Smoke check by hand, no SGLang: two fake servers (a prefill that records rooms, a
    decode that answers only once the prefill of the same room has arrived, as a real
    decode waits for the KV) behind the proxy; plain, streamed, batched, failing
    requests and the side routes."""
    import aiohttp

    rooms: dict[int, dict] = {}
    fail_next = []

    async def fake_prefill(req: web.Request) -> web.Response:
        b = await req.json()
        if fail_next:
            fail_next.pop()
            return web.json_response({"error": "prefill broke"}, status=500)
        for r in (
            b["bootstrap_room"] if isinstance(b["bootstrap_room"], list) else [b["bootstrap_room"]]
        ):
            rooms[r] = b
        await asyncio.sleep(0.05)
        return web.json_response({"text": "", "meta_info": {"role": "prefill"}})

    async def fake_decode(req: web.Request) -> web.StreamResponse:
        b = await req.json()
        batch = isinstance(b["bootstrap_room"], list)
        hosts, ports_, rms = (
            (b[k] if batch else [b[k]])
            for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")
        )
        assert set(hosts) == {"127.0.0.1"} and set(ports_) == {8998}, b
        t0 = time.monotonic()
        while not all(r in rooms for r in rms):  # the KV arrives from the prefill
            if time.monotonic() - t0 > 2:
                return web.json_response({"error": "no prefill for room"}, status=504)
            await asyncio.sleep(0.01)
        assert all(rooms[r]["input_ids"] == b["input_ids"] for r in rms)
        if batch:
            return web.json_response([{"text": "abc"}] * len(rms))
        if not b.get("stream"):
            return web.json_response({"text": "abc", "meta_info": {"completion_tokens": 3}})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(req)
        for i in range(1, 4):
            d = {"text": "abc"[:i], "meta_info": {"completion_tokens": i}}
            await out.write(f"data: {json.dumps(d)}\n\n".encode())
            await asyncio.sleep(0.02)
        await out.write(b"data: [DONE]\n\n")
        return out

    async def ok(req: web.Request) -> web.Response:
        if req.path in INFO_ROUTES:
            return web.json_response({"port": req.url.port})
        if req.path == "/v1/models":
            return web.json_response({"data": [{"id": "fake"}]})
        return web.Response(text="ok")

    async def serve(handler, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/generate", handler)
        for r in ("/health", "/v1/models", "/model_info", "/server_info"):
            app.router.add_get(r, ok)
        app.router.add_route("*", "/flush_cache", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    import socket

    ports = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    pp, dp, xp = ports
    runners = [await serve(fake_prefill, pp), await serve(fake_decode, dp)]
    proxy = PDProxy([(f"http://127.0.0.1:{pp}", 8998)], [f"http://127.0.0.1:{dp}"])
    runner = web.AppRunner(proxy.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", xp).start()
    base = f"http://127.0.0.1:{xp}"
    ids = list(range(100))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/generate", json={"input_ids": ids}) as r:
                assert r.status == 200 and (await r.json())["text"] == "abc"
            print("plain /generate: ok")
            chunks = []
            async with s.post(base + "/generate", json={"input_ids": ids, "stream": True}) as r:
                assert r.status == 200, r.status
                async for line in r.content:
                    if line.strip():
                        chunks.append(line.strip())
            assert chunks[-1] == b"data: [DONE]" and len(chunks) == 4, chunks
            print(f"streamed /generate: ok ({len(chunks)} chunks)")
            res = await asyncio.gather(
                *(s.post(base + "/generate", json={"input_ids": ids}) for _ in range(16))
            )
            assert all(r.status == 200 for r in res)
            for r in res:
                r.release()
            assert len(rooms) == 18, len(rooms)
            print("16 concurrent: ok, all rooms distinct")
            async with s.post(base + "/generate", json={"input_ids": [ids, ids]}) as r:
                assert r.status == 200 and len(await r.json()) == 2, r.status
            print(f"batched /generate: ok ({len(rooms)} rooms seen)")
            fail_next.append(1)
            async with s.post(base + "/generate", json={"input_ids": ids}) as r:
                assert r.status == 500, r.status
            print("prefill error -> 500: ok")
            fail_next.append(1)
            async with s.post(base + "/generate", json={"input_ids": ids, "stream": True}) as r:
                text = await r.text()
                assert '"error"' in text, text
            print("prefill error while streaming -> error chunk: ok")
            for path in ("/health", "/v1/models", "/model_info", "/server_info"):
                async with s.get(base + path) as r:
                    assert r.status == 200, (path, r.status)
                    if path == "/server_info":
                        j = await r.json()
                        assert j["decode"][0]["port"] == dp and j["prefill"][0]["port"] == pp
            async with s.post(base + "/flush_cache") as r:
                assert r.status == 200
            print("health, models, model_info, server_info, flush_cache: ok")
            async with s.get(base + "/proxy_stats") as r:
                print("proxy stats:", await r.json())
        print("SELF TEST OK")
    finally:
        await runner.cleanup()
        for r in runners:
            await r.cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Minimal SGLang PD front end (what sglang-router does for a PD pair)."
    )
    ap.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        required=True,
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="prefill server URL and its --disaggregation-bootstrap-port (default 8998)",
    )
    ap.add_argument("--decode", action="append", required=True, metavar="URL")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    prefill = []
    for item in args.prefill:
        if len(item) > 2:
            ap.error("--prefill takes URL [BOOTSTRAP_PORT]")
        prefill.append((item[0], int(item[1]) if len(item) == 2 else 8998))
    args.prefill = prefill
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--self-test"]:
        asyncio.run(_self_test())
        return
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s pd_proxy %(levelname)s %(message)s"
    )
    proxy = PDProxy(args.prefill, args.decode)
    print(
        f"pd_proxy on http://{args.host}:{args.port}: prefill {args.prefill} decode "
        f"{args.decode} (started {time.strftime('%H:%M:%S')})",
        file=sys.stderr,
        flush=True,
    )
    web.run_app(proxy.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
