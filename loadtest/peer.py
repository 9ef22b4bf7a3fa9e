"""The benchmark's peer (docs/BENCHMARKS.md): the bundle's ``model.onnx`` served by BentoML
1.4 (the ``peers`` extra: ``pip install -e '.[peers]'``), one worker, with the onnxruntime
session options the service uses (``ScorerOptions()``), timed with ``wrk`` in the same run
as ``POST /rank``.

The peer only scores a ready feed: each request carries the model inputs our service
builds for one ``/rank`` request at N=500 (``feeds``: exactly what ``OnnxScorer.score``
hands onnxruntime) and gets the N probabilities back. It offers the feed in several
transports, one BentoML API each (``TRANSPORTS``), and the benchmark races them and
keeps the fastest:

- ``raw``: the body is the arrays' raw bytes behind a small JSON header (``encode_raw``;
  ``decode_raw`` views them with ``np.frombuffer``, no copy), taken by a positional-only
  ``bytes`` parameter (BentoML's root input: the body as it came) of a plain ``def`` API,
  which BentoML runs in its API thread (``threads=1``, its default); the answer is the
  float32 scores' bytes.
- ``raw_async``: the same from an ``async def`` API, run on the event loop (no thread hop),
  as our service runs inference.
- ``npz``: the same API shape, the body an uncompressed ``np.savez`` archive.
- ``multipart``: the raw body as a file part of a ``multipart/form-data`` request, BentoML's
  file input (a ``Path`` parameter: it spools the part to a temporary file).
- ``json``: BentoML's numpy tensor IO, one ``np.ndarray`` parameter per model input with
  its dtype (``DType``), JSON nested lists in, a JSON list out.

BentoML's own binary transport (pickle, ``application/vnd.bentoml+pickle``) is refused by
a service's entry server, so it is not among them.

``PeerServer`` writes the service module (``service_source``) and ``peer.lua`` (wrk's
script: the bodies of files, read whole, round robin) into a work directory and runs
``bentoml serve`` there as a ``ServiceProcess``; ``request_files`` writes a transport's
bodies for ``run_wrk(..., script=PeerServer.lua)``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.core.bundle import Bundle
    from loadtest.processes import ServiceProcess

Feed = dict[str, np.ndarray]
MAGIC = b"UPF1"  # raw feed: MAGIC, uint32 header length, JSON header, 8-byte aligned buffers
ALIGN = 8
SERVICE_MODULE, SERVICE_CLASS = "unicorn_peer_service", "UnicornPeer"
OCTETS = "application/octet-stream"
BOUNDARY = "unicornpeerboundary7f3a"


@dataclass(frozen=True)
class Transport:
    route: str
    content_type: str
    about: str  # for the report


TRANSPORTS: dict[str, Transport] = {
    "raw": Transport(
        "/score_raw", OCTETS, "raw array bytes + JSON header, bytes root input, def API"
    ),
    "raw_async": Transport(
        "/score_raw_async", OCTETS, "the same, an async def API (on the event loop)"
    ),
    "npz": Transport("/score_npz", OCTETS, "uncompressed np.savez archive, bytes root input"),
    "multipart": Transport(
        "/score_file",
        f"multipart/form-data; boundary={BOUNDARY}",
        "raw bytes as a multipart file part (BentoML file input: a Path)",
    ),
    "json": Transport("/score_json", "application/json", "BentoML numpy IO: JSON nested lists"),
}


# --- the feed and its encodings ---------------------------------------------------------------
def feeds(bundle: Bundle, bodies: Sequence[dict[str, Any]], n_candidates: int) -> list[Feed]:
    """The onnxruntime feed of each ``/rank`` body: what our scorer hands
    ``InferenceSession.run`` for it at ``n_candidates`` (``OnnxScorer.score``'s dict)."""
    from loadtest.inprocess_timing import feeds_for

    return feeds_for(bundle, bodies, n_candidates)


def _pad(n: int) -> int:
    return -n % ALIGN


def encode_raw(feed: Feed) -> bytes:
    """``feed`` as one buffer: ``MAGIC``, the header length (uint32 LE), a JSON header of
    ``[name, dtype, shape]`` per array, then each array's C-order bytes, all 8-aligned."""
    header = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in feed.items()]).encode()
    header += b" " * _pad(len(MAGIC) + 4 + len(header))
    parts = [MAGIC, struct.pack("<I", len(header)), header]
    for array in feed.values():
        data = np.ascontiguousarray(array).tobytes()
        parts += [data, b"\0" * _pad(len(data))]
    return b"".join(parts)


