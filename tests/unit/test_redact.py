"""URIs as they may be shown: the user-info, query string and fragment left out, the rest kept."""

from __future__ import annotations

import pytest

from finetune_api.redact import redact


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "cannot read https://nick:hunter2@models.example.com/sd.safetensors?X-Amz-Signature=abc&x=1: 403",
            "cannot read https://models.example.com/sd.safetensors: 403",
        ),
        ("access to 's3://bucket/key?versionId=3' was refused", "access to 's3://bucket/key' was refused"),
        ("see (https://token@host/path#part).", "see (https://host/path)."),
        ("pvc://outputs/nick/checkpoints/checkpoint-000100", "pvc://outputs/nick/checkpoints/checkpoint-000100"),
        ("s3://bucket/out and hf://owner/repo", "s3://bucket/out and hf://owner/repo"),
        ("no address here: a@b ? c", "no address here: a@b ? c"),
        ('{"uri": "http://u:p@127.0.0.1:9/x?sig=1"}', '{"uri": "http://127.0.0.1:9/x"}'),
        # Passwords as people type them: '@' and '/' left unencoded.
        ("from https://nick:p@ss@host/m.ckpt", "from https://host/m.ckpt"),
        ("from https://nick:pa/ss@host/m.ckpt", "from https://host/m.ckpt"),
        ("from https://nick:p@s/s@host:8443/m", "from https://host:8443/m"),
        # What only looks like user-info stays: a port, an '@' in a path.
        (
            "https://host:8080/models/sd@v1 and hf://org/model@main",
            "https://host:8080/models/sd@v1 and hf://org/model@main",
        ),
        ("s3://bucket/a:b@c/x", "s3://bucket/a:b@c/x"),
    ],
)
def test_a_uri_shows_without_its_secrets(text: str, shown: str) -> None:
    assert redact(text) == shown
