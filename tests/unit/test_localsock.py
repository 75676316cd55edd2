"""localsock: replies that announce raw bytes, and the Client reading them."""
from __future__ import absolute_import, division, print_function

import socket
import threading

import pytest

from wazuh_cluster import localsock
from wazuh_cluster.errors import ProtocolError, RequestError


def read_request(server_sock):
    """(connection, the first request) read from `server_sock`, left blocking."""
    conn = localsock.Connection(server_sock)
    messages = []
    while not messages:
        server_sock.setblocking(True)
        messages = conn.read_messages()
    server_sock.setblocking(True)
    return conn, localsock.decode(messages[0])


def serve_once(server_sock, reply, data=None):
    """Answer one request on `server_sock` with `reply` (its id copied) and raw `data`."""
    conn, request = read_request(server_sock)
    reply = dict(reply, id=request["id"])
    if data is not None:
        reply["data"] = len(data)
    conn.send(reply, data)


def client_pair():
    ours, theirs = socket.socketpair()
    client = localsock.Client("unused")
    ours.settimeout(10)
    client.sock = ours
    return client, theirs


@pytest.mark.parametrize("data", [b"", b"{}", b'{"a":{"sha256":"00"}}' * 1000,
                                  b"x" * (3 << 20)])
def test_a_reply_with_data_brings_its_raw_bytes(data):
    client, server = client_pair()
    worker = threading.Thread(target=serve_once, args=(server, {"ok": True,
                                                               "result": {"count": 1}}, data))
    worker.start()
    try:
        assert client.call_data("manifest", {"as_data": True}) == ({"count": 1}, data)
    finally:
        worker.join()
        client.close()
        server.close()


def test_a_reply_without_data_has_none_and_call_gives_the_result():
    client, server = client_pair()
    worker = threading.Thread(target=serve_once, args=(server, {"ok": True, "result": 5}))
    worker.start()
    try:
        assert client.call_data("status") == (5, None)
    finally:
        worker.join()
    worker = threading.Thread(target=serve_once, args=(server, {"ok": True, "result": 6}))
    worker.start()
    try:
        assert client.call("status") == 6
    finally:
        worker.join()
        client.close()
        server.close()


def test_a_raw_frame_of_another_length_than_announced_is_a_protocol_error():
    client, server = client_pair()

    def lying():
        _, request = read_request(server)
        server.sendall(localsock.encode({"id": request["id"], "ok": True, "result": 1,
                                         "data": 10}) + localsock.HEADER.pack(3) + b"abc")
    worker = threading.Thread(target=lying)
    worker.start()
    try:
        with pytest.raises(ProtocolError):
            client.call_data("manifest")
    finally:
        worker.join()
        client.close()
        server.close()


def test_an_error_reply_raises_request_error():
    client, server = client_pair()
    worker = threading.Thread(target=serve_once, args=(server, localsock.error_reply(
        None, "bad_request", "no")))
    worker.start()
    try:
        with pytest.raises(RequestError) as info:
            client.call_data("manifest")
        assert info.value.code == "bad_request"
    finally:
        worker.join()
        client.close()
        server.close()