def decode_raw(body: bytes) -> Feed:
    """The arrays of an ``encode_raw`` buffer, as read-only views of it (no copy)."""
    if body[: len(MAGIC)] != MAGIC:
        raise ValueError("not a raw feed (bad magic)")
    (length,) = struct.unpack_from("<I", body, len(MAGIC))
    offset = len(MAGIC) + 4
    header = json.loads(body[offset : offset + length])
    offset += length
    out: Feed = {}
    for name, dtype, shape in header:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(body, dt, count, offset).reshape(shape)
        offset += count * dt.itemsize + _pad(count * dt.itemsize)
    if offset != len(body):
        raise ValueError(f"raw feed: {len(body) - offset} trailing bytes")
    return out


def encode_npz(feed: Feed) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **feed)  # type: ignore[arg-type]
    return buffer.getvalue()


def decode_npz(body: bytes) -> Feed:
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def encode_multipart(feed: Feed) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="feed"; filename="feed.bin"\r\n'
        f"Content-Type: {OCTETS}\r\n\r\n"
    ).encode()
    return head + encode_raw(feed) + f"\r\n--{BOUNDARY}--\r\n".encode()


def encode_json(feed: Feed) -> bytes:
    return json.dumps({k: v.tolist() for k, v in feed.items()}, separators=(",", ":")).encode()


ENCODERS = {
    "raw": encode_raw, "raw_async": encode_raw, "npz": encode_npz,
    "multipart": encode_multipart, "json": encode_json,
}  # fmt: skip


def decode_scores(transport: str, body: bytes) -> np.ndarray:
    """The scores of a peer answer in ``transport``."""
    if transport == "json":
        return np.asarray(json.loads(body), dtype=np.float32)
    return np.frombuffer(body, dtype=np.float32)


# --- the BentoML service ------------------------------------------------------------------------
SERVICE_TEMPLATE = '''\
"""The benchmark's BentoML peer, written by loadtest/peer.py (do not edit): the bundle's
model.onnx ($UNICORN_PEER_MODEL) with the service's onnxruntime session options."""

import os
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
import onnxruntime as ort
from bentoml.validators import ContentType, DType

from app.core.scoring import OUTPUT_NAME, ScorerOptions
from loadtest.peer import decode_npz, decode_raw

Octets = Annotated[bytes, ContentType("application/octet-stream")]


@bentoml.service(workers=1, threads=1)
class {cls}:
    def __init__(self) -> None:
        self.session = ort.InferenceSession(
            os.environ["UNICORN_PEER_MODEL"], sess_options=ScorerOptions().session_options(),
            providers=["CPUExecutionProvider"],
        )
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        (p,) = self.session.run([OUTPUT_NAME], {{n: feed[n] for n in self.names}})
        return np.asarray(p, dtype=np.float32).reshape(-1)

    @bentoml.api
    def score_raw(self, feed: bytes, /) -> Octets:
        return self.run(decode_raw(feed)).tobytes()

    @bentoml.api
    async def score_raw_async(self, feed: bytes, /) -> Octets:
        return self.run(decode_raw(feed)).tobytes()

    @bentoml.api
    def score_npz(self, feed: bytes, /) -> Octets:
        return self.run(decode_npz(feed)).tobytes()

    @bentoml.api
    def score_file(self, feed: Annotated[Path, ContentType("application/octet-stream")]) -> Octets:
        return self.run(decode_raw(feed.read_bytes())).tobytes()

    @bentoml.api
    def score_json(self, {params}) -> np.ndarray:
        return self.run({{{mapping}}})
'''


