"""The Python side of a Petal client's learner: a worker process that
Petal (Rust) starts once per client process and drives over a pipe.

    python worker.py --file FILE --name NAME --mode fork|inline

At start the worker imports FILE (the learner's module, with its imports:
``torch`` and all) and answers ``hello``. Then, for every ``get_parameters``,
``fit`` and ``evaluate`` request:

- ``--mode fork`` (Petal's ``--isolation subprocess``): the worker, which
  has imported the module but never touched a device, forks a child; the
  child builds the learner, runs the call, sends the reply and exits, so
  all the memory the step took (host and GPU) is returned, and the
  interpreter start and the imports are paid once per client process, not
  once per step. Several children may run at once (one per request in
  flight); a child that raises, dies or runs past its timeout is that
  request's error.
- ``--mode inline`` (``--isolation none``): learners live in this process,
  one per partition, built on first use.

``NAME`` in FILE is called as ``NAME(partition_id=P, num_partitions=N)`` and
returns an object with the three methods of Flower's ``NumPyClient``:
``get_parameters(config)``, ``fit(parameters, config) -> (parameters,
num_examples, metrics)``, ``evaluate(parameters, config) -> (loss,
num_examples, metrics)``. Parameters go in as a list of NumPy arrays; they
may come back as a list or a dict ``name -> array`` (the names then travel
with the model), of NumPy arrays or PyTorch tensors, any dtype.

Wire format, both ways: ``u32`` header length, a JSON header, ``u64`` body
length, the body (every tensor's little-endian C-order bytes, in order;
each header tensor says its ``dtype``, ``shape`` and ``name``). The
protocol uses the process's original stdin and stdout; what the learner
prints goes to stderr (Petal's log), so it cannot corrupt a reply.

Only NumPy is required; PyTorch tensors and ``ml_dtypes`` bfloat16 arrays
are understood when those packages are there.
"""

import argparse
import base64
import importlib.util
import json
import os
import selectors
import signal
import struct
import sys
import time
import traceback

import numpy as np

# How much of a traceback goes back to Petal's log.
TRACEBACK_LINES = 12


# --- framing -------------------------------------------------------------


def read_exact(f, n):
    """Exactly n bytes from a binary file, or None at a clean end of file."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            if got == 0:
                return None
            raise EOFError("the pipe closed inside a message")
        got += k
    return buf


def read_frame(f):
    """One (header dict, body bytearray) frame, or None at end of file."""
    raw = read_exact(f, 4)
    if raw is None:
        return None
    (hlen,) = struct.unpack("<I", raw)
    header = json.loads(bytes(read_exact(f, hlen)))
    (blen,) = struct.unpack("<Q", read_exact(f, 8))
    body = read_exact(f, blen) if blen else bytearray()
    return header, body


def frame_bytes(header, chunks):
    """The bytes of a frame: header and the body's chunks, joined."""
    h = json.dumps(header, separators=(",", ":")).encode()
    blen = sum(len(c) for c in chunks)
    return b"".join([struct.pack("<I", len(h)), h, struct.pack("<Q", blen), *chunks])


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --- values --------------------------------------------------------------


def _bfloat16():
    try:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        return None


def to_numpy(meta, body, offset):
    """The array a header tensor describes, from the body at offset."""
    dtype, shape = meta["dtype"], tuple(meta["shape"])
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype == "bfloat16":
        bf16 = _bfloat16()
        bits = np.frombuffer(body, dtype="<u2", count=count, offset=offset)
        if bf16 is not None:
            return bits.view(bf16).reshape(shape).copy()
        # Without ml_dtypes, bfloat16 arrives as float32 (exact).
        return (bits.astype("<u4") << 16).view("<f4").reshape(shape)
    return np.frombuffer(body, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                         offset=offset).reshape(shape)


def from_value(value):
    """(dtype name, shape, little-endian bytes) of an array, tensor or scalar."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return "bfloat16", list(t.shape), t.view(torch.int16).numpy().tobytes()
        value = t.numpy()
    a = np.asarray(value)
    name = str(a.dtype)
    if a.dtype.kind not in "biuf" and name != "bfloat16":
        raise TypeError(f"arrays of dtype {a.dtype} cannot be sent (numbers and booleans only)")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return name, list(a.shape), np.ascontiguousarray(a).tobytes()


def pack_parameters(params):
    """Header tensors and body chunks of parameters (a list or a dict)."""
    if isinstance(params, dict):
        items = [(str(k), v) for k, v in params.items()]
    elif isinstance(params, (list, tuple)):
        items = [(None, v) for v in params]
    else:
        raise TypeError(f"parameters must be a list or a dict of arrays, got {type(params).__name__}")
    metas, chunks = [], []
    for name, v in items:
        dtype, shape, raw = from_value(v)
        metas.append({"name": name, "dtype": dtype, "shape": shape, "nbytes": len(raw)})
        chunks.append(raw)
    return metas, chunks


def unpack_parameters(metas, body):
    out, offset = [], 0
    for m in metas:
        out.append(to_numpy(m, body, offset))
        offset += m["nbytes"]
    return out


def scalar(v):
    """A JSON value for a Flower Scalar."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(v)).decode()}
    raise TypeError(f"metric values must be numbers, strings or bytes, got {type(v).__name__}")


def from_config(config):
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and "__bytes__" in v:
            v = base64.b64decode(v["__bytes__"])
        out[k] = v
    return out


def metrics_of(m):
    if m is None:
        return {}
    if not isinstance(m, dict):
        raise TypeError(f"metrics must be a dict, got {type(m).__name__}")
    return {str(k): scalar(v) for k, v in m.items()}


def tail(text):
    lines = text.rstrip().splitlines()
    return "\n".join(lines[-TRACEBACK_LINES:])


