"""The OpenAI-compatible gateway (p2pspec/runtime/gateway.py) against a real mesh: a verifier
and a drafter on tiny random models in their own processes; the gateway in this trio run;
the official `openai` client and raw HTTP (httpx) in worker threads."""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import trio

from p2pspec.net.discovery import now_ms
from p2pspec.runtime.client import Client
from p2pspec.runtime.gateway import serve
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.007"
FAST = ["--threads", "1", "--advert-interval", "0.5"]
T = TypeVar("T")


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        v = await start_peer("v", "verifier", VERIFIER, workdir=tmp_path, extra_args=FAST)
        started.append(v)
        d = await start_peer(
            "d", "drafter", DRAFTER, workdir=tmp_path, bootstrap=[v.address], extra_args=FAST
        )
        started.append(d)
        yield started
    finally:
        await stop_all(started)


@asynccontextmanager
async def gateway(bootstrap: str, **kwargs: Any) -> AsyncIterator[tuple[str, Client]]:
    async with Client([bootstrap]) as client, trio.open_nursery() as nursery:
        urls = await nursery.start(functools.partial(serve, client, listen="127.0.0.1:0", **kwargs))
        yield urls[0], client
        nursery.cancel_scope.cancel()


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _openai(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


async def test_the_openai_client_gets_the_meshs_own_answer_streamed_or_not(
    peers: list[PeerProcess],
) -> None:
    async with gateway(peers[0].address) as (url, client):
        direct = await client.generate("hello gateway", raw=True, max_new_tokens=24, seed=3)
        api = _openai(url)
        whole = await in_thread(
            api.completions.create,
            model=VERIFIER, prompt="hello gateway", max_tokens=24, temperature=0, seed=3,
        )  # fmt: skip
        assert whole.choices[0].text == direct.text
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage is not None
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
            len(direct.prompt_token_ids),
            24,
        )

        def streamed() -> list[Any]:
            return list(
                api.completions.create(
                    model=VERIFIER,
                    prompt="hello gateway",
                    max_tokens=24,
                    temperature=0,
                    seed=3,
                    stream=True,
                )
            )

        events = await in_thread(streamed)
        assert "".join(e.choices[0].text for e in events if e.choices) == direct.text
        assert len(events) > 2  # chunks as they are committed, then the finish
        assert events[-1].choices[0].finish_reason == "length"
        listed = await in_thread(api.models.list)
        assert [m.id for m in listed.data] == [VERIFIER]
        scraped = (await in_thread(httpx.get, f"{url}/metrics", timeout=30)).text
        assert 'p2pspec_gateway_requests_total{route="/v1/completions",status="200"} 2.0' in (
            scraped
        )
        assert "p2pspec_gateway_completion_tokens_total 48.0" in scraped
        assert "p2pspec_gateway_time_to_first_token_seconds_count 2.0" in scraped


