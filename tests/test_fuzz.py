"""Property-based fuzzing (hypothesis) of Decrypt inputs against a real plugin, and of config parsing.

Bounded for CI by max_examples. What must hold for every input: the plugin answers (no crash, no
hang past the deadline), with either the exact plaintext that was wrapped or one of the documented
refusals, and stays healthy.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p11kms.config import ConfigError, load_config
from p11kms.kube.client import KmsClient
from tests.support import HsmEnv, PluginProcess, start_plugin, unique_label

DOCUMENTED_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
SEED = b"fuzz-seed-0123456789abcdef012345"


@pytest.fixture(scope="module")
def fuzz_target(hsm_env: HsmEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KmsClient, bytes, str]]:
    from p11kms.hsm.keyident import create_kek
    from p11kms.hsm.module import load_module
    from p11kms.hsm.token import open_token
    from tests.support import TOKEN_LABEL, USER_PIN

    module = load_module(hsm_env.module)
    token = open_token(module, module.find_token(label=TOKEN_LABEL, serial=None, slot=None), USER_PIN.encode(), 1)
    primary, secondary = unique_label(), unique_label()
    create_kek(token, primary)
    create_kek(token, secondary)
    token.close()
    directory = tmp_path_factory.mktemp("fuzz")
    plugin: PluginProcess = start_plugin(hsm_env, hsm_env.write_config(directory / "p11kms.cfg", primary, secondary))
    client = plugin.client()
    reply = client.encrypt(SEED)
    yield client, reply.ciphertext, reply.key_id
    assert client.status().healthz == "ok"  # still healthy after every example
    assert plugin.stop() == 0


def _decrypt_outcome(client: KmsClient, ciphertext: bytes, key_id: str, annotations: dict[str, bytes]) -> bytes | None:
    try:
        return client.decrypt(ciphertext, key_id, annotations)
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED_REFUSALS, f"{exc.code()}: {exc.details()}"
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ciphertext=st.binary(max_size=1100), key_id=st.text(max_size=80),
       annotations=st.dictionaries(st.text(max_size=20), st.binary(max_size=20), max_size=3))
def test_arbitrary_decrypt_requests(fuzz_target: tuple[KmsClient, bytes, str], ciphertext: bytes, key_id: str,
                                    annotations: dict[str, bytes]) -> None:
    client, _, _ = fuzz_target
    assert _decrypt_outcome(client, ciphertext, key_id, annotations) is None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_ciphertexts_never_give_a_wrong_plaintext(fuzz_target: tuple[KmsClient, bytes, str],
                                                          data: st.DataObject) -> None:
    client, ciphertext, key_id = fuzz_target
    mutated = bytearray(ciphertext)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "extend", "replace"]))
        if action == "flip" and mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del mutated[data.draw(st.integers(0, len(mutated))):]
        elif action == "extend":
            mutated += data.draw(st.binary(min_size=1, max_size=16))
        elif mutated:
            mutated[0] = data.draw(st.integers(0, 255))
    outcome = _decrypt_outcome(client, bytes(mutated), key_id, {})
    assert outcome is None or (bytes(mutated) == ciphertext and outcome == SEED)


def test_the_unmutated_ciphertext_still_opens(fuzz_target: tuple[KmsClient, bytes, str]) -> None:
    client, ciphertext, key_id = fuzz_target
    assert client.decrypt(ciphertext, key_id) == SEED
    assert _decrypt_outcome(client, ciphertext, str(uuid.uuid4()), {}) is None


_NAMES = st.sampled_from(["Primary_key", "secondary_KEY", "PKCS11_Module", "Token_Label", "PIN_File", "PIN_Env",
                          "Socket", "Socket_Mode", "Sessions", "Log_Level", "Health_Interval", "Slot", "PIN",
                          "Primery_key", "[KMSPlugin]", "[Global]", "#", ";"])


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(st.tuples(_NAMES, st.sampled_from([" = ", "=", " "]), st.text(max_size=30)), max_size=12))
def test_config_parsing_only_ever_raises_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                       lines: list[tuple[str, str, str]]) -> None:
    path = tmp_path_factory.mktemp("cfg") / "fuzz.cfg"
    path.write_text("\n".join(name + sep + value.replace("\n", " ") for name, sep, value in lines),
                    encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert str(exc)
        return
    assert config.primary_key and config.module


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=400))
def test_config_parsing_of_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "raw.cfg"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
