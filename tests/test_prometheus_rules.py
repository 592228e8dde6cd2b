"""deploy/prometheus: the alert rules pass `promtool test rules` and use only series a real plugin exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from p11kms.plugin.service import CHECK_PROBE_KEY_ID_PREFIX
from tests.support import PluginProcess

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = PROMETHEUS / "p11kms-alerts.yaml"
RULE_TESTS = PROMETHEUS / "p11kms-alerts.test.yaml"
# Series names in PromQL: p11kms_ followed by name characters, not inside a label matcher's value.
METRIC_NAME = re.compile(r"\b(p11kms_[a-zA-Z0-9_]+)")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}

Keys = Callable[[], tuple[str, str]]
Run = Callable[..., PluginProcess]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool comes with Debian's prometheus package: scripts/setup.sh --dev installs it"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == tested


def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    """An alert that would watch the check probe's counter fires where the tests say it must not."""
    rules = RULES.read_text().replace(
        'code="FAILED_PRECONDITION"}[10m])) > 0',
        'code="FAILED_PRECONDITION"}[10m]) or p11kms_check_probes_total{job="p11kms"}) > 0')
    assert rules != RULES.read_text()
    (tmp_path / RULES.name).write_text(rules)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    tested = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert tested.returncode != 0 and "P11kmsUnknownKeyId" in tested.stdout + tested.stderr


def _exported(text: str) -> dict[str, set[str]]:
    """Every series name a /metrics page declares, with the label names of the samples it shows."""
    names: dict[str, set[str]] = {}
    for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        base, kind = kind_line
        for suffix in SUFFIXES.get(kind, ("",)):
            names.setdefault(base.removesuffix("_total") + suffix if kind == "counter" else base + suffix, set())
    for name, labels in re.findall(r"^(\w+)\{([^}]*)\}", text, re.MULTILINE):
        names.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return names


def _used_in_rules() -> dict[str, set[str]]:
    """Every p11kms_* name in the rules and the rule tests' input series, with the labels they match on."""
    used: dict[str, set[str]] = {}
    expressions = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    series = [s["series"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for s in test["input_series"]]
    for text in expressions + series:
        for match in re.finditer(r"\b(p11kms_\w+)(\{[^}]*\})?", text):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2) or ""))
            used.setdefault(match.group(1), set()).update(labels - {"job", "instance", "le"})
    return used


def _scrape(plugin: PluginProcess) -> str:
    address = re.search(r"http listening .* address=(\S+)", plugin.log())
    assert address, plugin.log()
    with urllib.request.urlopen(f"http://{address.group(1)}/metrics", timeout=5) as page:
        text: str = page.read().decode()
        return text


def test_rules_use_only_series_a_fresh_plugin_exports_with_their_labels(run_plugin: Run, new_key: Keys) -> None:
    """Scraped before any call: an alert on a series that only appears with its first event misses that event."""
    label, _ = new_key()
    exported = _exported(_scrape(run_plugin(label)))
    used = _used_in_rules()
    assert used, "the rules name no p11kms series"
    missing = sorted(set(used) - set(exported))
    assert not missing, f"the rules use series the plugin does not export: {missing}"
    for name, labels in used.items():
        assert labels <= exported[name], (name, labels, exported[name])


def test_a_fresh_plugin_exports_the_failure_series_at_zero(run_plugin: Run, new_key: Keys) -> None:
    """A counter born at 1 has an increase() of 0: the first failed reload or unknown key_id would fire nothing."""
    (primary, _), (old, _) = new_key(), new_key()
    text = _scrape(run_plugin(primary, old))
    for line in ('p11kms_keyring_reloads_total{result="failure"} 0.0',
                 'p11kms_keyring_reloads_total{result="success"} 0.0',
                 'p11kms_grpc_requests_total{code="FAILED_PRECONDITION",method="Decrypt"} 0.0',
                 'p11kms_grpc_requests_total{code="UNAVAILABLE",method="Encrypt"} 0.0',
                 'p11kms_grpc_requests_total{code="INVALID_ARGUMENT",method="Decrypt"} 0.0',
                 'p11kms_hsm_reconnect_attempts_total{result="failure"} 0.0',
                 'p11kms_check_probes_total{code="FAILED_PRECONDITION"} 0.0',
                 f'p11kms_keyring_missing_key{{label="{primary}",role="primary"}} 0.0',
                 f'p11kms_keyring_missing_key{{label="{old}",role="secondary"}} 0.0'):
        assert line in text, line


def test_the_check_probe_stays_out_of_the_request_counter(run_plugin: Run, new_key: Keys) -> None:
    """`p11kms check`'s deliberate unknown key_id must not look like data under a lost key."""
    label, _ = new_key()
    plugin = run_plugin(label)
    result = subprocess.run([sys.executable, "-m", "p11kms", "check", "--socket", str(plugin.socket)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "decrypt.refuses_unknown_key_id" in result.stdout
    text = _scrape(plugin)
    assert 'p11kms_check_probes_total{code="FAILED_PRECONDITION"} 1.0' in text
    assert 'p11kms_grpc_requests_total{code="FAILED_PRECONDITION",method="Decrypt"} 0.0' in text
    probe_lines = [line for line in plugin.log().splitlines() if "p11kms check probe" in line]
    assert probe_lines and all("level=info" in line for line in probe_lines)
    assert CHECK_PROBE_KEY_ID_PREFIX not in plugin.log()  # the made-up key_id is not worth a line
    assert "request failed" not in plugin.log()


def test_scrape_config_is_valid(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes service discovery, so the check runs on a copy whose
    pod discovery is replaced by a static target; everything else (relabelling, job name) is checked as is."""
    config = yaml.safe_load((PROMETHEUS / "scrape-config.yaml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "p11kms"  # what the alert rules select
    assert any(r.get("replacement") == "$1:8095" for r in job["relabel_configs"])
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["127.0.0.1:8095"]}]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump({"rule_files": [str(RULES)], **config}))
    checked = promtool("check", "config", str(copy))
    assert checked.returncode == 0, checked.stdout + checked.stderr
