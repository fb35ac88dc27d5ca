"""scripts/monitoring: the alert rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), and the Grafana dashboard and the rules query only metrics the daemon
exports -- checked against what discrep/run/metrics.py really puts into its registry."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Set

import pytest

from discrep.run import metrics

pytestmark = pytest.mark.unit

MON = Path(__file__).resolve().parents[2] / "scripts" / "monitoring"
RULES = MON / "discrep.rules.yml"
RULE_TESTS = MON / "discrep.rules.test.yml"
DASHBOARD = MON / "grafana-dashboard.json"
NAME = re.compile(r"\b(discrep_[a-z_]+)\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        why = "promtool is not installed (scripts/setup.sh installs the Debian package prometheus)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}: in CI the alert rules must be checked")
        pytest.skip(why)
    return found


def exported_samples() -> Set[str]:
    """Sample names the daemon's registry exposes once a job and a root exist."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    m = metrics.Metrics()
    m.add_job("j", 3600.0, time.time() - 10)
    m.set_state("j", last_success=time.time(), lag_ref=time.time() - 5, failures=0, running=False,
                next_run=time.time() + 60)
    m.cycle_done("j", "ok", {"bytes_transferred": 10, "bytes_written": 5, "files_changed": 1}, 1.5)
    m.set_history_bytes("j", 4096)
    m.set_root("/srv", watcher_up=True, pending=3)
    text = generate_latest(m.registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_list_is_what_the_registry_exports():
    names = exported_samples()
    assert set(metrics.METRICS) <= names, set(metrics.METRICS) - names
    assert {n for n in names if n.startswith("discrep_")} == set(metrics.METRICS)


def test_metrics_values_and_removal():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    m = metrics.Metrics()
    m.add_job("a", None, time.time() - 100)
    m.cycle_done("a", "error", {}, 2.0)
    m.cycle_done("a", "ok", {"bytes_transferred": 7, "files_changed": 2}, 1.0)
    m.cycle_done("a", "warning", {"bytes_transferred": 3}, 1.0)

    def values():
        text = generate_latest(m.registry).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}
    v = values()
    assert v[("discrep_cycles_total", (("job", "a"), ("result", "error")))] == 1
    assert v[("discrep_bytes_transferred_total", (("job", "a"),))] == 10      # errors add no figures
    assert v[("discrep_files_changed_total", (("job", "a"),))] == 2
    assert 99 < v[("discrep_lag_seconds", (("job", "a"),))] < 200              # since first seen: never succeeded
    assert not any(k[0] == "discrep_rpo_seconds" for k in v)                  # no rpo configured
    m.remove_job("a")
    assert not any(("job", "a") in k[1] for k in values())


def test_rules_pass_promtool_check():
    p = subprocess.run([promtool(), "check", "rules", str(RULES)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
    assert p.returncode == 0, p.stdout
    assert "SUCCESS: 4 rules found" in p.stdout


def test_rules_unit_tests_pass():
    p = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120, cwd=MON)
    assert p.returncode == 0, p.stdout
    assert "SUCCESS" in p.stdout


def test_rule_tests_catch_a_broken_rule(tmp_path):
    """The rule tests can fail: with the RPO comparison made non-strict they must."""
    broken = RULES.read_text().replace("discrep_lag_seconds > on(instance, job)", "discrep_lag_seconds >= on(instance, job)")
    assert broken != RULES.read_text()
    (tmp_path / "discrep.rules.yml").write_text(broken)
    (tmp_path / "t.yml").write_text(RULE_TESTS.read_text())
    p = subprocess.run([promtool(), "test", "rules", "t.yml"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode != 0 and "DiscrepRPOBreached" in p.stdout


def _exprs(node) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query", "definition") and isinstance(v, str):
                yield v
            else:
                yield from _exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _exprs(v)


def test_dashboard_queries_only_exported_metrics_and_all_of_them():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["panels"] and dash["title"]
    used = {n for e in _exprs(dash) for n in NAME.findall(e)}
    exported = exported_samples()
    assert used and used <= exported, used - exported
    assert set(metrics.METRICS) <= used, f"not on the dashboard: {set(metrics.METRICS) - used}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t.get("expr") for p in dash["panels"] for t in p["targets"])


def test_rules_query_only_exported_metrics():
    used = set(NAME.findall(RULES.read_text())) | set(NAME.findall(RULE_TESTS.read_text()))
    assert used and used <= exported_samples(), used - exported_samples()
