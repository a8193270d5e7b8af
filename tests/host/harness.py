"""Real-host test harness: start a real ComfyUI, drive it over HTTP, convert UI workflows to API prompts.

Only the standard library is imported at module level (the host tests are collected, and skipped, on machines
without ComfyUI). ComfyUI's code is never imported into the test process: the server runs as a subprocess of
``sys.executable`` (run the host tests from the ComfyUI venv) and everything goes through its HTTP API.

Layout of one server's temp root (nothing is written into the ComfyUI checkout):
    comfy_base/            --base-directory: user dir, default (empty) models and custom_nodes folders
    models/<folder>/       registered by extra_model_paths.yaml (diffusion_models, vae, clip_vision, ...)
    custom_nodes/          registered by extra_model_paths.yaml: symlinks to the repo (the pack) and testnodes
    input/ output/ temp/   --input-directory / --output-directory / --temp-directory (ComfyUI uses temp/temp)
    extra_model_paths.yaml
    server.log             the server's stdout+stderr
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
STUBS_DIR = HERE / "stubs"
TESTNODES_DIR = HERE / "testnodes"
PACK_LINK_NAME = "physmaster_comfyui"
TESTNODES_LINK_NAME = "physmaster_testnodes"

MODEL_FOLDERS = ("diffusion_models", "clip_vision", "vae", "text_encoders", "loras", "physmaster", "checkpoints")


class HostError(RuntimeError):
    """Base class for harness errors; the message ends with the tail of the server log where useful."""


class PromptRejected(HostError):
    """POST /prompt refused the prompt (validation errors); ``.response`` is the server's JSON answer."""

    def __init__(self, message, response=None):
        super().__init__(message)
        self.response = response


class ExecutionFailed(HostError):
    """The prompt ran and failed; ``.node_id``, ``.node_type``, ``.exception_type``, ``.exception_message``."""

    def __init__(self, message, details=None):
        super().__init__(message)
        details = details or {}
        self.details = details
        self.node_id = details.get("node_id")
        self.node_type = details.get("node_type")
        self.exception_type = details.get("exception_type")
        self.exception_message = details.get("exception_message")
        self.traceback = details.get("traceback")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIVE_HOSTS: "weakref.WeakSet[ComfyHost]" = weakref.WeakSet()


@atexit.register
def _stop_all_hosts():
    for host in list(_LIVE_HOSTS):
        try:
            host.stop()
        except Exception:
            pass


