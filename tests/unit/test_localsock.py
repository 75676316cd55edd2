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


# -- streamed answers (Chunked) ----------------------------------------------------------------

def serve_frames(server_sock, frames):
    """Answer one request with {"ok", "chunks": true} and then `frames` as they are."""
    _, request = read_request(server_sock)
    server_sock.sendall(localsock.encode({"id": request["id"], "ok": True, "result": {"n": 1},
                                          "chunks": True}) + b"".join(frames))
    server_sock.shutdown(socket.SHUT_WR)  # what was not sent never comes


def streamed(frames):
    """(the chunks the client read, the exception that ended the reading or None)."""
    client, server = client_pair()
    worker = threading.Thread(target=serve_frames, args=(server, frames))
    worker.start()
    got = []
    try:
        result, chunks = client.call_chunks("agents")
        assert result == {"n": 1}
        try:
            for chunk in chunks:
                got.append(chunk)
        except (ProtocolError, RequestError) as err:
            assert client.sock is None  # a broken stream is never read on
            return got, err
        return got, None
    finally:
        worker.join()
        server.close()
        client.close()


def test_a_streamed_answer_brings_its_chunks_in_order():
    # The server side as the internal daemon sends them (Connection.send_chunk).
    chunks = [b"%d" % i * (i + 1) for i in range(300)] + [b"x" * localsock.MAX_CHUNK]
    client, server = client_pair()

    def serve():
        conn, request = read_request(server)
        conn.send({"id": request["id"], "ok": True, "result": 7, "chunks": True})
        for chunk in chunks:
            conn.send_chunk(chunk)
        conn.send_chunk(b"")
        while conn.outbuf:
            conn.flush()
    worker = threading.Thread(target=serve)
    worker.start()
    try:
        result, got = client.call_chunks("agents")
        assert (result, list(got)) == (7, chunks)
        assert client.sock is not None  # in step: the next call works
    finally:
        worker.join()
        client.close()
        server.close()


def test_a_chunk_longer_than_max_chunk_is_refused_unread():
    frames = [localsock.chunk_frame(b"ok"), localsock.HEADER.pack(localsock.MAX_CHUNK + 1),
              b"y" * 1000]
    got, err = streamed(frames)
    assert got == [b"ok"]
    assert isinstance(err, ProtocolError) and "chunk of" in str(err)


@pytest.mark.parametrize("frames", [
    [localsock.chunk_frame(b"ok")],                                 # no end frame
    [localsock.chunk_frame(b"ok"), localsock.HEADER.pack(10) + b"abc"],  # a chunk cut short
    [localsock.chunk_frame(b"ok"), b"\0\0"],                        # a header cut short
])
def test_a_stream_cut_short_is_a_lost_connection(frames):
    got, err = streamed(frames)
    assert got == [b"ok"]
    assert isinstance(err, RequestError) and err.code == "unreachable"


def test_no_chunk_frame_for_nothing_or_too_much():
    for chunk in (b"", b"z" * (localsock.MAX_CHUNK + 1)):
        with pytest.raises(ProtocolError):
            localsock.chunk_frame(chunk)


def test_call_data_refuses_a_streamed_answer():
    client, server = client_pair()
    worker = threading.Thread(target=serve_frames, args=(server, [localsock.END_OF_CHUNKS]))
    worker.start()
    try:
        with pytest.raises(ProtocolError):
            client.call_data("manifest")
        assert client.sock is None
    finally:
        worker.join()
        server.close()


def test_a_message_nested_too_deep_is_a_protocol_error():
    # json.loads raised RuntimeError (2.7) or RecursionError (3.x) out of the internal
    # daemon's loop (InternalLoop.answer catches ProtocolError): 200 KB from any client of
    # its socket stopped it
    with pytest.raises(ProtocolError) as info:
        localsock.decode(b"[" * 100000 + b"]" * 100000)
    assert "nested too deep" in str(info.value)
