"""The --notices file (issue 22): a good one loads; each kind of mistake is refused with
one line that names it, before the server opens anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.errors import InvalidArgument
from ledger.notices import Thresholds
from server.notice_config import load

GOOD = '''
[thresholds]
plan_low_days = 3
[delivery]
retry_first_s = 0.5
[[webhook]]
name = "billing"
url = "https://hooks.example.com/q"
secret_env = "HOOK_SECRET"
accounts = ["acme"]
[[webhook]]
url = "http://127.0.0.1:9000/hook"
secret = "0123456789abcdef"
'''


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "notices.toml"
    path.write_text(text)
    return str(path)


def test_a_good_file_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD), env={"HOOK_SECRET": "x" * 32})
    assert cfg.thresholds == Thresholds(plan_low_days=3)
    assert cfg.retry_first_s == 0.5
    assert [(e.name, e.accounts) for e in cfg.endpoints] == [("billing", ("acme",)),
                                                              ("webhook-2", ())]
    assert cfg.endpoints[0].wants("acme") and not cfg.endpoints[0].wants("bolt")
    assert load(None).endpoints == ()


@pytest.mark.parametrize(("text", "needle"), [
    ("[thresholds]\nplan_low_days = 0\n", "plan_low_days must be 1..90"),
    ("[thresholds]\nplan_low_percent = 100\n", "plan_low_percent must be 0..99"),
    ("[thresholds]\nplan_low_days = 1.5\n", "whole numbers"),
    ("[thresholds]\nsoon = 1\n", "unknown keys soon"),
    ("[delivery]\nretry_first_s = 0\n", "retry_first_s must be"),
    ("[alerts]\n", "unknown tables alerts"),
    ('[[webhook]]\nurl = "ftp://x/y"\nsecret = "0123456789abcdef"\n', "is not an http(s) URL"),
    ('[[webhook]]\nurl = "http://hooks.example.com/h"\nsecret = "0123456789abcdef"\n',
     "is not loopback, so it needs https://"),
    ('[[webhook]]\nurl = "https://hooks.example.com/h"\nsecret = "short"\n',
     "secret is missing or shorter than 16"),
    ('[[webhook]]\nurl = "https://hooks.example.com/h"\nsecret_env = "NOPE"\n',
     "NOPE holding its secret is not set"),
    ('[[webhook]]\nsecret = "0123456789abcdef"\n', "url is required"),
    ('[[webhook]]\nname = "a"\nurl = "https://h.example.com/1"\nsecret = "0123456789abcdef"\n'
     '[[webhook]]\nname = "a"\nurl = "https://h.example.com/2"\nsecret = "0123456789abcdef"\n',
     "two webhooks share a name"),
    ("not toml at all [", "notices file"),
])
def test_each_mistake_is_one_clear_line(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        load(write(tmp_path, text), env={})
    assert needle in err.value.message and "\n" not in err.value.message


def test_insecure_allows_plain_http_beyond_loopback(tmp_path: Path) -> None:
    path = write(tmp_path, '[[webhook]]\nurl = "http://hooks.example.com/h"\n'
                           'secret = "0123456789abcdef"\n')
    assert load(path, insecure=True, env={}).endpoints[0].url == "http://hooks.example.com/h"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="notices file .*nope.toml"):
        load(str(tmp_path / "nope.toml"))