class ComfyHost:
    """One real ComfyUI server on a free loopback port, with its own temp folders.

    ``with ComfyHost(comfyui_path, models={"vae": [path]}) as host: host.run(prompt)``
    """

    def __init__(self, comfyui_path: str | os.PathLike, *, python: str | None = None,
                 root: str | os.PathLike | None = None, models: dict | None = None,
                 link_pack: bool = True, link_testnodes: bool = True, extra_custom_nodes: dict | None = None,
                 extra_args: list[str] | None = None, env: dict | None = None, cache: str = "classic",
                 fp32_text_encoders: bool = True, startup_timeout: float = 240.0, keep_root: bool = False):
        """
        models: ComfyUI folder name -> list of files to symlink into it (e.g. {"vae": [Path(...)]}).
        extra_custom_nodes: link name -> folder, linked into the custom_nodes dir besides the pack/testnodes.
        cache: "classic" (--cache-classic: outputs of unchanged nodes are reused until ``free()``),
               "none" (--cache-none: every node runs every time), or "default" (ComfyUI's RAM-pressure cache).
        fp32_text_encoders: pass --fp32-text-enc, so text encoders AND CLIP vision run in fp32 like everything
               else in the CPU tests (ComfyUI's CPU default for them is fp16: slower, and not bit-stable across
               CPUs). A CLIP-H encode of one 224 image takes ~17 s fp32 / ~19 s fp16 on 2 cores.
        """
        self.comfyui_path = Path(comfyui_path).resolve()
        if not (self.comfyui_path / "main.py").is_file():
            raise HostError(f"{self.comfyui_path} is not a ComfyUI checkout (no main.py)")
        self.python = python or sys.executable
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="physmaster-host-"))
        self.models = {k: [Path(p) for p in v] for k, v in (models or {}).items()}
        self.link_pack = link_pack
        self.link_testnodes = link_testnodes
        self.extra_custom_nodes = dict(extra_custom_nodes or {})
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.cache = cache
        self.fp32_text_encoders = fp32_text_encoders
        self.startup_timeout = startup_timeout
        self.keep_root = keep_root
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._object_info: dict | None = None
        self.client_id = uuid.uuid4().hex
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ folders
    @property
    def base_dir(self) -> Path:
        return self.root / "comfy_base"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.root / "custom_nodes"

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def temp_dir(self) -> Path:
        return self.root / "temp"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare(self):
        for d in (self.base_dir / "custom_nodes", self.base_dir / "user", self.base_dir / "models",
                  self.custom_nodes_dir, self.input_dir, self.output_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for folder in set(MODEL_FOLDERS) | set(self.models):
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        for folder, files in self.models.items():
            for f in files:
                self.add_model_file(folder, f)
        links = {}
        if self.link_pack:
            links[PACK_LINK_NAME] = REPO_ROOT
        if self.link_testnodes:
            links[TESTNODES_LINK_NAME] = TESTNODES_DIR
        links.update(self.extra_custom_nodes)
        for name, target in links.items():
            link = self.custom_nodes_dir / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)
        folders = sorted(set(MODEL_FOLDERS) | set(self.models))
        lines = ["physmaster_host_tests:", f"    base_path: {json.dumps(str(self.root))}"]
        lines += [f"    {folder}: models/{folder}/" for folder in folders]
        lines.append("    custom_nodes: custom_nodes/")
        (self.root / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def add_model_file(self, folder: str, path: str | os.PathLike, name: str | None = None) -> Path:
        """Symlink a model file into models/<folder>/ (works while running: ComfyUI rescans folders)."""
        path = Path(path).resolve()
        if not path.is_file():
            raise HostError(f"model file {path} does not exist")
        d = self.models_dir / folder
        d.mkdir(parents=True, exist_ok=True)
        link = d / (name or path.name)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path)
        return link

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.temp_dir),
               "--extra-model-paths-config", str(self.root / "extra_model_paths.yaml"),
               "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none"]
        if self.cache == "classic":
            cmd.append("--cache-classic")
        elif self.cache == "none":
            cmd.append("--cache-none")
        elif self.cache != "default":
            raise ValueError(f"cache must be classic, none or default, not {self.cache!r}")
        if self.fp32_text_encoders:
            cmd.append("--fp32-text-enc")
        return cmd + self.extra_args

    def start(self) -> "ComfyHost":
        if self.proc is not None:
            return self
        self._prepare()
        self.port = free_port()
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(STUBS_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        self._log_file = open(self.log_path, "ab", buffering=0)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_path), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE_HOSTS.add(self)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float):
        deadline = t0 + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited during start-up (rc {self.proc.returncode})\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise HostError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 20.0):
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _LIVE_HOSTS.discard(self)
        if self._own_root and not self.keep_root and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        text = self.log().splitlines()[-lines:]
        return f"--- tail of {self.log_path} ---\n" + "\n".join(text)

    def import_failures(self) -> list[str]:
        """Lines of the server log that report a failed import (core extras or custom nodes)."""
        return [ln for ln in self.log().splitlines() if "IMPORT FAILED" in ln or "Cannot import" in ln]

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, data=None, timeout: float = 60.0):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            e.payload = payload
            raise
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 60.0):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, data=None, timeout: float = 60.0):
        return self.request("POST", path, data if data is not None else {}, timeout=timeout)

    def object_info(self, node_type: str | None = None, refresh: bool = False) -> dict:
        """GET /object_info (cached); with node_type, that node's entry (KeyError if unknown)."""
        if self._object_info is None or refresh:
            self._object_info = self.get("/object_info", timeout=120)
        return self._object_info if node_type is None else self._object_info[node_type]

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt_id. Raises PromptRejected with the node errors on refusal."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            answer = self.post("/prompt", payload)
        except urllib.error.HTTPError as e:
            raise PromptRejected(f"ComfyUI refused the prompt (HTTP {e.code}): {_describe_rejection(e.payload)}",
                                 e.payload) from None
        return answer["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        """GET /history[/<id>]; with an id, that prompt's entry or {} while it has not finished."""
        if prompt_id is None:
            return self.get("/history")
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id, {})

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> dict:
        """Wait for a queued prompt to finish; returns its history entry, raises ExecutionFailed on error."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                if status.get("status_str") == "error":
                    raise _execution_failed(prompt_id, status, self.log_tail(40))
                return entry
            if not self.running:
                raise HostError(f"ComfyUI died while running prompt {prompt_id}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.interrupt()
                raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f} s (interrupted)\n"
                                f"{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """queue + wait; returns the history entry (``entry["outputs"]``: node id -> ui outputs)."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def interrupt(self):
        self.post("/interrupt", {})

    def listen(self) -> "WsListener":
        """A websocket client on /ws with this host's client_id (the events the frontend gets); use `with`."""
        return WsListener(self.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}")

    def free(self, unload_models: bool = True, free_memory: bool = True, timeout: float = 60.0):
        """Ask ComfyUI to drop cached node outputs (and unload models), and wait until it has.

        The flags are handled by the worker after its current or next queue item, so a barrier prompt is run
        after posting them: once it is done, the next prompt runs on empty caches.
        """
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})
        if self.link_testnodes:
            self.run({"barrier": {"class_type": "PhysMasterTest_Barrier", "inputs": {}}}, timeout=timeout)
        else:
            time.sleep(1.0)

    def output_files(self, entry: dict, kinds=("images", "latents", "tensors", "gifs", "videos", "audio")) -> list[Path]:
        """Paths of the files a history entry lists under its outputs (type output or temp)."""
        paths = []
        for node_out in (entry.get("outputs") or {}).values():
            for kind, items in node_out.items():
                if kinds and kind not in kinds:
                    continue
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        base = {"output": self.output_dir, "temp": self.temp_dir / "temp",
                                "input": self.input_dir}.get(item.get("type", "output"), self.output_dir)
                        paths.append(base / item.get("subfolder", "") / item["filename"])
        return paths

    def upload_image(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Copy an image into the input folder (what LoadImage lists); returns its name."""
        name = name or Path(path).name
        shutil.copyfile(path, self.input_dir / name)
        return name


def _describe_rejection(payload) -> str:
    if not isinstance(payload, dict):
        return str(payload)
    parts = []
    err = payload.get("error")
    if isinstance(err, dict):
        parts.append(f"{err.get('type')}: {err.get('message')} {err.get('details', '')}".strip())
    for node_id, ne in (payload.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(parts) or json.dumps(payload)[:2000]


def _execution_failed(prompt_id, status, log_tail) -> ExecutionFailed:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            tb = "".join(data.get("traceback") or [])
            msg = (f"prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
                   f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
            return ExecutionFailed(msg, data)
        if kind == "execution_interrupted":
            return ExecutionFailed(f"prompt {prompt_id} was interrupted in node {data.get('node_id')}", data)
    return ExecutionFailed(f"prompt {prompt_id} failed: {json.dumps(status)[:2000]}\n{log_tail}")


def load_tensors(path: str | os.PathLike) -> dict:
    """Read a .safetensors / .latent file (core SaveLatent, PhysMasterTest_SaveTensors) into a dict of tensors."""
    from safetensors.torch import load_file
    return load_file(str(path))


def load_latent(path: str | os.PathLike):
    """The latent tensor of a core SaveLatent file (key ``latent_tensor``)."""
    return load_tensors(path)["latent_tensor"]


class WsListener:
    """Collects ComfyUI websocket JSON events in a background thread (aiohttp; the host venv has it)."""

    def __init__(self, url: str):
        import queue
        import threading

        self.url = url
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.seen: list[dict] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self):
        import asyncio

        import aiohttp

        async def main():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.url, heartbeat=10) as ws:
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            event = json.loads(msg.data)
                            event["received"] = time.monotonic()  # for per-node timings (bench/)
                            self.events.put(event)
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return

        try:
            asyncio.run(main())
        except BaseException as e:  # reported by wait_for
            self._error = e
            self._ready.set()

    def __enter__(self) -> "WsListener":
        self._thread.start()
        if not self._ready.wait(30) or self._error:
            raise HostError(f"websocket {self.url} did not connect: {self._error!r}")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def wait_for(self, event_type: str, timeout: float = 60.0, where=None) -> dict:
        """The next event of `event_type` (whose data satisfies `where`), or HostError after `timeout`."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError(f"no {event_type!r} event within {timeout:.0f} s; saw "
                                f"{[e.get('type') for e in self.seen][-20:]}")
            try:
                event = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self._error:
                    raise HostError(f"websocket failed: {self._error!r}") from None
                continue
            self.seen.append(event)
            if event.get("type") == event_type and (where is None or where(event.get("data") or {})):
                return event["data"]


# ---------------------------------------------------------------------------------------------- ui_to_api
# One converter for CI (against the schema snapshot) and the host (against live /object_info): tests/workflow_api.py
_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
from workflow_api import MODE_BYPASS, MODE_MUTED, WorkflowError, ui_to_api  # noqa: E402,F401