async def test_errors_come_in_openais_shape_with_the_right_status(
    peers: list[PeerProcess],
) -> None:
    async with gateway(peers[0].address) as (url, _client):

        def post(path: str, body: Any) -> httpx.Response:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            return httpx.post(f"{url}{path}", content=content, timeout=60)

        ok = {"model": VERIFIER, "prompt": "x", "max_tokens": 4}
        cases = [
            ("/v1/completions", b"{not json", 400, None),
            ("/v1/completions", {"prompt": "x"}, 400, "model"),
            ("/v1/completions", {**ok, "model": "gpt-9"}, 404, "model"),
            ("/v1/completions", {**ok, "n": 2}, 400, "n"),
            ("/v1/completions", {**ok, "temperature": "hot"}, 400, "temperature"),
            ("/v1/completions", {**ok, "seed": True}, 400, "seed"),
            ("/v1/completions", {**ok, "stop": ["ok", 1]}, 400, "stop"),
            ("/v1/completions", [ok], 400, None),
            ("/v1/completions", {**ok, "prompt": ""}, 400, "prompt"),
            ("/v1/completions", {**ok, "max_tokens": 3000}, 413, None),  # past the context
            # tiny random models have no chat template: a conversation is a bad request
            (
                "/v1/chat/completions",
                {"model": VERIFIER, "messages": [{"role": "user", "content": "hi"}]},
                400,
                None,
            ),
            ("/v1/chat/completions", {"model": VERIFIER, "messages": []}, 400, "messages"),
            ("/v1/chat/completions", {"model": VERIFIER, "messages": ["hi"]}, 400, "messages"),
        ]
        for path, body, status, param in cases:
            response = await in_thread(post, path, body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"]
            assert error["param"] == param, (body, error)
    async with gateway(peers[0].address, api_key="s3cret") as (url, _client):
        with pytest.raises(openai.AuthenticationError):
            await in_thread(_openai(url, "wrong").completions.create, **ok)
        allowed = await in_thread(_openai(url, "s3cret").completions.create, **ok)
        assert allowed.choices[0].text is not None


async def test_serve_on_a_taken_port_exits_2_naming_the_flag(
    peers: list[PeerProcess],
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        argv = [
            sys.executable, "-m", "p2pspec.peers.cli", "serve",
            "--bootstrap", peers[0].address, "--listen", listen,
        ]  # fmt: skip
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert f"--listen {listen}: cannot listen there" in err and "Traceback" not in err


async def test_a_mesh_without_a_drafter_is_a_503(tmp_path: Path) -> None:
    v = await start_peer("v", "verifier", VERIFIER, workdir=tmp_path, extra_args=FAST)
    try:
        async with gateway(v.address) as (url, _client):
            with pytest.raises(openai.InternalServerError) as e:
                await in_thread(
                    _openai(url).completions.create, model=VERIFIER, prompt="x", max_tokens=4
                )
            assert e.value.status_code == 503
    finally:
        await stop_all([v])


async def test_16_concurrent_streams_all_complete_or_are_refused_and_none_hangs(
    peers: list[PeerProcess],
) -> None:
    outcomes: list[str] = []
    async with gateway(peers[0].address) as (url, _client):
        api = _openai(url)

        def one(i: int) -> str:
            try:
                events = list(
                    api.completions.create(
                        model=VERIFIER,
                        prompt=f"request {i}",
                        max_tokens=32,
                        temperature=0,
                        stream=True,
                    )
                )
            except (openai.RateLimitError, openai.InternalServerError) as e:
                return f"refused {e.status_code}"
            return "done" if events[-1].choices[0].finish_reason else "cut"

        async def run(i: int) -> None:
            outcomes.append(await in_thread(one, i))

        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(run, i)
    assert len(outcomes) == 16
    assert set(outcomes) <= {"done", "refused 429", "refused 503"}, outcomes
    assert outcomes.count("done") >= 8  # the drafter's capacity


async def test_a_client_that_disconnects_mid_stream_ends_its_session(
    peers: list[PeerProcess],
) -> None:
    async with gateway(peers[0].address) as (url, client):

        def read_two_events_and_leave() -> int:
            body = {"model": VERIFIER, "prompt": "long", "max_tokens": 2000, "stream": True}
            with (
                httpx.Client(timeout=60) as http,
                http.stream("POST", f"{url}/v1/completions", json=body) as response,
            ):
                lines = response.iter_lines()
                seen = 0
                for line in lines:
                    seen += line.startswith("data: ")
                    if seen == 2:
                        return response.status_code
            return -1

        assert await in_thread(read_two_events_and_leave) == 200
        left_ms = now_ms()
        # 2,000 tokens take the drafter several seconds more; its first record signed
        # after the client left already shows it idle: the session was cancelled.
        with trio.fail_after(3):
            while True:
                await client.refresh()
                drafter = client.peers("drafter")[0]
                if drafter.issued_at_ms > left_ms:
                    assert drafter.load == 0
                    break
                await trio.sleep(0.1)  # the next advert, every 0.5 s


async def test_p2pspec_serve_prints_its_url_and_serves_until_sigterm(
    peers: list[PeerProcess],
) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "p2pspec.peers.cli", "serve", "--bootstrap", peers[0].address,
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                data = await process.stdout.receive_some(1024)
                assert data, "serve exited before its ready line"
                line += data
        url = line.decode().strip()
        assert url.startswith("http://127.0.0.1:")
        listed = await in_thread(httpx.get, f"{url}/v1/models", timeout=30)
        assert [m["id"] for m in listed.json()["data"]] == [VERIFIER]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_status_page_and_its_data_show_every_peer(peers: list[PeerProcess]) -> None:
    """The page is static HTML that polls /status.json (tested here through HTTP; a headless
    browser run of the page is not part of the suite)."""
    async with gateway(peers[0].address) as (url, _client):
        page = await in_thread(httpx.get, f"{url}/", timeout=30)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "status.json" in page.text and "<canvas" in page.text
        data = (await in_thread(httpx.get, f"{url}/status.json", timeout=30)).json()
        assert {p["peer_id"] for p in data["peers"]} == {p.peer_id for p in peers}
        assert {p["role"] for p in data["peers"]} == {"verifier", "drafter"}
        assert all(p["rtt_ms"] is not None for p in data["peers"])
        assert data["gateway_tokens"] == 0


async def test_the_testnet_keeps_its_mesh_up_behind_a_gateway_with_serve() -> None:
    root = Path(__file__).resolve().parent.parent
    process = await trio.lowlevel.open_process(
        [sys.executable, str(root / "testnet" / "testnet.py"), "--sessions", "2", "--quiet",
         "--serve", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=root,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        out = b""
        with trio.fail_after(180):  # the mesh starts and runs its 2 sessions first
            while b"\nhttp://" not in b"\n" + out or not out.endswith(b"\n"):
                data = await process.stdout.receive_some(4096)
                assert data, f"the testnet exited before serving: {out.decode()}"
                out += data
        url = next(x for x in out.decode().splitlines() if x.startswith("http://"))
        listed = await in_thread(httpx.get, f"{url}/v1/models", timeout=30)
        assert [m["id"] for m in listed.json()["data"]] == ["tiny-random:11"]
        answer = await in_thread(
            _openai(url).completions.create, model="tiny-random:11", prompt="x", max_tokens=8
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 8
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await process.wait() == 0  # the peers are stopped too
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _browser_or_skip() -> Any:
    """Headless Chromium through selenium and Debian's chromium-driver (tests/run.sh installs
    them when it runs as root); skipped where they are missing."""
    driver_path = shutil.which("chromedriver")
    if driver_path is None or shutil.which("chromium") is None:
        pytest.skip("no chromium / chromedriver here (Debian: chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or ""
    return webdriver.Chrome(service=Service(driver_path), options=options)


async def test_the_status_page_in_a_headless_browser_shows_every_peer_of_a_4_peer_mesh(
    peers: list[PeerProcess], tmp_path: Path
) -> None:
    browser = _browser_or_skip()
    more = [
        await start_peer(
            name, role, model, workdir=tmp_path, bootstrap=[peers[0].address], extra_args=FAST
        )
        for name, role, model in (("v2", "verifier", VERIFIER), ("d2", "drafter", DRAFTER))
    ]
    try:
        everyone = {p.peer_id for p in [*peers, *more]}
        async with gateway(peers[0].address) as (url, client):
            with trio.fail_after(30):
                while {r.peer_id for r in client.peers()} != everyone:
                    await client.refresh()
                    await trio.sleep(0.25)  # the new peers' first adverts

            def rows_shown() -> set[str]:
                from selenium.webdriver.common.by import By
                from selenium.webdriver.support.ui import WebDriverWait

                browser.get(f"{url}/")
                WebDriverWait(browser, 30).until(
                    lambda b: len(b.find_elements(By.CSS_SELECTOR, "#peers tbody tr")) == 4
                )
                rows = browser.find_elements(By.CSS_SELECTOR, "#peers tbody tr")
                assert "4 peers" in browser.find_element(By.ID, "summary").text
                return {row.get_attribute("data-peer-id") or "" for row in rows}

            assert await in_thread(rows_shown) == everyone
    finally:
        browser.quit()
        await stop_all(more)
