"""What decoding a hostile header holds at its peak is within what the budget charged for it
(protocol.json_cost + metapack.split_copy), for every shape of header_shapes.py, on this
interpreter: measured by tracemalloc on 3.x, by a preloaded allocation counter on 2.7
(header_shapes.SHIM; no tracemalloc there). The internal daemon's socket likewise
(localsock.decode against the json_cost its MAX_REQUEST_COST is checked with).

Before (review of the twelfth round, and this file's first run): a long string peaked at
2 times its charge on 3.x (the decoded text was not counted), one of "ab\\n" repeated at 6.3
times on 3.6-3.8 (a string with escapes built from a list of pieces) and 4 times on 2.7,
nested lists at 1.4-1.8 times, dicts at 2.5 times on 3.6-3.7 and 2.7.
"""
from __future__ import absolute_import, division, print_function

import sys

import pytest

import header_shapes
from wazuh_cluster import compat, localsock, protocol
from wazuh_cluster.errors import ProtocolError

# Big enough that every cost per byte shows (a header's fixed part is protocol._BASE), and
# past the 21 846 keys at which 2.7 grows a dict's table fourfold (its dearest keys)
SIZE = 180000
SHAPES = sorted(header_shapes.SHAPES)
traced = pytest.mark.skipif(compat.PY2, reason="no tracemalloc on 2.7: see the counter test")


@traced
@pytest.mark.parametrize("name", SHAPES)
def test_a_hostile_header_peaks_within_its_charge(name):
    peak, charge = header_shapes.traced_peak(header_shapes.SHAPES[name](SIZE))
    assert peak <= charge, (name, peak, charge, peak / charge)


@traced
@pytest.mark.parametrize("name", SHAPES)
def test_a_local_message_peaks_within_its_json_cost(name):
    peak, charge = header_shapes.traced_peak(header_shapes.SHAPES[name](SIZE),
                                             header_shapes.decode_local)
    assert peak <= charge, (name, peak, charge, peak / charge)


@pytest.fixture(scope="module")
def shim(tmpdir_factory):
    library = header_shapes.build_shim(str(tmpdir_factory.mktemp("shim")))
    if library is None:
        pytest.skip("no C compiler (cc) to build the allocation counter")
    return library


@pytest.mark.skipif(not compat.PY2, reason="3.x: tracemalloc (the tests above)")
@pytest.mark.parametrize("local", [False, True], ids=["header", "localsock"])
def test_every_hostile_header_peaks_within_its_charge_counted_by_malloc(shim, local):
    # each shape in a child process of its own, with every allocation counted (pymalloc
    # taken over: the counter is malloc's, not pages, which reuse could hide)
    peaks = header_shapes.shim_peaks(sys.executable, shim, SHAPES, SIZE, local)
    refused = [name for name, (_peak, charge) in peaks.items() if not isinstance(charge, int)]
    assert not refused, [(name, peaks[name]) for name in refused]
    over = [(name, peak, charge) for name, (peak, charge) in sorted(peaks.items())
            if peak > charge]
    assert not over


@traced
def test_the_counter_sees_what_tracemalloc_sees(shim):
    # the 2.7 test's method, checked against tracemalloc where both exist: with pymalloc
    # off (PYTHONMALLOC=malloc: the counter takes malloc, 3.x's PyObject_Malloc is not
    # taken), it counts what tracemalloc does (within a page), at malloc's rounding at most
    names = ["string", "ab-newline", "keys", "nested", "honest-packed"]
    counted = header_shapes.shim_peaks(sys.executable, shim, names, SIZE,
                                       env={"PYTHONMALLOC": "malloc"})
    for name in names:
        peak = header_shapes.traced_peak(header_shapes.SHAPES[name](SIZE))[0]
        assert peak - 4096 <= counted[name][0] <= 1.5 * peak + 4096, (name, peak, counted[name])


@pytest.mark.parametrize("name", SHAPES)
def test_no_text_costs_more_than_its_length_tells(name):
    text = header_shapes.SHAPES[name](SIZE)
    assert protocol.json_cost(text) <= protocol.json_cost_at_most(len(text))


def test_a_number_of_thousands_of_digits_is_refused_at_once():
    # 2.7 and 3.6 made an int of any length in quadratic time, holding the GIL: 0.9 s for
    # 400 000 digits, some 25 minutes for a header's 16 MiB; 3.7.14+ refuse it themselves
    raw = b'{"x":[' + b"9" * 400000 + b"]}"
    with pytest.raises(ProtocolError) as info:
        protocol.decode_costed(header_shapes.body_of(raw))
    assert "a number of more than %d digits" % compat.MAX_INT_DIGITS in info.value.message
    with pytest.raises(ProtocolError) as info:
        localsock.decode(raw)
    assert "digits" in info.value.message
    digits = int("9" * compat.MAX_INT_DIGITS)
    assert protocol.decode_body(protocol.encode_body({"x": digits}))[0] == {"x": digits}


def test_the_internal_daemon_refuses_a_request_dearer_than_its_bound_before_parsing_it():
    hostile = b'{"x":[' + b"{}," * (localsock.MAX_MESSAGE // 3 - 10) + b"{}]}"
    assert len(hostile) <= localsock.MAX_MESSAGE
    with pytest.raises(ProtocolError) as info:
        localsock.decode(hostile, localsock.MAX_REQUEST_COST)
    assert "would take about" in info.value.message
    # an honest request of the largest size: file entries as objects, the dearest form
    entries = []
    while len(localsock.encode({"files": entries})) < localsock.MAX_MESSAGE - 200:
        i = len(entries)
        entries.append({"name": u"queue/agent-info/agent%06d-any" % i, "sha256": "%064x" % i,
                        "mtime_ns": 1733000000000000000 + i, "size": 500 + i % 100})
    honest = localsock.encode({"id": 1, "cmd": "x", "args": {"files": entries}})[4:]
    assert localsock.decode(honest, localsock.MAX_REQUEST_COST)["args"]["files"] == entries
