#!/usr/bin/env python3
"""An SMTP sink for the end-to-end suite: Dovecot's submission service relays here.

Each message is stored byte for byte (dot-stuffing undone, nothing else touched) as
DIR/NNNNNN.eml, and one JSON line is appended to DIR/index.jsonl with its envelope, size,
SHA-256 and the value of its X-E2E-Id header, so the scenarios can find the message they
sent without reading every file. A message file is complete before its index line exists.
"""

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
from pathlib import Path

MAX_LINE = 1 << 20
E2E_ID = re.compile(rb"^X-E2E-Id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
PATH = re.compile(r"(?:FROM|TO):\s*<([^>]*)>", re.IGNORECASE)


def address(arg: str) -> str:
    """The address in `FROM:<a@b> SIZE=..` or `TO:<a@b>`, without its parameters."""
    match = PATH.match(arg)
    return match.group(1) if match else arg


class Store:
    def __init__(self, directory: Path):
        self.directory = directory
        self.count = 0
        self.index = open(directory / "index.jsonl", "a", buffering=1)

    def save(self, mail_from: str, rcpt_to: list[str], data: bytes) -> int:
        self.count += 1
        name = f"{self.count:06d}.eml"
        tmp = self.directory / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)
        header_end = data.find(b"\r\n\r\n")
        match = E2E_ID.search(data[: header_end if header_end >= 0 else len(data)])
        entry = {"file": name, "mail_from": mail_from, "rcpt_to": rcpt_to, "size": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(),
                 "e2e_id": match.group(1).decode() if match else None}
        self.index.write(json.dumps(entry) + "\n")
        return self.count


async def read_data(reader: asyncio.StreamReader) -> bytes:
    """Reads a DATA body up to the lone dot, undoing dot-stuffing (RFC 5321 4.5.2)."""
    lines = []
    while True:
        line = await reader.readuntil(b"\n")
        if line == b".\r\n":
            return b"".join(lines)
        lines.append(line[1:] if line.startswith(b".") else line)


async def session(store: Store, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    def reply(text: str) -> None:
        writer.write(text.encode() + b"\r\n")

    reply("220 sink.example.test ESMTP e2e sink")
    mail_from, rcpt_to = None, []
    try:
        while line := await reader.readuntil(b"\n"):
            verb, _, arg = line.decode("utf-8", "replace").strip().partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                reply("250-sink.example.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                      "250-ENHANCEDSTATUSCODES\r\n250 SIZE 104857600")
            elif verb == "HELO":
                reply("250 sink.example.test")
            elif verb == "MAIL":
                mail_from, rcpt_to = address(arg), []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpt_to.append(address(arg))
                reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpt_to:
                    reply("503 5.5.1 MAIL and RCPT first")
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                await writer.drain()
                number = store.save(mail_from, rcpt_to, await read_data(reader))
                mail_from, rcpt_to = None, []
                reply(f"250 2.0.0 Ok: queued as {number}")
            elif verb == "RSET":
                mail_from, rcpt_to = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                break
            else:
                reply("502 5.5.2 Command not implemented")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client hung up; whatever it sent completely is stored
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="where messages and index.jsonl go")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    store = Store(args.dir)
    server = await asyncio.start_server(lambda r, w: session(store, r, w), "127.0.0.1", args.port, limit=MAX_LINE)
    sys.stderr.write(f"smtp-sink listening on 127.0.0.1:{args.port}, storing in {args.dir}\n")
    sys.stderr.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
