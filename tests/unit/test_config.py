"""The jobs file: good files parse into the options the CLI would build; every bad key or value is
reported with its file, job and key; the example in `configcheck --help` is itself valid."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from discrep.run.config import ConfigError, load, parse

pytestmark = pytest.mark.unit


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "discrep.toml"
    p.write_text(text)
    return str(p)


def test_good_file_with_defaults(tmp_path):
    cfg = load(_write(tmp_path, """
metrics_listen = "127.0.0.1:9811"
max_concurrent = 3
every = "5m"
keep_last = 7

[jobs.home]
source = "/home"
dest = "/backup/home"
rpo = "1h"

[jobs.web]
source = "me@web1:/srv/www"
dest = "/backup/www"
schedule = "*/15 * * * *"
keep_last = 3
keep_within = "2d"
transport = "sftp"
numeric_ids = true
"""))
    assert cfg.metrics_listen == ("127.0.0.1", 9811) and cfg.max_concurrent == 3
    home, web = cfg.jobs["home"], cfg.jobs["web"]
    assert home.every_s == 300 and home.schedule is None and home.rpo_s == 3600
    assert home.options.src == "/home" and home.options.dest == "/backup/home"
    assert home.options.replica.keep_last == 7 and not home.options.remote_source
    assert web.options.remote_source and web.options.ssh.transport == "sftp"
    assert web.options.replica.keep_last == 3 and web.options.replica.keep_within_s == 2 * 86400
    assert web.options.replica.numeric_ids
    assert web.every_s is None and web.schedule == "*/15 * * * *"   # its own timing replaces the default


def test_next_run_every_and_cron():
    cfg = parse({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "30s"},
                          "b": {"source": "/s2", "dest": "/d2", "schedule": "0 * * * *"}}}, "x.toml")
    assert cfg.jobs["a"].next_run(1000.0) == 1030.0
    t = time.mktime((2026, 12, 2, 10, 17, 0, 0, 0, -1))
    nxt = cfg.jobs["b"].next_run(t)
    assert time.localtime(nxt)[3:5] == (11, 0)


@pytest.mark.parametrize("doc, fragment", [
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "5m", "colour": "red"}}},
     "job 'a': unknown key 'colour'"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "soon"}}}, "job 'a': every = 'soon' is not valid"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": -5}}}, "job 'a': every = -5 is not valid"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "schedule": "every day"}}}, "job 'a': schedule"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d"}}}, "needs 'every'"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "schedule": "* * * * *"}}}, "exclude each other"),
    ({"jobs": {"a": {"dest": "/d", "every": "1m"}}}, "job 'a': missing key 'source'"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "snapshot": "zfs"}}}, "snapshot = 'zfs'"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "keep_last": 0}}}, "keep_last = 0"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "numeric_ids": "yes"}}}, "numeric_ids"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m"},
               "b": {"source": "/t", "dest": "/d", "every": "1m"}}}, "two jobs never share a DEST"),
    ({"metrics_listen": "9811", "jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m"}}}, "metrics_listen"),
    ({"bogus": 1, "jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m"}}}, "top level: unknown key 'bogus'"),
    ({}, "no jobs"),
    ({"jobs": {"a": 5}}, "must be a table"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "exclude": "*.o"}}}, "job 'a': exclude = '*.o'"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "include": ["", "x"]}}}, "job 'a': include"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "filter": ["merge x"]}}},
     "job 'a': filter rules (filter)"),
    ({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1m", "delete_excluded": 1}}}, "delete_excluded = 1"),
])
def test_bad_files_name_the_job_and_key(doc, fragment):
    with pytest.raises(ConfigError) as ei:
        parse(doc, "/etc/x.toml")
    text = str(ei.value)
    assert fragment in text and "/etc/x.toml" in text
    assert ei.value.exit_code == 3


def test_filter_keys_feed_the_replica_options(tmp_path):
    from discrep.protocol.filters import FilterRules
    cfg = load(_write(tmp_path, """
exclude = ["*.tmp"]

[jobs.a]
source = "/s"
dest = "/d"
every = "5m"
exclude = ["*.o", "/cache/"]
include = ["keep.o"]
filter = ["dir-merge .discrepignore", "- *.bak"]
delete_excluded = true

