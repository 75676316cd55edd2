"""Every rule of the configuration, with every kind of bad value (SPEC section 2, issue 2)."""
from __future__ import absolute_import, division, print_function

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from wazuh_cluster import config, paths  # noqa: E402
from wazuh_cluster.errors import ConfigError  # noqa: E402

KEY = "abcdefghijklmnopqrstuvwxyz012345"
DEFAULTS = dict(name="wazuh", node_name="node01", node_type="master", key=KEY, interval="2m",
                port="1516", bind_addr="0.0.0.0", nodes=["192.0.2.10", "192.0.2.11"],
                hidden="no", disabled="no")


def cluster_block(**values):
    merged = dict(DEFAULTS)
    merged.update(values)
    lines = ["<cluster>"]
    for name, value in merged.items():
        if value is None:
            continue
        if name == "nodes":
            lines.append("<nodes>%s</nodes>" % "".join("<node>%s</node>" % n for n in value))
        else:
            lines.append("<%s>%s</%s>" % (name, value, name))
    lines.append("</cluster>")
    return "\n".join(lines)


@pytest.fixture
def home():
    path = tempfile.mkdtemp(prefix="wzc-config-")
    os.makedirs(os.path.join(path, "etc"))
    shutil.copy(os.path.join(ROOT, "etc", "cluster.json"), os.path.join(path, "etc"))
    yield path
    shutil.rmtree(path)


def write(home, name, text):
    with open(os.path.join(home, "etc", name), "w") as handle:
        handle.write(text)


def load(home, conf=None, addresses=("192.0.2.10", "fd00::2"), resolver=None, **values):
    if conf is None:
        conf = "<ossec_config>\n%s\n</ossec_config>\n" % cluster_block(**values)
    write(home, "ossec.conf", conf)
    resolve = resolver or (lambda host: (host,) if host[0].isdigit() else ())
    return config.load(paths.Paths(home), addresses=lambda: addresses, resolver=resolve)


def problems(home, **kwargs):
    with pytest.raises(ConfigError) as info:
        load(home, **kwargs)
    return info.value.problems


def test_valid_configuration_is_frozen_with_converted_values(home):
    cfg = load(home)
    assert cfg.interval == 120 and cfg.port == 1516 and cfg.own_address == "192.0.2.10"
    assert cfg.nodes == ("192.0.2.10", "192.0.2.11") and not cfg.hidden and not cfg.disabled
    assert [item.name for item in cfg.items] == ["client.keys", "shared", "agent-groups",
                                                 "agent-info"]
    with pytest.raises(AttributeError):
        cfg.port = 1


def test_repr_never_shows_the_key(home):
    cfg = load(home)
    assert KEY not in repr(cfg) and KEY not in str(cfg)


def test_template_defaults_apply_to_missing_elements(home):
    cfg = load(home, name=None, node_name=None, node_type=None, interval=None, port=None,
               bind_addr=None, hidden=None)
    assert (cfg.name, cfg.node_name, cfg.node_type, cfg.interval, cfg.port, cfg.bind_addr,
            cfg.hidden) == ("wazuh", "node01", "master", 120, 1516, "0.0.0.0", False)


def test_disabled_is_the_default(home):
    assert load(home, disabled=None).disabled is True


def test_later_block_overrides_earlier_one_and_comments_are_ignored(home):
    conf = ("<?xml version='1.0'?>\n<!-- header <cluster> in a comment -->\n"
            "<ossec_config><global><a>1</a></global>%s</ossec_config>\n"
            "<ossec_config><cluster><port>1600</port><!-- x --></cluster></ossec_config>\n"
            % cluster_block())
    assert load(home, conf=conf).port == 1600


@pytest.mark.parametrize("key, shown", [
    ("short", "got 5 characters"),
    (KEY + "x", "got 33 characters"),
    ("abcdefghijklmnopqrstuvwxyz01234!", "not all alphanumeric"),
    ("", "missing"),
])
def test_bad_keys_are_refused_without_echoing_them(home, key, shown):
    found = problems(home, key=key if key else None)
    assert len(found) == 1 and "<key>" in found[0] and shown in found[0]
    if key:
        assert key not in found[0]


def test_empty_key_element_is_refused(home):
    found = problems(home, key="")
    assert "<cluster><key>" in found[0] and "32 alphanumeric" in found[0]


@pytest.mark.parametrize("element, value, reason", [
    ("node_type", "worker", "'master' or 'client'"),
    ("node_type", "", "'master' or 'client'"),
    ("interval", "2h", "followed by 's' or 'm'"),
    ("interval", "0s", "positive"),
    ("interval", "m", "positive"),
    ("port", "0", "1 to 65535"),
    ("port", "65536", "1 to 65535"),
    ("port", "abc", "1 to 65535"),
    ("bind_addr", "300.1.1.1", "IP address"),
    ("bind_addr", "eth0", "IP address"),
    ("hidden", "maybe", "'yes' or 'no'"),
    ("disabled", "true", "'yes' or 'no'"),
    ("name", "my cluster", "1-64 characters"),
    ("node_name", "a/b", "1-64 characters"),
    ("node_name", "x" * 65, "1-64 characters"),
])
def test_bad_values_name_file_element_and_value(home, element, value, reason):
    found = problems(home, **{element: value})
    assert len(found) == 1
    line = found[0]
    assert line.startswith(os.path.join(home, "etc", "ossec.conf") + ": <cluster><%s>" % element)
    assert reason in line and repr(value) in line