def service_source(feed: Feed) -> str:
    """The BentoML service module; the JSON API has one typed parameter per input of
    ``feed`` (a sample feed: names and dtypes)."""
    params = ", ".join(
        f'{k}: Annotated[np.ndarray, DType("{v.dtype.name}")]' for k, v in feed.items()
    )
    mapping = ", ".join(f'"{k}": {k}' for k in feed)
    return SERVICE_TEMPLATE.format(cls=SERVICE_CLASS, params=params, mapping=mapping)


# wrk: POSTs the bodies of the files a manifest lists (line 1: the Content-Type), round robin
# from position OFFSET; loadtest/rank.lua's request() and done() (its one JSON summary line).
LUA_TEMPLATE = """\
dofile("{rank_lua}")

function init(args)
  local manifest = assert(io.open(args[1], "r"))
  local headers = {{ ["Content-Type"] = manifest:read("*l") }}
  requests = {{}}
  for path in manifest:lines() do
    if #path > 0 then
      local file = assert(io.open(path, "rb"))
      requests[#requests + 1] = wrk.format("POST", nil, headers, file:read("*a"))
      file:close()
    end
  end
  manifest:close()
  assert(#requests > 0, "no request bodies in " .. args[1])
  position = tonumber(args[2] or "0")
end
"""


def bentoml_version() -> str | None:
    """BentoML's version, or None when it is not installed (the ``peers`` extra)."""
    from importlib import metadata

    try:
        return metadata.version("bentoml")
    except metadata.PackageNotFoundError:
        return None


class PeerServer:
    """``bentoml serve`` of the peer service on ``model`` in ``workdir``, on a free port."""

    def __init__(self, model: Path, sample: Feed, workdir: Path) -> None:
        from loadtest.processes import ServiceProcess

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / f"{SERVICE_MODULE}.py").write_text(service_source(sample))
        self.lua = workdir / "peer.lua"
        rank_lua = Path(__file__).with_name("rank.lua")
        self.lua.write_text(LUA_TEMPLATE.format(rank_lua=rank_lua))
        root = str(Path(__file__).resolve().parents[1])
        env = {
            "UNICORN_PEER_MODEL": str(Path(model).resolve()),
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(":"),
            "BENTOML_HOME": str(workdir / "bentoml-home"),
            "BENTOML_DO_NOT_TRACK": "True",
        }
        self.process: ServiceProcess = ServiceProcess(
            {}, log_path=workdir / "bentoml.log", module="bentoml", env=env
        )
        self.process.command = [
            sys.executable, "-m", "bentoml", "serve", f"{SERVICE_MODULE}:{SERVICE_CLASS}",
            "--working-dir", str(workdir), "--host", "127.0.0.1",
            "--port", str(self.process.port),
        ]  # fmt: skip
        self.url = self.process.url

    def start(self) -> PeerServer:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def score(self, transport: str, feed: Feed) -> np.ndarray:
        """One scored request in ``transport`` (httpx)."""
        t = TRANSPORTS[transport]
        response = self.process.post(
            t.route, content=ENCODERS[transport](feed), headers={"Content-Type": t.content_type}
        )
        response.raise_for_status()
        return decode_scores(transport, response.content)

    def request_files(self, transport: str, feeds: Sequence[Feed], name: str) -> Path:
        """The wrk manifest of ``feeds`` encoded in ``transport`` (one body file each)."""
        folder = self.workdir / f"{name}-{transport}"
        folder.mkdir(exist_ok=True)
        paths = []
        for i, feed in enumerate(feeds):
            paths.append(folder / f"{i}.body")
            paths[-1].write_bytes(ENCODERS[transport](feed))
        manifest = folder / "manifest.txt"
        lines = [TRANSPORTS[transport].content_type, *map(str, paths)]
        manifest.write_text("\n".join(lines) + "\n")
        return manifest
