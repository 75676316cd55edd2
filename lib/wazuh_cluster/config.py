"""Configuration: ossec.conf's <cluster>, cluster.* internal options, the items table.

Declared as tables of (name, converter, default); converters are small pure functions that
raise ValueError; every problem becomes one line naming the file, the element and the value;
the result is frozen. `wazuh-clusterd -t` runs exactly `load()` and nothing else.
"""
from __future__ import absolute_import, division, print_function

import collections
import fnmatch
import json
import re
import socket
import subprocess
import xml.etree.ElementTree as ElementTree

from wazuh_cluster.compat import string_types
from wazuh_cluster.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KEY_RE = re.compile(r"^[A-Za-z0-9]{32}$")
INTERVAL_RE = re.compile(r"^([0-9]{1,6})([sm])$")
HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


# -- converters: text -> value, ValueError with a short reason -------------------------------

def to_name(text):
    if not NAME_RE.match(text):
        raise ValueError("must be 1-64 characters from A-Z a-z 0-9 . _ -")
    return text


def to_node_type(text):
    if text not in ("master", "client"):
        raise ValueError("must be 'master' or 'client'")
    return text


def to_key(text):
    # The value itself is never echoed: it is the cluster's secret.
    if not KEY_RE.match(text):
        raise ValueError("must be exactly 32 alphanumeric characters (got %d characters%s)"
                         % (len(text), "" if text.isalnum() or not text else ", not all alphanumeric"))
    return text


def to_interval(text):
    match = INTERVAL_RE.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError("must be a positive number followed by 's' or 'm', e.g. '2m'")
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def to_port(text):
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return int(text)


def to_address(text):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return text
        except (socket.error, ValueError):
            continue
    raise ValueError("must be an IP address")


def to_host(text):
    try:
        return to_address(text)
    except ValueError:
        if HOST_RE.match(text) and ".." not in text:
            return text
    raise ValueError("must be an IP address or a host name")


def to_yes_no(text):
    if text not in ("yes", "no"):
        raise ValueError("must be 'yes' or 'no'")
    return text == "yes"


