"""kube-apiserver's acceptance rules, with the accepted and rejected examples the spec cites."""

from __future__ import annotations

import pytest

from p11kms.kube.apiserver_rules import annotations_problems, encrypted_object_problems, is_fqdn, status_problems


@pytest.mark.parametrize("name", ["a.com", "dev.k8s.io.", "10.0.0.1", "local-kek.kms.example.io"])
def test_accepted_annotation_keys(name: str) -> None:
    assert is_fqdn(name)


@pytest.mark.parametrize("name", ["com", "Dev.k8s.io", "underscores_are_bad.k8s.io", "*.example.com",
                                  "http://foo.example.com", "kms.example.io/remote-kms-auditid", "",
                                  "a." + "b" * 64 + ".io", ("a" * 60 + ".") * 5 + "io"])
def test_rejected_annotation_keys(name: str) -> None:
    assert not is_fqdn(name)


def test_key_id_size_limit_is_inclusive() -> None:
    assert encrypted_object_problems(b"c", "k" * 1024, {}) == []
    assert encrypted_object_problems(b"c", "k" * 1025, {}) == ["key_id is 1025 bytes, more than 1024"]
    assert encrypted_object_problems(b"c", "", {}) == ["key_id is empty"]


def test_ciphertext_limits() -> None:
    assert encrypted_object_problems(b"c" * 1024, "k", {}) == []
    assert encrypted_object_problems(b"", "k", {}) == ["ciphertext is empty"]
    assert encrypted_object_problems(b"c" * 1025, "k", {}) == ["ciphertext is 1025 bytes, more than 1024"]


def test_annotation_total_size() -> None:
    assert annotations_problems({"a.io": b"v" * (32768 - 4)}) == []
    assert annotations_problems({"a.io": b"v" * (32768 - 3)}) == ["annotations total 32769 bytes, more than 32768"]


def test_status_rules() -> None:
    assert status_problems("v2", "ok", "id") == []
    assert status_problems("v2beta1", "ok", "id") == []
    assert status_problems("v2", "OK", "id") == ["healthz is 'OK', not 'ok'"]
    assert status_problems("v1", "ok", "id") == ["version is 'v1', expected one of v2, v2beta1"]
    assert status_problems("v2beta1", "ok", "id", first_version="v2") == ["version changed from 'v2' to 'v2beta1'"]