def test_unknown_element_is_an_error_that_names_it(home):
    conf = "<ossec_config>%s</ossec_config>" % cluster_block().replace(
        "</cluster>", "<ssl>yes</ssl></cluster>")
    found = problems(home, conf=conf)
    assert any("unknown element <ssl>" in line for line in found)


def test_malformed_xml_is_reported_with_the_file(home):
    found = problems(home, conf="<ossec_config><cluster><name>x</cluster></ossec_config>")
    assert "malformed XML" in found[0] and "ossec.conf" in found[0]


def test_missing_cluster_block(home):
    found = problems(home, conf="<ossec_config><global/></ossec_config>")
    assert found == ["%s: no <cluster> block" % os.path.join(home, "etc", "ossec.conf")]


def test_missing_ossec_conf(home):
    with pytest.raises(ConfigError) as info:
        config.load(paths.Paths(home))
    assert "cannot read" in info.value.problems[0]


def test_no_nodes(home):
    found = problems(home, nodes=[])
    assert "no <node> listed" in found[0]


def test_lone_localhost_is_an_error(home):
    found = problems(home, nodes=["localhost"], resolver=lambda h: ("127.0.0.1",))
    assert "'localhost' alone" in found[0]


def test_bad_node_entry(home):
    found = problems(home, nodes=["192.0.2.10", "bad host!"])
    assert "<nodes><node>" in found[0] and "'bad host!'" in found[0]


def test_unresolvable_node(home):
    found = problems(home, nodes=["192.0.2.10", "nosuchhost.invalid"])
    assert "does not resolve" in found[0] and "nosuchhost.invalid" in found[0]


def test_no_own_address_is_an_error(home):
    found = problems(home, addresses=("198.51.100.7",))
    assert "none of this host's addresses (198.51.100.7) is listed" in found[0]


def test_host_names_in_nodes_are_resolved_to_find_self(home):
    names = {"master.example": ("192.0.2.11",), "client.example": ("192.0.2.10",)}
    cfg = load(home, nodes=["master.example", "client.example"],
               resolver=lambda host: names.get(host, ()))
    assert cfg.own_address == "192.0.2.10"


def test_specific_bind_addr_listed_in_nodes_is_own_address(home):
    cfg = load(home, bind_addr="127.0.0.3", nodes=["127.0.0.2", "127.0.0.3"], addresses=())
    assert cfg.own_address == "127.0.0.3"


def test_disabled_cluster_skips_key_and_node_rules(home):
    cfg = load(home, disabled="yes", key=None, nodes=[])
    assert cfg.disabled and cfg.own_address is None


def test_disabled_cluster_still_rejects_unknown_elements(home):
    conf = "<ossec_config>%s</ossec_config>" % cluster_block(disabled="yes").replace(
        "</cluster>", "<extra/></cluster>")
    assert any("<extra>" in line for line in problems(home, conf=conf))


def test_internal_options_local_overrides_internal(home):
    write(home, "internal_options.conf", "# comment\ncluster.poll_interval=2\nother.x=1\n")
    write(home, "local_internal_options.conf", "cluster.poll_interval=0.5  # faster\n")
    assert load(home).options.poll_interval == 0.5


def test_internal_option_defaults(home):
    options = load(home).options
    assert options.poll_interval == 1 and options.scan_interval == 10
    assert options.max_removed_agents_ratio == 0.5 and options.allow_unlisted_peers is False


@pytest.mark.parametrize("line, reason", [
    ("cluster.poll_interval=abc", "must be a number"),
    ("cluster.poll_interval=1000", "between"),
    ("cluster.allow_unlisted_peers=yes", "0 or 1"),
    ("cluster.max_frame_bytes=1.5", "whole number"),
    ("cluster.no_such_option=1", "unknown option cluster.no_such_option"),
    ("cluster.keepalive", "has no '='"),
])
def test_bad_internal_options_name_file_line_and_value(home, line, reason):
    write(home, "local_internal_options.conf", "\n" + line + "\n")
    found = problems(home)
    assert len(found) == 1 and reason in found[0]
    assert "local_internal_options.conf:2" in found[0]