def to_int_range(low, high):
    def convert(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("must be a whole number")
        if not low <= value <= high:
            raise ValueError("must be between %d and %d" % (low, high))
        return value
    return convert


def to_float_range(low, high):
    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number")
        if not low <= value <= high:
            raise ValueError("must be between %g and %g" % (low, high))
        return value
    return convert


def to_bool01(text):
    if text not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return text == "1"


def to_mode(text):
    if not re.match(r"^0?[0-7]{3}$", text):
        raise ValueError("must be an octal mode such as '0660'")
    return int(text, 8)


# -- the tables -------------------------------------------------------------------------------

# (element, converter, default); None = no default, required when the cluster is enabled.
CLUSTER_ELEMENTS = (
    ("name", to_name, "wazuh"),
    ("node_name", to_name, "node01"),
    ("node_type", to_node_type, "master"),
    ("key", to_key, None),
    ("interval", to_interval, "2m"),
    ("port", to_port, "1516"),
    ("bind_addr", to_address, "0.0.0.0"),
    ("nodes", None, None),
    ("hidden", to_yes_no, "no"),
    ("disabled", to_yes_no, "yes"),
)

# Checked only when the cluster is enabled: Wazuh ships a disabled block with an empty key.
ENABLED_ONLY = ("key", "nodes")

# cluster.NAME=value in internal_options.conf / local_internal_options.conf.
OPTIONS = (
    ("poll_interval", to_float_range(0.05, 60), "1"),
    ("scan_interval", to_float_range(1, 3600), "10"),
    ("received_scan_interval", to_float_range(1, 86400), "600"),
    ("keepalive", to_float_range(0.2, 600), "10"),
    ("handshake_timeout", to_float_range(0.1, 120), "10"),
    ("request_timeout", to_float_range(1, 3600), "60"),
    ("max_frame_bytes", to_int_range(1 << 16, 64 << 20), str(4 << 20)),
    ("allow_unlisted_peers", to_bool01, "0"),
    ("max_removed_agents_ratio", to_float_range(0, 1), "0.5"),
    ("max_future_seconds", to_int_range(0, 3600), "60"),
    ("max_connections", to_int_range(1, 4096), "64"),
    ("max_pending_handshakes", to_int_range(1, 1024), "16"),
    ("max_connections_per_address", to_int_range(1, 4096), "8"),
    ("max_pending_per_address", to_int_range(1, 1024), "4"),
    ("legacy_node_requests", to_bool01, "1"),
    ("round_summaries", to_bool01, "1"),
    ("push_delay", to_float_range(0, 30), "0.05"),
    ("reconnect_max", to_float_range(1, 3600), "30"),
    ("internal_restart_max", to_float_range(1, 600), "30"),
    ("log_level", to_int_range(0, 2), "0"),
    ("max_inflight_bytes", to_int_range(16 << 20, 4 << 30), str(24 << 20)),
    ("max_client_message_bytes", to_int_range(1 << 20, 64 << 20), str(8 << 20)),
    ("delta_min_bytes", to_int_range(0, 1 << 30), str(64 << 10)),
    ("delta_store_bytes", to_int_range(0, 1 << 30), str(10 << 20)),
    ("failover", to_bool01, "0"),
    ("failover_timeout", to_float_range(0, 3600), "0"),  # 0 = 3 x cluster.keepalive
    ("failback", to_bool01, "1"),
)

ITEM_FIELDS = ("name", "path", "kind", "source", "recursive", "mode", "dir_mode", "hot",
               "mtime_is_data", "delete_dirs")
Item = collections.namedtuple("Item", ITEM_FIELDS)
Options = collections.namedtuple("Options", [name for name, _, _ in OPTIONS])

_CONFIG_FIELDS = ("name", "node_name", "node_type", "key", "interval", "port", "bind_addr",
                  "nodes", "hidden", "disabled", "own_address", "options", "items", "exclude")


class ClusterConfig(collections.namedtuple("ClusterConfig", _CONFIG_FIELDS)):
    """The frozen configuration. Its repr hides the key."""
    __slots__ = ()

    def __repr__(self):
        shown = ", ".join("%s='%s'" % (f, "<hidden>" if f == "key" else getattr(self, f))
                          for f in self._fields)
        return "ClusterConfig(%s)" % shown

    __str__ = __repr__

    @property
    def is_master(self):
        return self.node_type == "master"

    def excluded(self, basename):
        return any(fnmatch.fnmatch(basename, pattern) for pattern in self.exclude)


# -- readers ----------------------------------------------------------------------------------

def read_text(path):
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", "replace")


def parse_ossec_conf(text, path):
    """ossec.conf is almost XML: several <ossec_config> blocks and comments, no single root."""
    text = re.sub(r"<\?xml[^>]*\?>", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    try:
        return ElementTree.fromstring("<root>" + text + "</root>")
    except ElementTree.ParseError as err:
        # ParseError positions count our synthetic "<root>" line; its column only on line 1.
        raise ConfigError("%s: malformed XML: %s" % (path, err))


def cluster_elements(root):
    """The <cluster> elements, later blocks overriding earlier ones element by element."""
    merged = collections.OrderedDict()
    found = False
    for block in root.findall("ossec_config"):
        for cluster in block.findall("cluster"):
            found = True
            for child in cluster:
                merged[child.tag] = child
    return found, merged


def node_list(element, path, problems):
    nodes = []
    for child in element:
        if child.tag != "node":
            problems.append(("nodes", "%s: <cluster><nodes>: unknown element <%s>"
                             % (path, child.tag)))
            continue
        text = (child.text or "").strip()
        try:
            nodes.append(to_host(text))
        except ValueError as err:
            problems.append(("nodes", "%s: <cluster><nodes><node>: '%s' %s" % (path, text, err)))
    return tuple(nodes)


def read_cluster(path, problems):
    """Convert the <cluster> block into a dict of values.

    Problems are collected as (element, line) so that the rules which only matter to a running
    cluster (key, nodes) can be dropped for a disabled one, as Wazuh ships it.
    """
    root = parse_ossec_conf(read_text(path), path)
    found, elements = cluster_elements(root)
    if not found:
        problems.append((None, "%s: no <cluster> block" % path))
        return {}
    known = dict((name, (conv, default)) for name, conv, default in CLUSTER_ELEMENTS)
    for tag in elements:
        if tag not in known:
            problems.append((None, "%s: <cluster>: unknown element <%s>" % (path, tag)))
    values = {}
    for name, convert, default in CLUSTER_ELEMENTS:
        element = elements.get(name)
        if name == "nodes":
            values[name] = node_list(element, path, problems) if element is not None else ()
            continue
        text = (element.text or "").strip() if element is not None else None
        if text is None:
            text = default
        if text is None:
            values[name] = None
            continue
        try:
            values[name] = convert(text)
        except ValueError as err:
            shown = "" if name == "key" else "'%s' " % text
            problems.append((name, "%s: <cluster><%s>: %s%s" % (path, name, shown, err)))
            values[name] = None
    return values


def read_options(paths_in_order, problems):
    """cluster.* lines of the internal options files; the later file wins."""
    raw = {}
    where = {}
    for path in paths_in_order:
        try:
            text = read_text(path)
        except (IOError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line.startswith("cluster."):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                problems.append("%s:%d: '%s' has no '='" % (path, number, line))
                continue
            raw[key.strip()[len("cluster."):]] = value.strip()
            where[key.strip()[len("cluster."):]] = "%s:%d" % (path, number)
    known = dict((name, (conv, default)) for name, conv, default in OPTIONS)
    for name in raw:
        if name not in known:
            problems.append("%s: unknown option cluster.%s" % (where[name], name))
    values = {}
    for name, convert, default in OPTIONS:
        text = raw.get(name, default)
        try:
            values[name] = convert(text)
        except ValueError as err:
            problems.append("%s: cluster.%s: '%s' %s" % (where.get(name, "default"), name, text, err))
            values[name] = convert(default)
    return Options(**values)


def load_items(path):
    """The items table (etc/cluster.json) -> (tuple of Item, tuple of exclusion patterns)."""
    try:
        data = json.loads(read_text(path))
    except (IOError, OSError) as err:
        raise ConfigError("%s: cannot read: %s" % (path, err.strerror or err))
    except ValueError as err:
        raise ConfigError("%s: malformed JSON: %s" % (path, err))
    problems = []
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise ConfigError("%s: must be an object with an \"items\" list" % path)
    items = []
    for index, raw in enumerate(data["items"]):
        where = "%s: items[%d]" % (path, index)
        try:
            items.append(convert_item(raw))
        except ValueError as err:
            problems.append("%s: %s" % (where, err))
    names = [item.name for item in items]
    for name in set(names):
        if names.count(name) > 1:
            problems.append("%s: item name '%s' used twice" % (path, name))
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(p, string_types) for p in exclude):
        problems.append("%s: \"exclude\" must be a list of patterns" % path)
        exclude = []
    if problems:
        raise ConfigError(problems)
    return tuple(items), tuple(str(p) for p in exclude)


def convert_item(raw):
    if not isinstance(raw, dict):
        raise ValueError("must be an object")
    unknown = set(raw) - set(ITEM_FIELDS)
    if unknown:
        raise ValueError("unknown field '%s'" % sorted(unknown)[0])
    for field in ("name", "path", "kind", "source"):
        if not isinstance(raw.get(field), string_types):
            raise ValueError("field '%s' is required and must be a string" % field)
    path = raw["path"]
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError("path '%s' must be relative to the installation, without '.' or '..'"
                         % path)
    if raw["kind"] not in ("file", "dir"):
        raise ValueError("kind '%s' must be 'file' or 'dir'" % raw["kind"])
    if raw["source"] not in ("master", "client"):
        raise ValueError("source '%s' must be 'master' or 'client'" % raw["source"])
    flags = {}
    for field in ("recursive", "hot", "mtime_is_data", "delete_dirs"):
        value = raw.get(field, False)
        if not isinstance(value, bool):
            raise ValueError("field '%s' must be true or false" % field)
        flags[field] = value
    modes = {}
    for field, default in (("mode", "0660"), ("dir_mode", "0770")):
        modes[field] = to_mode(str(raw.get(field, default)))
    return Item(name=str(raw["name"]), path=str(path), kind=str(raw["kind"]),
                source=str(raw["source"]), mode=modes["mode"], dir_mode=modes["dir_mode"],
                **flags)


# -- own node ---------------------------------------------------------------------------------

def host_addresses():
    """This host's addresses, as Wazuh 3.0 found them: `hostname --all-ip-addresses`."""
    try:
        out = subprocess.check_output(["hostname", "--all-ip-addresses"])
    except (OSError, subprocess.CalledProcessError):
        return ()
    return tuple(out.decode("ascii", "replace").split())


def resolve(host):
    """Addresses of a node entry: an IP stays itself, a host name is looked up."""
    try:
        to_address(host)
        return (host,)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except socket.gaierror:
        return ()
    return tuple(sorted(set(info[4][0] for info in infos)))


def find_own_address(bind_addr, nodes, addresses, resolver):
    """This node's address among <nodes>, or None.

    A specific bind_addr listed in <nodes> is this node's address (several nodes on one host
    on distinct loopback addresses); otherwise the first host address that a node resolves to.
    """
    listed = []
    for node in nodes:
        listed.extend(resolver(node))
    if bind_addr not in ("0.0.0.0", "::") and bind_addr in listed:
        return bind_addr
    for address in addresses:
        if address in listed:
            return address
    return None


def load(paths, addresses=host_addresses, resolver=resolve):
    """Read, convert and validate everything; return a ClusterConfig or raise ConfigError.

    `addresses` and `resolver` are the seams for `hostname --all-ip-addresses` and DNS.
    """
    cluster_problems = []
    try:
        values = read_cluster(paths.ossec_conf, cluster_problems)
    except (IOError, OSError) as err:
        raise ConfigError("%s: cannot read: %s" % (paths.ossec_conf, err.strerror or err))
    disabled = values.get("disabled") is not False
    problems = [line for element, line in cluster_problems
                if not (disabled and element in ENABLED_ONLY)]
    options = read_options([paths.internal_options, paths.local_internal_options], problems)
    try:
        items, exclude = load_items(paths.cluster_json)
    except ConfigError as err:
        problems.extend(err.problems)
        items, exclude = (), ()
    if problems:
        raise ConfigError(problems)
    own = None
    if not disabled:
        own = validate_enabled(paths.ossec_conf, values, addresses, resolver, problems)
    if problems:
        raise ConfigError(problems)
    values.update(own_address=own, options=options, items=items, exclude=exclude)
    return ClusterConfig(**values)


def validate_enabled(path, values, addresses, resolver, problems):
    """Rules that apply only to a cluster that will run. Returns the own address."""
    if values["key"] is None:
        problems.append("%s: <cluster><key>: missing (32 alphanumeric characters)" % path)
    nodes = values["nodes"]
    if not nodes:
        problems.append("%s: <cluster><nodes>: no <node> listed" % path)
        return None
    if len(nodes) == 1 and nodes[0] == "localhost":
        problems.append("%s: <cluster><nodes>: 'localhost' alone; list the nodes' real "
                        "addresses" % path)
        return None
    for node in nodes:
        if not resolver(node):
            problems.append("%s: <cluster><nodes><node>: '%s' does not resolve" % (path, node))
    host = tuple(addresses())
    own = find_own_address(values["bind_addr"], nodes, host, resolver)
    if own is None:
        problems.append("%s: <cluster><nodes>: none of this host's addresses (%s) is listed"
                        % (path, ", ".join(host) or "none found"))
    return own


def warnings(cfg):
    """Lines for `wazuh-clusterd -t`: a configuration that loads but will not do what its
    author probably expects. Nothing when failover is off (cluster.failover=0)."""
    options = cfg.options
    if cfg.disabled or not options.failover:
        return []
    found = []
    if len(cfg.nodes) < 3:
        found.append("cluster.failover=1 with %d listed node(s): a majority of two nodes is "
                     "both of them, so no failover can happen; list three or more in <nodes>"
                     % len(cfg.nodes))
    if options.failover_timeout and options.failover_timeout < 2 * options.keepalive:
        found.append("cluster.failover_timeout=%g is below 2 x cluster.keepalive (%g s): the "
                     "lease (about half the timeout) would be shorter than one keepalive "
                     "period, so a slow but healthy link can depose the master; use 0 "
                     "(3 x keepalive) or at least %g"
                     % (options.failover_timeout, options.keepalive, 2 * options.keepalive))
    return found
