"""A small OpenTimestamps calendar and a fake bitcoind on 127.0.0.1, so the real `ots` client can stamp, upgrade
and verify with no network.

Calendar protocol (as opentimestamps.calendar.RemoteCalendar speaks it):
  POST /digest                 body: the digest; answers a Timestamp (serialized) from that digest through
                               append(nonce), sha256 to a commitment carrying PendingAttestation(<calendar url>)
  GET  /timestamp/<hex>        the commitment's upgraded Timestamp once `mine()` has put it in a block; 404
                               "Pending confirmation in Bitcoin blockchain" before, 404 "Not found" when unknown
`mine()` builds a merkle tree over the pending commitments (opentimestamps' make_merkle_tree), wraps the tip in a
made-up one-transaction block (tx = prefix || tip || suffix, txid = sha256d(tx) = the block's merkle root) and
attaches BitcoinBlockHeaderAttestation(height) there. The fake bitcoind serves that block's header over JSON-RPC
(getblockcount, getblockhash, getblockheader) behind HTTP basic auth.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

from bitcoin.core import CBlockHeader, b2lx, lx
from opentimestamps.core.notary import BitcoinBlockHeaderAttestation, PendingAttestation
from opentimestamps.core.op import OpAppend, OpPrepend, OpSHA256
from opentimestamps.core.serialize import BytesSerializationContext
from opentimestamps.core.timestamp import Timestamp, make_merkle_tree

FIRST_HEIGHT = 900_000  # made-up chain: heights start here


def serialize(ts: Timestamp) -> bytes:
    ctx = BytesSerializationContext()
    ts.serialize(ctx)
    return ctx.getbytes()


class Chain:
    """The made-up block headers the fake bitcoind serves."""

    def __init__(self):
        self.headers: list[CBlockHeader] = []
        self.lock = threading.Lock()

    def add(self, merkle_root: bytes) -> int:
        with self.lock:
            prev = self.headers[-1].GetHash() if self.headers else b"\0" * 32
            self.headers.append(CBlockHeader(nVersion=0x20000000, hashPrevBlock=prev, hashMerkleRoot=merkle_root,
                                             nTime=int(time.time()), nBits=0x1D00FFFF, nNonce=len(self.headers)))
            return FIRST_HEIGHT + len(self.headers) - 1

    def by_height(self, height: int):
        i = height - FIRST_HEIGHT
        return self.headers[i] if 0 <= i < len(self.headers) else None

    def by_hash(self, block_hash: bytes):
        return next((h for h in self.headers if h.GetHash() == block_hash), None)


class _Server:
    """One ThreadingHTTPServer on an ephemeral port, served from a daemon thread."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def reply(self, code: int, body: bytes, ctype="application/octet-stream"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class CalendarHandler(_Handler):
    def do_POST(self):
        cal = self.server.owner
        if cal.hang:
            return cal.release.wait(cal.hang_max_s)
        if self.path.rstrip("/") != "/digest":
            return self.reply(404, b"Not found")
        n = int(self.headers.get("Content-Length", 0))
        if not 1 <= n <= 64:
            return self.reply(400, b"digest too long")
        self.reply(200, serialize(cal.submit(self.rfile.read(n))))

    def do_GET(self):
        cal = self.server.owner
        if cal.hang:
            return cal.release.wait(cal.hang_max_s)
        if not self.path.startswith("/timestamp/"):
            return self.reply(404, b"Not found")
        try:
            commitment = bytes.fromhex(self.path[len("/timestamp/"):])
        except ValueError:
            return self.reply(400, b"bad commitment")
        code, body = cal.lookup(commitment)
        self.reply(code, body)


class Calendar(_Server):
    """hang=True: accepts connections and never answers until stopped (a calendar that times out)."""

    def __init__(self, chain: Chain, hang: bool = False, hang_max_s: float = 60):
        self.hang, self.hang_max_s, self.release = hang, hang_max_s, threading.Event()
        super().__init__(CalendarHandler)
        self.url = f"http://127.0.0.1:{self.port}"
        self.chain = chain
        self.pending: list[bytes] = []
        self.upgraded: dict[bytes, Timestamp] = {}
        self.lock = threading.Lock()
        self.submissions = 0

    def submit(self, digest: bytes) -> Timestamp:
        ts = Timestamp(digest)
        commit = ts.ops.add(OpAppend(os.urandom(16))).ops.add(OpSHA256())
        commit.attestations.add(PendingAttestation(self.url))
        with self.lock:
            self.pending.append(commit.msg)
            self.submissions += 1
        return ts

    def lookup(self, commitment: bytes) -> tuple[int, bytes]:
        with self.lock:
            if commitment in self.upgraded:
                return 200, serialize(self.upgraded[commitment])
            if commitment in self.pending:
                return 404, b"Pending confirmation in Bitcoin blockchain"
        return 404, b"Not found"

    def mine(self) -> int | None:
        """Put every pending commitment into a new made-up block; returns its height."""
        with self.lock:
            todo, self.pending = self.pending, []
        if not todo:
            return None
        leaves = [Timestamp(c) for c in todo]
        tip = make_merkle_tree(leaves)
        # a one-transaction block: the tip sits inside the coinbase-like tx, whose txid is the merkle root
        tx = tip.ops.add(OpPrepend(bytes.fromhex("01000000010000"))).ops.add(OpAppend(bytes.fromhex("ffffffff00")))
        root = tx.ops.add(OpSHA256()).ops.add(OpSHA256())
        height = self.chain.add(root.msg)
        root.attestations.add(BitcoinBlockHeaderAttestation(height))
        with self.lock:
            for c, leaf in zip(todo, leaves):
                self.upgraded[c] = leaf
        return height

    def stop(self):
        self.release.set()
        super().stop()