# --- learners ------------------------------------------------------------


def load_factory(path, name):
    path = os.path.abspath(path)
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location("petal_user_learner", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules["petal_user_learner"] = module
    spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if factory is None:
        raise AttributeError(f"{path} has no '{name}'")
    if not callable(factory):
        raise TypeError(f"'{name}' in {path} is not callable")
    return factory


def run_request(learner, header, body):
    """The reply (header, chunks) to one request, from the learner; its
    `learner_ms` is the time spent in the learner's method."""
    op, config = header["op"], from_config(header.get("config", {}))
    reply = {"id": header["id"], "ok": True}
    start = time.perf_counter()
    if op == "get_parameters":
        metas, chunks = pack_parameters(learner.get_parameters(config))
    elif op == "fit":
        params = unpack_parameters(header["tensors"], body)
        out = learner.fit(params, config)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError("fit must return (parameters, num_examples, metrics)")
        metas, chunks = pack_parameters(out[0])
        reply["num_examples"] = int(out[1])
        reply["metrics"] = metrics_of(out[2] if len(out) == 3 else None)
    elif op == "evaluate":
        params = unpack_parameters(header["tensors"], body)
        out = learner.evaluate(params, config)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError("evaluate must return (loss, num_examples, metrics)")
        metas, chunks = [], []
        reply["loss"] = float(out[0])
        reply["num_examples"] = int(out[1])
        reply["metrics"] = metrics_of(out[2] if len(out) == 3 else None)
    else:
        raise ValueError(f"unknown request '{op}'")
    reply["tensors"] = metas
    reply["learner_ms"] = (time.perf_counter() - start) * 1000
    return reply, chunks


def error_reply(req_id, what):
    return {"id": req_id, "ok": False, "error": tail(what)}, []


def build(factory, header):
    return factory(partition_id=header["partition_id"], num_partitions=header["num_partitions"])


# --- the two modes -------------------------------------------------------


def serve_inline(factory, proto_in, out_fd):
    learners = {}
    while True:
        frame = read_frame(proto_in)
        if frame is None or frame[0].get("op") == "shutdown":
            return
        header, body = frame
        try:
            key = (header["partition_id"], header["num_partitions"])
            if key not in learners:
                learners[key] = build(factory, header)
            reply = run_request(learners[key], header, body)
        except BaseException:  # noqa: BLE001 - a learner's failure is its reply
            reply = error_reply(header.get("id"), traceback.format_exc())
        write_all(out_fd, frame_bytes(*reply))


def child(factory, header, body, w):
    """Runs one request in a forked child; never returns."""
    code = 0
    try:
        try:
            reply = run_request(build(factory, header), header, body)
        except BaseException:  # noqa: BLE001
            reply = error_reply(header["id"], traceback.format_exc())
        write_all(w, frame_bytes(*reply))
    except BaseException:  # noqa: BLE001 - the parent reports a missing reply
        code = 1
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def describe(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"the step's process was killed by {name}"
    return f"the step's process exited with status {os.WEXITSTATUS(status)} without a reply"


def serve_fork(factory, proto_in, out_fd):
    """Warm parent: forks one child per request, several at once."""
    sel = selectors.DefaultSelector()
    sel.register(proto_in, selectors.EVENT_READ, None)
    running = {}  # read fd -> [pid, request id, bytearray, deadline]
    while True:
        now = time.monotonic()
        deadlines = [r[3] for r in running.values() if r[3] is not None]
        wait = max(0.0, min(deadlines) - now) if deadlines else None
        for key, _ in sel.select(wait):
            if key.data is None:
                frame = read_frame(proto_in)
                if frame is None or frame[0].get("op") == "shutdown":
                    for fd, (pid, *_rest) in running.items():
                        os.kill(pid, signal.SIGKILL)
                    return
                header, body = frame
                timeout = header.get("timeout")
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    for fd in list(running):
                        os.close(fd)
                    proto_in.close()
                    os.close(out_fd)
                    child(factory, header, body, w)
                os.close(w)
                deadline = time.monotonic() + timeout if timeout else None
                running[r] = [pid, header["id"], bytearray(), deadline]
                sel.register(r, selectors.EVENT_READ, r)
            else:
                r = key.data
                data = os.read(r, 1 << 20)
                if data:
                    running[r][2] += data
                    continue
                pid, req_id, buf, _ = running.pop(r)
                sel.unregister(r)
                os.close(r)
                _, status = os.waitpid(pid, 0)
                if buf and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                    write_all(out_fd, bytes(buf))
                else:
                    write_all(out_fd, frame_bytes(*error_reply(req_id, describe(status))))
        now = time.monotonic()
        for r, (pid, req_id, _buf, deadline) in list(running.items()):
            if deadline is not None and now >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                sel.unregister(r)
                os.close(r)
                del running[r]
                why = "the step ran past --worker-timeout and was killed"
                write_all(out_fd, frame_bytes(*error_reply(req_id, why)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--mode", choices=["fork", "inline"], default="fork")
    a = ap.parse_args()
    # The protocol keeps the original stdin and stdout; fd 1 becomes stderr
    # (so prints, even from C code, reach the log) and fd 0 /dev/null.
    # Unbuffered: a selector must see every byte that has arrived.
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    out_fd = os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        factory = load_factory(a.file, a.name)
        hello = {"id": 0, "ok": True, "pid": os.getpid(), "python": sys.version.split()[0],
                 "numpy": np.__version__}
    except BaseException:  # noqa: BLE001
        write_all(out_fd, frame_bytes(*error_reply(0, traceback.format_exc())))
        return 1
    write_all(out_fd, frame_bytes(hello, []))
    if a.mode == "fork":
        serve_fork(factory, proto_in, out_fd)
    else:
        serve_inline(factory, proto_in, out_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
