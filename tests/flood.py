"""A bounded flood of progress reports with bad tokens, for the flood test: ``python -m
tests.flood URL --rate 2000 --seconds 30 --claims CLAIMS_JSON``.

It sends at most ``rate`` requests a second for ``seconds`` and stops by itself (what is still
open then gets 5 s); half carry random strings, half tokens shaped like a projected
service-account token that claims a real pod (``--claims``) with a forged signature, each one
different.  It prints one JSON line: requests sent, answers by status code, and the seconds it
ran.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import secrets
import sys
import time
from typing import Any


def _part(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def forged(claims: dict[str, Any]) -> str:
    payload = {**claims, "jti": secrets.token_hex(8)}
    return f"{_part({'alg': 'RS256', 'kid': 'x'})}.{_part(payload)}.{secrets.token_urlsafe(64)}"


async def flood(url: str, *, rate: int, seconds: float, claims: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    body = json.dumps({"seq": 1, "attempt": "x", "time": "2026-01-01T00:00:00Z", "stage": "training"}).encode()
    answers: collections.Counter[str] = collections.Counter()
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    # Connections to the one server: as many as a busy client would open, not one per request.
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=5)
    pending: set[asyncio.Task[None]] = set()
    sent = 0

    async def one(number: int, session: aiohttp.ClientSession) -> None:
        token = forged(claims) if number % 2 else secrets.token_urlsafe(32)
        try:
            async with session.post(url, data=body, headers={"Authorization": f"Bearer {token}"}) as response:
                await response.read()
                answers[str(response.status)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            answers[type(exc).__name__] += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            # Catch up to the rate, but never run ahead of it, and never hold more than a
            # second's worth of requests open: a slow server slows the flood down.
            due = min(int(elapsed * rate) + per_tick, int(seconds * rate))
            while sent < due and len(pending) < rate:
                task = asyncio.create_task(one(sent, session))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(tick)
        if pending:
            await asyncio.wait(pending, timeout=6)
        ran = time.monotonic() - started
    return {"sent": sent, "answers": dict(answers), "seconds": round(ran, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--claims", required=True, help="JSON claims of the pod the forged tokens name")
    args = parser.parse_args(argv)
    result = asyncio.run(flood(args.url, rate=args.rate, seconds=args.seconds, claims=json.loads(args.claims)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
