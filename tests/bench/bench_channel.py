"""Channel throughput for 1 MiB payloads vs raw AES-256-GCM of the same interpreter (SPEC s.8).

Run by hand: PYTHONPATH=lib python tests/bench/bench_channel.py [--mib N] [--rounds R]
Prints the raw AES-GCM encrypt+decrypt rate, the SecureChannel rate over loopback TCP (one
thread sealing and sending, one receiving and opening), and their ratio (goal >= 0.5).
Best of R rounds for each figure, measured in the same run.
"""
from __future__ import absolute_import, division, print_function

import argparse
import os
import socket
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "lib"))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from wazuh_cluster import channel, compat  # noqa: E402

MIB = 1024 * 1024
KEY = "BenchKeyBenchKeyBenchKeyBenchKey"


def raw_aesgcm(payload, count):
    """Seconds to encrypt then decrypt `payload` `count` times (fresh nonce each, 4-byte aad)."""
    aead = AESGCM(os.urandom(32))
    aad = b"\x00\x10\x00\x16"
    start = compat.monotonic()
    for i in range(count):
        nonce = b"\x00\x00\x00\x00" + i.to_bytes(8, "big") if hasattr(i, "to_bytes") \
            else b"\x00\x00\x00\x00" + ("%016x" % i).decode("hex")
        aead.decrypt(nonce, aead.encrypt(nonce, payload, aad), aad)
    return compat.monotonic() - start


def channel_pair():
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    c = socket.create_connection(lsock.getsockname(), timeout=10)
    s, _ = lsock.accept()
    lsock.close()
    out = {}

    def server():
        out["s"] = channel.server_handshake(s, KEY, "master01", "bench", "master", 10, 2 * MIB,
                                            channel.NonceBook())
    t = threading.Thread(target=server)
    t.start()
    hc = channel.client_handshake(c, KEY, "client01", "bench", "client", 10, 2 * MIB,
                                  channel.NonceBook())
    t.join()
    hs = out["s"]
    return (channel.SecureChannel(c, hc.codec, "master01", "master", 30.0),
            channel.SecureChannel(s, hs.codec, "client01", "client", 30.0))


def over_channel(payload, count):
    """Seconds to send `count` frames of `payload` one way and receive them all."""
    sender, receiver = channel_pair()

    def send():
        for i in range(count):
            sender.send_frame(3, 0, i, payload)
    start = compat.monotonic()
    t = threading.Thread(target=send)
    t.start()
    got = 0
    while got < count:
        frame = receiver.recv_frame(30)
        if frame is None or len(frame[3]) != len(payload):
            raise RuntimeError("lost a frame")
        got += 1
    elapsed = compat.monotonic() - start
    t.join()
    sender.close()
    receiver.close()
    return elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per round (default 256)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    payload = os.urandom(MIB)
    raws, chans = [], []
    for _ in range(args.rounds):        # interleaved, so both see the same machine load
        raws.append(raw_aesgcm(payload, args.mib))
        chans.append(over_channel(payload, args.mib))
    raw, chan = min(raws), min(chans)
    raw_rate = args.mib / raw
    chan_rate = args.mib / chan
    print("python %s, %d x 1 MiB, best of %d" % (compat.VERSION, args.mib, args.rounds))
    print("raw AES-256-GCM encrypt+decrypt: %8.1f MiB/s" % raw_rate)
    print("SecureChannel over loopback:     %8.1f MiB/s" % chan_rate)
    print("ratio channel/raw:               %8.2f (goal >= 0.50)" % (chan_rate / raw_rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
