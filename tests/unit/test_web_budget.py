"""The web page's token reviews: one caller sending token after token uses up its own allowance,
not everyone's (an apiserver review each costs the cluster)."""

from __future__ import annotations

import asyncio
from typing import Any

from finetune_operator.web import Access, WebAccess


class Reviews:
    """TokenReview and SubjectAccessReview answers: only the token "good" is a person."""

    def __init__(self) -> None:
        self.asked = 0

    async def review_token(self, token: str, *, audience: str | None) -> dict[str, Any]:
        self.asked += 1
        return {"authenticated": True, "user": {"username": "nick"}} if token == "good" else {"authenticated": False}

    async def review_access(self, user: dict[str, Any], *, attributes: dict[str, Any]) -> dict[str, Any]:
        self.asked += 1
        return {"allowed": True}


def test_a_caller_flooding_with_tokens_is_throttled_alone() -> None:
    api = Reviews()
    access = WebAccess(api, rate=0.001, burst=5)  # type: ignore[arg-type]

    async def run() -> None:
        flood = [await access.check(f"junk-{i}", "team-a", caller="10.0.0.9") for i in range(20)]
        assert flood[:5] == [Access.UNAUTHENTICATED] * 5
        assert set(flood[5:]) == {Access.THROTTLED}
        assert api.asked == 5  # the apiserver saw the allowance, not the flood
        # Someone else is not held up by it.
        assert await access.check("good", "team-a", caller="10.0.0.7") == Access.ALLOWED
        # The same answer again costs no review while it is remembered.
        asked = api.asked
        assert await access.check("good", "team-a", caller="10.0.0.7") == Access.ALLOWED
        assert api.asked == asked

    asyncio.run(run())