[jobs.b]
source = "/s2"
dest = "/d2"
every = "5m"
"""))
    a, b = cfg.jobs["a"].options.replica.filter_spec(), cfg.jobs["b"].options.replica.filter_spec()
    # filter, then include, then exclude: the same FilterRules the CLI builds from those options in that order
    want = FilterRules.parse([("--filter", "dir-merge .discrepignore"), ("--filter", "- *.bak"),
                              ("--include", "keep.o"), ("--exclude", "*.o"), ("--exclude", "/cache/")])
    assert a.rules == want and a.delete_excluded
    assert b.rules == FilterRules.parse([("--exclude", "*.tmp")]) and not b.delete_excluded   # the default
    from discrep.protocol import filters
    from discrep.run import config
    assert config.MAX_RULES == filters.MAX_RULES


def test_all_problems_at_once():
    with pytest.raises(ConfigError) as ei:
        parse({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "x"},
                        "b": {"source": "/s", "dest": "/e", "every": "1m", "what": 1}}}, "f")
    assert len(ei.value.problems) == 2


def test_not_toml_and_missing(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(_write(tmp_path, "[jobs.a\nsource="))
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "nope.toml"))


def test_help_example_is_a_valid_file(tmp_path):
    """The example `configcheck --help` teaches must itself pass configcheck."""
    out = subprocess.run([sys.executable, "-m", "discrep", "configcheck", "--help"], stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    lines = out.split("example jobs file:\n", 1)[1].split("\n\n")
    body = "\n\n".join(lines[:3])
    text = "\n".join(line[2:] for line in body.splitlines())
    p = _write(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "discrep", "configcheck", "-c", p], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 job(s): home, web" in r.stdout


def test_snapshot_hook_keys():
    from discrep.source.options import HookOptions
    cfg = parse({"hook_timeout": "90s",
                 "jobs": {"db": {"source": "/srv/db", "dest": "/b/db", "every": "5m",
                                 "pre_snapshot": "fsfreeze -f /srv/db", "post_snapshot": "fsfreeze -u /srv/db",
                                 "hook_failure": "crash-consistent"},
                          "plain": {"source": "/s", "dest": "/d", "every": "5m"}}}, "x.toml")
    assert cfg.jobs["db"].options.hooks == HookOptions("fsfreeze -f /srv/db", "fsfreeze -u /srv/db", 90.0,
                                                      "crash-consistent")
    assert cfg.jobs["plain"].options.hooks is None          # the source's own hooks.toml applies
    with pytest.raises(ConfigError) as e:
        parse({"jobs": {"r": {"source": "me@h:/srv", "dest": "/b", "every": "5m", "pre_snapshot": "true"},
                        "f": {"source": "/s", "dest": "/d", "every": "5m", "hook_failure": "ignore"},
                        "t": {"source": "/s2", "dest": "/d2", "every": "5m", "hook_timeout": "2h"}}}, "x.toml")
    text = "\n".join(e.value.problems)
    assert "job 'r'" in text and "hooks.toml" in text
    assert "job 'f': hook_failure = 'ignore'" in text and "'crash-consistent'" in text
    assert "job 't': hook_timeout" in text


def test_hook_file_keys_checked():
    from discrep.core.errors import SourceError
    from discrep.source.hooks import hook_options
    h = hook_options({"pre_snapshot": "a", "post_snapshot": "b", "timeout": 5, "on_failure": "crash-consistent"},
                     "hooks.toml")
    assert (h.pre_snapshot, h.post_snapshot, h.timeout_s, h.on_failure) == ("a", "b", 5.0, "crash-consistent")
    for bad in ({"pre_snapshot": ""}, {"pre": "x"}, {"timeout": 0}, {"timeout": True}, {"on_failure": "x"},
                {"post_snapshot": "x\0y"}):
        with pytest.raises(SourceError):
            hook_options(bad, "hooks.toml")


def test_keep_grid_key():
    cfg = parse({"keep": "24x1h, 30x1d", "jobs": {"a": {"source": "/s", "dest": "/d", "every": "5m"},
                                                  "b": {"source": "/s2", "dest": "/d2", "every": "5m",
                                                        "keep": "12x30d"}}}, "x.toml")
    assert cfg.jobs["a"].options.replica.keep_grid == ((24, 3600.0), (30, 86400.0))
    assert cfg.jobs["b"].options.replica.keep_grid == ((12, 30 * 86400.0),)
    with pytest.raises(ConfigError) as e:
        parse({"jobs": {"a": {"source": "/s", "dest": "/d", "every": "5m", "keep": "24 hours"}}}, "x.toml")
    assert "job 'a': keep = '24 hours' is not valid" in str(e.value) and "24x1h" in str(e.value)
