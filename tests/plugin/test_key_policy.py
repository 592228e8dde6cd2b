"""Key policy at serve time: a weak KEK is served, but said so in the log, /healthz and a metric."""

from __future__ import annotations

import json
from collections.abc import Callable

from p11kms.hsm.token import Token
from tests.plugin.test_httpserver import get, metric
from tests.support import PluginProcess, unique_label

Run = Callable[..., PluginProcess]


def test_a_weak_kek_is_served_with_a_warning_a_health_detail_and_a_metric(run_plugin: Run, token: Token) -> None:
    label = unique_label("weak")
    # AES-128, extractable, not sensitive, may wrap and derive: everything keys create never makes.
    token.import_aes_key(label, bytes(range(16)), sensitive=False, extractable=True, wrap=True, derive=True)
    plugin = run_plugin(label)
    reply = plugin.client().encrypt(b"w" * 32)
    problems = ["CKA_EXTRACTABLE is not false", "CKA_SENSITIVE is not true",
                "it is AES-128, shorter than 256 bits", "CKA_WRAP is true", "CKA_DERIVE is true"]
    log = plugin.log()
    assert "key is weaker than p11kms keys create makes it" in log and "; ".join(problems) in log
    _, body = get(plugin, "/healthz")
    keys = json.loads(body)["keys"]
    assert keys[0]["uuid"] == reply.key_id and keys[0]["policy_warnings"] == problems
    assert metric(get(plugin, "/metrics")[1], "p11kms_key_policy_weak", label=label, role="primary") == 1


def test_a_key_made_by_keys_create_has_no_policy_warning(run_plugin: Run,
                                                         new_key: Callable[[], tuple[str, str]]) -> None:
    plugin = run_plugin(new_key()[0])
    plugin.client().status()
    assert "weaker" not in plugin.log()
    assert "policy_warnings" not in get(plugin, "/healthz")[1]