@pytest.mark.parametrize("table, reason", [
    ("{", "malformed JSON"),
    ("[]", "\"items\" list"),
    ('{"items": [{"name": "x", "path": "/etc/x", "kind": "file", "source": "master"}]}',
     "must be relative"),
    ('{"items": [{"name": "x", "path": "etc/../x", "kind": "file", "source": "master"}]}',
     "must be relative"),
    ('{"items": [{"name": "x", "path": "etc/x", "kind": "link", "source": "master"}]}',
     "kind 'link'"),
    ('{"items": [{"name": "x", "path": "etc/x", "kind": "file", "source": "peer"}]}',
     "source 'peer'"),
    ('{"items": [{"name": "x", "path": "etc/x", "kind": "file", "source": "master", '
     '"mode": "999"}]}', "octal mode"),
    ('{"items": [{"name": "x", "path": "etc/x", "kind": "file", "source": "master", '
     '"hot": "yes"}]}', "true or false"),
    ('{"items": [{"name": "x", "path": "etc/x", "kind": "file", "source": "master", '
     '"color": 1}]}', "unknown field 'color'"),
    ('{"items": [{"path": "etc/x", "kind": "file", "source": "master"}]}', "'name' is required"),
    ('{"items": [{"name": "x", "path": "etc/x", "kind": "file", "source": "master"}, '
     '{"name": "x", "path": "etc/y", "kind": "file", "source": "master"}]}', "used twice"),
])
def test_items_table_is_validated(home, table, reason):
    write(home, "cluster.json", table)
    found = problems(home)
    assert any(reason in line and "cluster.json" in line for line in found), found


def test_shipped_items_table_is_valid():
    items, exclude = config.load_items(os.path.join(ROOT, "etc", "cluster.json"))
    by_name = dict((item.name, item) for item in items)
    assert by_name["agent-info"].mtime_is_data and by_name["agent-info"].source == "client"
    assert by_name["client.keys"].hot and by_name["shared"].recursive
    assert "merged.mg" in exclude and "ar.conf" in exclude


def test_several_problems_are_all_reported(home):
    found = problems(home, key="short", port="0", node_type="boss")
    assert len(found) == 3


def test_real_hostname_command_gives_addresses():
    # The real `hostname --all-ip-addresses` of this machine, as Wazuh 3.0 used it.
    out = subprocess.check_output(["hostname", "--all-ip-addresses"]).decode().split()
    assert config.host_addresses() == tuple(out)


def test_template_is_a_valid_disabled_configuration(home):
    with open(os.path.join(ROOT, "etc", "ossec.conf.template")) as handle:
        template = handle.read()
    cfg = load(home, conf=template)
    assert cfg.disabled and cfg.name == "wazuh" and cfg.interval == 120


# -- `wazuh-clusterd -t` warnings about failover ------------------------------------------------

def failover_home(home, options, nodes):
    write(home, "local_internal_options.conf", "".join("cluster.%s\n" % o for o in options))
    write(home, "ossec.conf", "<ossec_config>\n%s\n</ossec_config>\n"
          % cluster_block(bind_addr="127.0.0.1", nodes=nodes))
    return home


def config_test(home, capsys):
    from wazuh_cluster import clusterd
    status = clusterd.main(["-t", "-D", home])
    return status, capsys.readouterr().err.splitlines()


def test_config_test_warns_when_failover_has_no_majority_without_both_of_two_nodes(home, capsys):
    failover_home(home, ["failover=1"], ["127.0.0.1", "127.0.0.2"])
    status, lines = config_test(home, capsys)
    assert status == 0 and len(lines) == 1
    assert lines[0].startswith("wazuh-clusterd: WARNING: cluster.failover=1 with 2 listed")
    assert "three or more" in lines[0]


def test_config_test_warns_when_failover_timeout_is_below_two_keepalives(home, capsys):
    failover_home(home, ["failover=1", "keepalive=10", "failover_timeout=15"],
                  ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    status, lines = config_test(home, capsys)
    assert status == 0 and len(lines) == 1
    assert "cluster.failover_timeout=15 is below 2 x cluster.keepalive (10 s)" in lines[0]
    assert "lease" in lines[0] and "at least 20" in lines[0]


@pytest.mark.parametrize("options, nodes", [
    ([], ["127.0.0.1", "127.0.0.2"]),                                    # failover off
    (["failover_timeout=5"], ["127.0.0.1", "127.0.0.2"]),                # off: timeout unused
    (["failover=1"], ["127.0.0.1", "127.0.0.2", "127.0.0.3"]),           # 0 = 3 x keepalive
    (["failover=1", "failover_timeout=20"], ["127.0.0.1", "127.0.0.2", "127.0.0.3"]),
])
def test_config_test_is_silent_for_a_sound_failover_setting_or_none(home, capsys, options, nodes):
    failover_home(home, options, nodes)
    assert config_test(home, capsys) == (0, [])


def test_failover_options_defaults_and_range(home):
    options = load(home).options
    assert (options.failover, options.failover_timeout, options.failback) == (False, 0, True)
    write(home, "local_internal_options.conf", "cluster.failover_timeout=-1\n")
    assert "between 0 and 3600" in problems(home)[0]