class BitcoindHandler(_Handler):
    def do_POST(self):
        node = self.server.owner
        expected = "Basic " + base64.b64encode(f"{node.user}:{node.password}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self.reply(401, b"", "text/plain")
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        result, error = node.call(req.get("method"), req.get("params") or [])
        body = json.dumps({"result": result, "error": error, "id": req.get("id")}).encode()
        self.reply(200, body, "application/json")


class FakeBitcoind(_Server):
    def __init__(self, chain: Chain, user="moebench", password="fixture-secret"):
        super().__init__(BitcoindHandler)
        self.chain, self.user, self.password = chain, user, password
        self.url = f"http://{user}:{password}@127.0.0.1:{self.port}/"

    def call(self, method, params):
        c = self.chain
        if method == "getblockcount":
            return FIRST_HEIGHT + len(c.headers) - 1, None
        if method == "getblockhash":
            h = c.by_height(int(params[0]))
            return (b2lx(h.GetHash()), None) if h else (None, {"code": -8, "message": "Block height out of range"})
        if method == "getblockheader":
            h = c.by_hash(lx(params[0]))
            if h is None:
                return None, {"code": -5, "message": "Block not found"}
            return h.serialize().hex(), None
        return None, {"code": -32601, "message": "Method not found"}


class Fixture:
    """Calendar + bitcoind sharing one made-up chain; use as a context manager so both always stop."""

    def __init__(self):
        self.chain = Chain()
        self.calendar = Calendar(self.chain)
        self.bitcoind = FakeBitcoind(self.chain)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.calendar.stop()
        self.bitcoind.stop()


class Served:
    """A Fixture in a process of its own (`python servers.py --serve`), for a test run beside others in a
    background thread: its servers answer at once, where threads of the test process would wait for the GIL the
    running test holds (against the client's timeout of a few seconds). The same names as Fixture: calendar.url,
    calendar.mine(), bitcoind.url; stop() (or the with block's end) ends the process."""

    def __init__(self, timeout: float = 30):
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        urls = self._reply()
        self.calendar = SimpleNamespace(url=urls["calendar"], mine=self.mine)
        self.bitcoind = SimpleNamespace(url=urls["bitcoind"])

    def _reply(self):
        line = self.proc.stdout.readline()  # the servers answer in milliseconds; an empty line: the process died
        if not line:
            raise RuntimeError(f"the fixture's servers (pid {self.proc.pid}) exited: {self.proc.wait(self.timeout)}")
        return json.loads(line)

    def mine(self) -> int | None:
        self.proc.stdin.write("mine\n")
        self.proc.stdin.flush()
        return self._reply()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        try:
            self.proc.stdin.close()  # end of input: the servers stop
            self.proc.wait(timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def serve() -> None:
    """Served's other end: prints the servers' URLs as one JSON line, then answers each "mine" line on stdin with
    the new block's height (JSON); stops at the end of stdin."""
    with Fixture() as fx:
        print(json.dumps({"calendar": fx.calendar.url, "bitcoind": fx.bitcoind.url}), flush=True)
        for line in sys.stdin:
            if line.strip() == "mine":
                print(json.dumps(fx.calendar.mine()), flush=True)


if __name__ == "__main__":  # run by hand: python tests/ots_fixture/servers.py (Served runs it with --serve)
    if sys.argv[1:] == ["--serve"]:
        serve()
        sys.exit()
    with Fixture() as fx:
        print(f"calendar {fx.calendar.url}\nbitcoind {fx.bitcoind.url}\nEnter mines a block, Ctrl-D stops.")
        try:
            while input() is not None:
                print("mined block", fx.calendar.mine())
        except (EOFError, KeyboardInterrupt):
            pass
